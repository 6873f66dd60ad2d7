"""DARE: drop task-vector entries at random (keep probability = density) and rescale the rest.

mergekit 0.1.5 has two DARE methods, both generalized task arithmetic (task_arithmetic.py) with
Bernoulli sparsification, `normalize` default false and `rescale` default TRUE:
- `dare_ties`: with TIES sign consensus;
- `dare_linear`: without consensus (a plain weighted sum of the dropped task vectors).

`rescale` in mergekit 0.1.5 matches the L1 norm of the kept entries to the L1 norm of the whole
task vector (RescaleNorm.l1); it is NOT the paper's fixed 1/density factor (equal in expectation).

Randomness, exactly: the non-base inputs are visited in input order; for each one whose density
is < 1, `base.bernoulli_drop` makes ONE `torch.bernoulli` call with `generator` over a tensor of
the weight's shape filled with density (bfloat16 inputs draw in bfloat16, other CPU dtypes in
float32). A model with density 1 draws nothing. So the merged tensor is a function of the
generator's state when `merge` is called; the engine seeds a fresh generator per output tensor
(from the recipe's random_seed and the tensor name), which makes results independent of the
order tensors are merged in. With generator=None torch's global RNG is used, as mergekit does.
"""

from __future__ import annotations

from evomerge.engine.methods.arithmetic import bernoulli_drop
from evomerge.engine.methods.task_arithmetic import TaskArithmetic, density_tunable, family_globals, weight_tunable


class _Dare(TaskArithmetic):
    uses_generator = True
    reference_url = "https://arxiv.org/abs/2311.03099"
    tensor_params = (weight_tunable(), density_tunable(effective=True))

    def sparsify(self, delta, params, global_params, generator):
        return bernoulli_drop(delta, params["density"], bool(global_params["rescale"]), generator)


class DareTies(_Dare):
    name = "dare_ties"
    consensus = True
    global_params = family_globals(normalize=False, rescale=True)


class DareLinear(_Dare):
    name = "dare_linear"
    consensus = False
    global_params = family_globals(normalize=False, rescale=True)
