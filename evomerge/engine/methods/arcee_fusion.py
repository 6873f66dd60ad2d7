"""Arcee Fusion: take the other model's change only where it matters most, by a dynamic threshold.

mergekit 0.1.5 `arcee_fusion` (base + exactly one model), per output tensor, in the inputs' dtype:

    importance = |other - base| * KL(softmax(other) || softmax(base))    (softmax over the last dim,
                 +1e-8 inside; one KL value per row)
    threshold  = median + 1.5 (q3 - q1) of the importance values (quantiles read off a sort at
                 index int(q * (n - 1)))
    result     = base + (other - base) * [importance >= threshold]

For a tensor of more than 1,000,000 entries mergekit estimates the quantiles from 1,000,000 entries
drawn with replacement from torch's global RNG, so its result changes from run to run; here the
quantiles are always exact (`kthvalue`), so a recipe always gives the same tensors, which equal
mergekit's wherever mergekit draws nothing.
"""

from __future__ import annotations

from evomerge.engine.methods.base import MergeMethod


def _quantiles(values, qs):
    """The entries at index int(q * (n - 1)) of the sorted values (exact, without a full sort)."""
    flat = values.reshape(-1)
    n = flat.numel()
    return [flat.kthvalue(int(q * (n - 1)) + 1).values for q in qs]


QUARTILES = (0.25, 0.5, 0.75)


class ArceeFusion(MergeMethod):
    name = "arcee_fusion"
    requires_base = True
    model_count = (2, 2)
    base_takes_model_params = False
    reference_url = "https://arcee.ai"
    tensor_params = ()
    global_params = ()

    def _merge(self, tensors, base_index, model_params, global_params, generator):
        import torch

        base = tensors[base_index]
        other = tensors[1 - base_index]
        p = torch.softmax(other, dim=-1) + 1e-8
        q = torch.softmax(base, dim=-1) + 1e-8
        kl = torch.sum(p * torch.log(p / q), dim=-1, keepdim=True)
        importance = (other - base).abs() * kl
        q1, median, q3 = _quantiles(importance, QUARTILES)
        mask = (importance >= median + 1.5 * (q3 - q1)).float()
        return (base + (other - base) * mask).to(base.dtype)
