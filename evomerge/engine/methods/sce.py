"""SCE: select the entries where the fine-tunes vary most, weight each task vector by its energy,
erase the entries that disagree in sign, and average what is left.

mergekit 0.1.5 `sce` (a base and any number of models), per output tensor, in the inputs' dtype:

    tv_i   = model_i - base
    select (select_topk < 1): keep the int(select_topk * #nonzero) entries of largest variance
           across the tv_i (population variance), zero the rest in every tv_i
    erase  : TIES sign election on the tv_i (`base.sign_election_mask`)
    w_i    = mean(tv_i^2) / sum_j mean(tv_j^2)   (equal weights when that sum is ~0)
    result = base + sum_i w_i m_i tv_i / max(sum_i w_i m_i, 1e-6)     (m: the erase mask)
"""

from __future__ import annotations

from evomerge.engine.methods.arithmetic import sign_election_mask
from evomerge.engine.methods.base import MergeMethod, Tunable
from evomerge.engine.methods.task_arithmetic import int8_mask_tunable


def variance_mask(tvs, fraction: float, mask_dtype):
    """1 on the int(fraction * #nonzero-variance) entries of largest variance across `tvs` [n, ...]."""
    import torch

    if fraction <= 0:
        return torch.zeros_like(tvs[0], dtype=mask_dtype)
    if fraction >= 1:
        return torch.ones_like(tvs[0], dtype=mask_dtype)
    var = torch.var(tvs, dim=0, unbiased=False)
    k = int(torch.count_nonzero(var) * fraction)
    mask = torch.zeros_like(var, dtype=mask_dtype)
    if k == 0:
        return mask
    _, top = torch.topk(var.abs().view(-1), k=k, largest=True)
    mask.view(-1)[top] = 1
    return mask


class Sce(MergeMethod):
    name = "sce"
    requires_base = True
    model_count = (1, None)
    base_takes_model_params = False
    reference_url = "https://arxiv.org/abs/2408.07990"
    tensor_params = ()
    global_params = (
        int8_mask_tunable(),
        Tunable("select_topk", default=1.0, low=0.0, high=1.0, kind="global", search_low=0.1, search_high=1.0,
                doc="fraction of entries (by variance across the models) that are merged"),
    )

    def _merge(self, tensors, base_index, model_params, global_params, generator):
        import torch

        base = tensors[base_index]
        others = [x for i, x in enumerate(tensors) if i != base_index]
        if not others:
            return base
        int8 = bool(global_params["int8_mask"])
        mask_dtype = torch.int8 if int8 else base.dtype
        tvs = torch.stack([x - base for x in others], dim=0)
        if global_params["select_topk"] < 1:
            tvs = tvs * variance_mask(tvs, global_params["select_topk"], mask_dtype).unsqueeze(0)
        erase = sign_election_mask(tvs, int8)
        energy = tvs.square().reshape(tvs.shape[0], -1).mean(dim=1)
        total = torch.sum(energy).item()
        weights = torch.ones_like(energy) / energy.shape[0] if abs(total) < 1e-6 else energy / total
        while weights.dim() < tvs.dim():
            weights = weights.unsqueeze(-1)
        kept = weights * erase
        return base + (tvs * kept).sum(dim=0) / torch.sum(kept, dim=0).clamp(min=1e-6)
