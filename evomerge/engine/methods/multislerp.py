"""Multi-SLERP: a weighted mean of any number of models on the hypersphere, with an optional base.

mergekit 0.1.5 `multislerp`, per output tensor, in the inputs' dtype (one model: that model):

    x_i   = model_i (- base, with a base), flattened;  w = weights (/ their sum with normalize_weights)
    u_i   = x_i / (|x_i| + eps);  m = sum_i w_i u_i
    if |m| < eps: two models -> w_1 x_1 + w_2 x_2 (+ base); more -> an error (antipodal inputs)
    m     = m / |m|;  tangent = sum_i w_i (u_i - <u_i, m> m);  r = |tangent| + eps
    result = (cos(r) m + tangent sin(r) / r) * sum_i w_i |x_i|   (+ base)
"""

from __future__ import annotations

from evomerge.engine.methods.base import MergeMethod, Tunable
from evomerge.engine.methods.task_arithmetic import weight_tunable
from evomerge.errors import ConfigError


class MultiSlerp(MergeMethod):
    name = "multislerp"
    optional_base = True
    model_count = (1, None)
    non_base_count = (1, None)
    base_takes_model_params = False
    reference_url = "https://goddard.blog/posts/multislerp-wow-what-a-cool-idea"
    tensor_params = (weight_tunable(),)
    global_params = (
        Tunable("normalize_weights", default=True, kind="global", type="bool",
                doc="divide the weights by their sum"),
        Tunable("eps", default=1e-8, low=0.0, low_open=True, kind="global", searchable=False,
                doc="numerical floor for norms"),
    )

    def _merge(self, tensors, base_index, model_params, global_params, generator):
        import torch

        others = [i for i in range(len(tensors)) if i != base_index]
        if len(others) == 1:
            return tensors[others[0]]
        eps = global_params["eps"]
        base = tensors[base_index] if base_index is not None else None
        x = torch.stack([tensors[i] for i in others], dim=0)
        if base is not None:
            x -= base
        flat = x.view(x.shape[0], -1)
        w = torch.tensor([model_params[i]["weight"] for i in others], dtype=x.dtype, device=x.device)
        if global_params["normalize_weights"]:
            w = w / w.sum()
        norms = torch.norm(flat, dim=-1, keepdim=True)
        units = flat / (norms + eps)
        mean = (units * w.view(-1, 1)).sum(0)
        mean_norm = torch.norm(mean)
        if mean_norm < eps:
            if x.shape[0] != 2:
                raise ConfigError(
                    "multislerp: the weighted mean direction of the inputs is zero (antipodal models whose "
                    "weights cancel)", where="models[*].parameters.weight",
                    fix="use other weights for these models")
            out = (x[0] * w[0] + x[1] * w[1]).view(x.shape[1:])
            return out + base if base is not None else out
        mean = mean / mean_norm
        dots = (units * mean).sum(-1, keepdim=True)
        tangent = ((units - dots * mean) * w.view(-1, 1)).sum(0)
        r = torch.norm(tangent) + eps
        result = mean * torch.cos(r) + tangent * (torch.sin(r) / r)
        result = (result * (norms.squeeze(-1) * w).sum()).view(x.shape[1:])
        return result + base if base is not None else result
