"""DELLA: drop task-vector entries at random with a keep probability that grows with their magnitude.

mergekit 0.1.5 `della` and `della_linear` are generalized task arithmetic (task_arithmetic.py) with
`della_magprune` sparsification (`base.della_magprune`): per row, the keep probability of an entry
runs linearly from density - epsilon (smallest magnitude) to density + epsilon (largest), then the
kept entries are L1-rescaled (rescale defaults to TRUE). `della` adds TIES's sign consensus and
normalizes by default; `della_linear` is a plain weighted sum, normalize false. epsilon defaults to
0.15 and must keep density -/+ epsilon inside (0, 1) (checked when the recipe is planned).

Randomness follows DARE's rules (dare.py): one `torch.bernoulli` draw per non-base input with
density < 1, from the per-tensor generator the engine seeds from `random_seed` and the tensor name,
so a recipe always gives the same tensors.
"""

from __future__ import annotations

from evomerge.engine.methods.arithmetic import check_della, della_magprune
from evomerge.engine.methods.base import Tunable
from evomerge.engine.methods.task_arithmetic import TaskArithmetic, density_tunable, family_globals, weight_tunable

EPSILON = Tunable("epsilon", default=0.15, low=0.0, high=0.5, kind="model", search_low=0.01, search_high=0.2,
                  doc="half-width of the keep-probability band around density")


class Della(TaskArithmetic):
    name = "della"
    reference_url = "https://arxiv.org/abs/2406.11617"
    uses_generator = True
    consensus = True
    tensor_params = (weight_tunable(), density_tunable(effective=True), EPSILON)
    global_params = family_globals(normalize=True, rescale=True)

    def check_tensor(self, models, base, model_params, global_params, tensor):
        for model in models:
            if model == base:
                continue
            p = self._resolve_model(model, base, model_params.get(model) or {})
            check_della(p["density"], p["epsilon"], f"parameters of model {model!r} (tensor {tensor!r})")

    def sparsify(self, delta, params, global_params, generator):
        check_della(params["density"], params["epsilon"], "parameters")
        return della_magprune(delta, params["density"], params["epsilon"], bool(global_params["rescale"]), generator)


class DellaLinear(Della):
    name = "della_linear"
    consensus = False
    global_params = family_globals(normalize=False, rescale=True)
