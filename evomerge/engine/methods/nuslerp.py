"""NuSLERP: spherical interpolation of two models by their weights, row-wise or flattened, with an
optional base (then of the two task vectors).

mergekit 0.1.5 `nuslerp` (exactly 2 models besides an optional base_model), per output tensor, in
the inputs' dtype (no float32 upcast, unlike `slerp`):

    t = weight_2 / (weight_1 + weight_2)      (0.5 when the weights sum to ~0)
    with base: result = base + nuslerp(t, model_1 - base, model_2 - base)
    else:      result = nuslerp(t, model_1, model_2)

nuslerp(t, a, b): with `nuslerp_flatten` (default true) a and b are single vectors; otherwise rows
(last dimension; `nuslerp_row_wise`: columns). The angle comes from copies normalised with a norm
floor of 1e-7; where 1 - cos^2 <= 1e-16 (colinear) the result is (1 - t) a + t b, else
(sin((1 - t) theta) a + sin(t theta) b) / sin(theta).
"""

from __future__ import annotations

from evomerge.engine.methods.base import MergeMethod, Tunable
from evomerge.engine.methods.task_arithmetic import weight_tunable


def nuslerp(t: float, v0, v1, *, dim: int = -1, flatten: bool = False, eps: float = 1e-8):
    import torch

    shape = v0.shape
    if flatten:
        v0, v1 = v0.reshape(-1), v1.reshape(-1)
    elif dim != -1:
        v0, v1 = v0.transpose(dim, -1), v1.transpose(dim, -1)

    def unit(x):
        return x / torch.norm(x, dim=-1, keepdim=True).clamp(min=1e-7)

    cos = torch.sum(unit(v0) * unit(v1), dim=-1, keepdim=True).clamp(-1, 1)
    colinear = (1 - cos.square()) <= eps**2
    theta = torch.acos(torch.where(colinear, 0, cos))
    spherical = (torch.sin((1 - t) * theta) * v0 + torch.sin(t * theta) * v1) / torch.sin(theta)
    result = torch.where(colinear, (1 - t) * v0 + t * v1, spherical)
    if dim != -1 and not flatten:
        result = result.transpose(dim, -1)
    return result.reshape(shape)


class NuSlerp(MergeMethod):
    name = "nuslerp"
    optional_base = True
    model_count = (2, 3)
    non_base_count = (2, 2)
    base_takes_model_params = False
    reference_url = "https://github.com/arcee-ai/mergekit"
    tensor_params = (weight_tunable(),)
    global_params = (
        Tunable("nuslerp_row_wise", default=False, kind="global", type="bool",
                doc="interpolate columns (dimension 0) instead of rows"),
        Tunable("nuslerp_flatten", default=True, kind="global", type="bool",
                doc="interpolate each tensor as one flat vector"),
    )

    def _merge(self, tensors, base_index, model_params, global_params, generator):
        others = [i for i in range(len(tensors)) if i != base_index]
        weights = [model_params[i]["weight"] for i in others]
        total = sum(weights)
        t = 0.5 if abs(total) < 1e-6 else weights[1] / total
        a, b = (tensors[i] for i in others)
        kwargs = dict(dim=0 if global_params["nuslerp_row_wise"] else -1, flatten=global_params["nuslerp_flatten"])
        if base_index is None:
            return nuslerp(t, a, b, **kwargs)
        base = tensors[base_index]
        return base + nuslerp(t, a - base, b - base, **kwargs)
