"""TIES merging: trim each task vector to its largest entries, elect signs, average the agreeing ones.

mergekit 0.1.5 `ties` = generalized task arithmetic (see task_arithmetic.py) with magnitude
sparsification and sum-based sign consensus; `normalize` defaults to TRUE (so the agreeing entries
are averaged with their weights), `rescale` defaults to false, `density` defaults to 1.

Trim: k = max(1, int(density * numel)) entries of largest |delta| are kept (density >= 1 keeps
all). Entries tied at the cut magnitude are resolved exactly as mergekit does by default (see
`base.magnitude_keep_mask`); `Ties(exact_ties=False)` breaks such ties by lowest index instead,
which is several times faster on bfloat16 models and differs from mergekit only in WHICH of
several equal-magnitude entries survive.
"""

from __future__ import annotations

from evomerge.engine.methods.arithmetic import magnitude_trim
from evomerge.engine.methods.task_arithmetic import TaskArithmetic, density_tunable, family_globals, weight_tunable


class Ties(TaskArithmetic):
    name = "ties"
    reference_url = "https://arxiv.org/abs/2306.01708"
    consensus = True
    tensor_params = (weight_tunable(), density_tunable(effective=True))
    global_params = family_globals(normalize=True, rescale=False)

    def __init__(self, *, exact_ties: bool = True):
        self.exact_ties = exact_ties

    def sparsify(self, delta, params, global_params, generator):
        return magnitude_trim(
            delta, params["density"], bool(global_params["rescale"]), exact_ties=self.exact_ties
        )
