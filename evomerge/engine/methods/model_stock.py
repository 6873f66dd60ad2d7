"""Model Stock: move from the base towards the fine-tunes' average by how much their updates agree.

mergekit 0.1.5 `model_stock` (base + at least 2 models), per output tensor, in the inputs' dtype:

    offsets_i = model_i - base            (flattened; with filter_wise, per row of the tensor)
    cos       = mean over pairs i<j of clamp(<o_i, o_j> / max(|o_i| |o_j|, 1e-6), -1, 1)
    t         = n cos / (1 + (n - 1) cos)     (0 where |1 + (n - 1) cos| < 1e-6: keep the base)
    result    = t * mean_i(model_i) + (1 - t) * base

`filter_wise` (default false) computes one t per row (output filter) instead of one per tensor.
"""

from __future__ import annotations

from evomerge.engine.methods.base import MergeMethod, Tunable


class ModelStock(MergeMethod):
    name = "model_stock"
    requires_base = True
    model_count = (3, None)
    base_takes_model_params = False
    reference_url = "https://arxiv.org/abs/2403.19522"
    tensor_params = ()
    global_params = (
        Tunable("filter_wise", default=False, kind="global", type="bool",
                doc="one interpolation factor per row (output filter) instead of per tensor"),
    )

    def _merge(self, tensors, base_index, model_params, global_params, generator):
        import torch

        w0 = tensors[base_index]
        ws = [x for i, x in enumerate(tensors) if i != base_index]
        shape = w0.shape
        if global_params["filter_wise"]:
            if w0.dim() == 1:
                w0, ws = w0.unsqueeze(0), [x.unsqueeze(0) for x in ws]
        else:
            w0, ws = w0.reshape(-1), [x.reshape(-1) for x in ws]
        offsets = [x - w0 for x in ws]
        cosines = []
        for i, a in enumerate(offsets):
            for b in offsets[i + 1:]:
                norms = torch.norm(a, dim=-1) * torch.norm(b, dim=-1)
                cosines.append(((a * b).sum(dim=-1) / norms.clamp(min=1e-6)).clamp(-1, 1))
        cos = torch.stack(cosines).mean(dim=0).unsqueeze(-1)
        n = len(ws)
        denominator = 1 + (n - 1) * cos
        singular = denominator.abs() < 1e-6
        t = torch.where(singular, torch.zeros_like(cos),
                        (n * cos) / torch.where(singular, torch.ones_like(denominator), denominator))
        average = sum(ws) / n
        return (t * average + (1 - t) * w0).reshape(shape)
