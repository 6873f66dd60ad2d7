"""SLERP: spherical interpolation between the base model (t=0) and one other model (t=1).

mergekit 0.1.5 `slerp`, per output tensor: both tensors are flattened into single vectors and
worked on in float32 (float64 stays float64). The ANGLE comes from normalised copies (a norm at
or below eps=1e-8 is replaced by 1); the interpolation itself uses the raw vectors:

    dot   = clamp(<a/|a|, b/|b|>, -1, 1)
    if |dot| > 0.9995 (nearly colinear or antipodal):  result = (1-t) a + t b
    else: theta = acos(dot);  result = sin((1-t) theta)/sin(theta) a + sin(t theta)/sin(theta) b

and the result is cast back to the input dtype. Norms and the dot product are accumulated over
chunks of 2**20 elements exactly as mergekit does, so float32 results match it bit for bit.
`t` is required; exactly two inputs, one of them the base. An empty tensor is interpolated
linearly.
"""

from __future__ import annotations

from evomerge.engine.methods.base import MergeMethod, Tunable

DOT_THRESHOLD = 0.9995
EPS = 1e-8
CHUNK = 1024 * 1024


def slerp(t: float, v0, v1, *, dot_threshold: float = DOT_THRESHOLD, eps: float = EPS):
    """Interpolate tensor `v0` (t=0) towards `v1` (t=1) as flattened vectors; same dtype as v0."""
    import torch

    work = torch.float64 if v0.dtype == torch.float64 else torch.float32
    a = v0.reshape(1, -1)
    b = v1.reshape(1, -1)
    tt = torch.tensor([[t]], dtype=work, device=v0.device)
    n = a.shape[1]
    if n == 0:
        return ((1 - tt) * a + tt * b).reshape(v0.shape).to(v0.dtype)

    def pieces():
        for start in range(0, n, CHUNK):
            yield a[:, start : start + CHUNK].to(work), b[:, start : start + CHUNK].to(work)

    norms_a, norms_b = [], []
    for x, y in pieces():
        norms_a.append(torch.linalg.vector_norm(x, dim=1, keepdim=True))
        norms_b.append(torch.linalg.vector_norm(y, dim=1, keepdim=True))
    norm_a = torch.linalg.vector_norm(torch.stack(norms_a), dim=0)
    norm_b = torch.linalg.vector_norm(torch.stack(norms_b), dim=0)
    norm_a = torch.where(norm_a > eps, norm_a, 1)
    norm_b = torch.where(norm_b > eps, norm_b, 1)
    dots = [((x / norm_a) * (y / norm_b)).sum(dim=1, keepdim=True) for x, y in pieces()]
    dot = torch.stack(dots).sum(dim=0).clamp(-1, 1)
    colinear = dot.abs() > dot_threshold
    theta = torch.acos(torch.where(colinear, 0, dot))
    sin_theta = torch.sin(theta)
    coef_a = torch.where(colinear, 1 - tt, torch.sin((1 - tt) * theta) / sin_theta)
    coef_b = torch.where(colinear, tt, torch.sin(tt * theta) / sin_theta)
    out = torch.empty_like(a)
    for start in range(0, n, CHUNK):
        x = a[:, start : start + CHUNK].to(work)
        y = b[:, start : start + CHUNK].to(work)
        out[:, start : start + CHUNK] = coef_a * x + coef_b * y
    return out.reshape(v0.shape)


class Slerp(MergeMethod):
    name = "slerp"
    requires_base = True
    model_count = (2, 2)
    base_takes_model_params = False
    reference_url = "https://en.wikipedia.org/wiki/Slerp"
    tensor_params = ()
    global_params = (
        Tunable(
            "t",
            default=None,
            required=True,
            low=0.0,
            high=1.0,
            kind="global",
            doc="interpolation factor: 0 = base model, 1 = the other model",
        ),
    )

    def _merge(self, tensors, base_index, model_params, global_params, generator):
        return slerp(global_params["t"], tensors[base_index], tensors[1 - base_index])
