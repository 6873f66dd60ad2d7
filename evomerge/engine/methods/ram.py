"""RAM (Reinforced Agent Merging): entries changed by one model are taken whole, entries changed by
several are averaged over those that changed them; RAM+ boosts each model's unique entries by how much
it otherwise overlaps with the others.

mergekit 0.1.5 `ram` and `ramplus_tl` (a base and any number of models), per output tensor, in the
inputs' dtype, with tv_i = model_i - base flattened and "changed" = |tv_i| > epsilon:

    count  = number of models that changed an entry
    ram    : result = base + sum_i tv_i changed_i (1 where count == 1, 1/count where count > 1)
    ramplus_tl: model i's unique entries (count == 1) are scaled by
                lambda_i = 1 + r * clamp(shared_i / max(unique_i, epsilon), 0, alpha),
                shared_i / unique_i = how many of its changed entries are shared / its own
"""

from __future__ import annotations

from evomerge.engine.methods.base import MergeMethod, Tunable

EPSILON = Tunable("epsilon", default=1e-5, low=0.0, kind="global", search_low=0.0, search_high=1e-3,
                  doc="a task-vector entry counts as changed when its magnitude exceeds this")


def _changes(tensors, base_index: int, epsilon: float):
    import torch

    base = tensors[base_index]
    others = [x for i, x in enumerate(tensors) if i != base_index]
    tv = torch.stack([x - base for x in others], dim=0).view(len(others), -1)
    changed = tv.abs() > epsilon
    count = changed.sum(dim=0, keepdim=True)
    return base, tv, changed, count, count > 1, count == 1


class Ram(MergeMethod):
    name = "ram"
    requires_base = True
    model_count = (1, None)
    base_takes_model_params = False
    reference_url = "https://arxiv.org/abs/2601.13572"
    tensor_params = ()
    global_params = (EPSILON,)

    def unique_scale(self, changed, shared, unique, global_params):
        """Factor on each model's uniquely changed entries (RAM: none)."""
        return None

    def _merge(self, tensors, base_index, model_params, global_params, generator):
        if len(tensors) == 1:
            return tensors[base_index]
        base, tv, changed, count, shared, unique = _changes(tensors, base_index, global_params["epsilon"])
        tv = tv * changed
        scale = self.unique_scale(changed, shared, unique, global_params)
        own = tv * unique if scale is None else tv * unique * scale.unsqueeze(-1)
        merged = (own + tv * shared / count.clamp(min=1)).sum(dim=0, keepdim=True)
        return (base + merged.reshape_as(base)).to(base.dtype)  # RAM+'s float32 boost would promote it


class RamPlusTl(Ram):
    name = "ramplus_tl"
    global_params = (
        Tunable("r", default=0.1, low=0.0, kind="global", search_low=0.0, search_high=0.5,
                doc="strength of the boost of a model's unique entries"),
        Tunable("alpha", default=0.2, low=0.0, kind="global", search_low=0.0, search_high=1.0,
                doc="cap on the shared/unique ratio that drives the boost"),
        EPSILON,
    )

    def unique_scale(self, changed, shared, unique, global_params):
        eps = global_params["epsilon"]
        rho = (changed & shared).sum(dim=1) / (changed & unique).sum(dim=1).clamp(min=eps)
        return 1 + global_params["r"] * rho.clamp(min=0, max=global_params["alpha"])
