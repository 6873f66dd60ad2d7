"""Model Breadcrumbs: task vectors with both their smallest entries and their largest outliers cut.

mergekit 0.1.5 `breadcrumbs` and `breadcrumbs_ties` are generalized task arithmetic
(task_arithmetic.py) with `magnitude_outliers` sparsification (`base.magnitude_outliers_trim`): of
each task vector, the `gamma` fraction of largest entries and the smallest ones are dropped so that
`density` remains. `breadcrumbs` sums the trimmed, weighted task vectors; `breadcrumbs_ties` adds
TIES's sign consensus. Both default to normalize false, rescale false; gamma defaults to 0.01.
"""

from __future__ import annotations

from evomerge.engine.methods.arithmetic import magnitude_outliers_trim
from evomerge.engine.methods.base import Tunable
from evomerge.engine.methods.task_arithmetic import TaskArithmetic, density_tunable, family_globals, weight_tunable

GAMMA = Tunable("gamma", default=0.01, low=0.0, high=1.0, kind="model", search_low=0.0, search_high=0.1,
                doc="fraction of largest-magnitude entries dropped as outliers")


class Breadcrumbs(TaskArithmetic):
    name = "breadcrumbs"
    reference_url = "https://arxiv.org/abs/2312.06795"
    consensus = False
    tensor_params = (weight_tunable(), density_tunable(effective=True), GAMMA)
    global_params = family_globals(normalize=False, rescale=False)

    def sparsify(self, delta, params, global_params, generator):
        return magnitude_outliers_trim(delta, params["density"], params["gamma"], bool(global_params["rescale"]))


class BreadcrumbsTies(Breadcrumbs):
    name = "breadcrumbs_ties"
    consensus = True
