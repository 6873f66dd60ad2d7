"""Karcher mean: the Riemannian (geodesic) mean of the models' directions, at their mean norm.

mergekit 0.1.5 `karcher`, per output tensor, all models weighted equally (no base role):

    u_i = x_i / |x_i| (norms in float32, float64 stays float64; zero tensors give zero directions;
          models with |x_i| <= tol are left out of the direction)
    m   = normalised weighted mean of the u_i (the first u if that mean is ~0)
    repeat max_iter times: tangent = sum_i a_i theta_i / sin(theta_i) (u_i - cos(theta_i) m), over
          the u_i with theta_i = acos(<m, u_i>) >= tol; stop when |tangent| < tol; else step along
          the geodesic by |tangent| and renormalise
    result = (sum_i a_i |x_i|) * m

`max_iter` (10) and `tol` (1e-5) are mergekit's. A base_model that is not listed among the models is
refused: mergekit would silently average it in as one more model.
"""

from __future__ import annotations

from evomerge.engine.methods.base import MergeMethod, Tunable
from evomerge.errors import ConfigError


def karcher_mean(tensors, alphas, max_iter: int = 10, tol: float = 1e-5):
    import torch

    if len(tensors) == 1:
        return tensors[0].clone()
    norm_dtype = torch.float64 if tensors[0].dtype == torch.float64 else torch.float32
    norms, units = [], []
    for x in tensors:
        norm = torch.linalg.vector_norm(x.to(norm_dtype))
        norms.append(norm)
        units.append(torch.zeros_like(x) if norm.item() == 0.0 else (x / norm).to(x.dtype))
    valid = [i for i, n in enumerate(norms) if n.item() > tol]
    if not valid:
        return sum(x * 0 for x in tensors)
    total = sum(alphas[i] for i in valid)
    weights = [alphas[i] / total for i in valid]
    dirs = [units[i] for i in valid]
    mean = torch.zeros_like(dirs[0])
    for a, u in zip(weights, dirs):
        mean += a * u
    mean_norm = torch.linalg.vector_norm(mean.to(norm_dtype))
    mean = dirs[0].clone() if mean_norm.item() < tol else (mean / mean_norm).to(mean.dtype)
    for _ in range(max_iter):
        tangent = torch.zeros_like(mean)
        for a, u in zip(weights, dirs):
            dot = torch.clamp(torch.dot(mean.flatten(), u.flatten()), -1.0, 1.0)
            theta = torch.arccos(dot)
            if theta.item() < tol:
                continue
            tangent += a * (theta / torch.sin(theta)) * (u - dot * mean)
        step = torch.linalg.vector_norm(tangent.to(norm_dtype))
        if step.item() < tol:
            break
        mean = (torch.cos(step) * mean + torch.sin(step) * (tangent / step)).to(mean.dtype)
        length = torch.linalg.vector_norm(mean.to(norm_dtype))
        if length.item() > tol:
            mean = (mean / length).to(mean.dtype)
    scale = sum(a * n for a, n in zip(alphas, norms))
    return (scale * mean).to(tensors[0].dtype)  # a no-op but for 0-d tensors (float32 scale wins there)


class Karcher(MergeMethod):
    name = "karcher"
    model_count = (1, None)
    reference_url = "https://arxiv.org/abs/2603.04972"
    tensor_params = ()
    global_params = (
        Tunable("max_iter", default=10, low=1, kind="global", type="int", searchable=False,
                doc="most geodesic steps"),
        Tunable("tol", default=1e-5, low=0.0, low_open=True, kind="global", searchable=False,
                doc="convergence tolerance (and the norm below which a model has no direction)"),
    )

    def check_models(self, models, base, where="models", *, append_base=True):
        if append_base and base is not None and base not in models:
            raise ConfigError(
                f"karcher treats every model alike and has no base, but base_model {base!r} is not among "
                "the models (mergekit would silently average it in as one more model)",
                where="base_model",
                fix="drop base_model, or list it under models if it should be averaged in")
        return super().check_models(models, base, where, append_base=append_base)

    def _merge(self, tensors, base_index, model_params, global_params, generator):
        n = len(tensors)
        return karcher_mean(tensors, [1.0 / n] * n, max_iter=int(global_params["max_iter"]),
                            tol=global_params["tol"])
