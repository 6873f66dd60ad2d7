"""Linear merging: a weighted average (or weighted sum) of the input tensors.

mergekit 0.1.5 `linear`: every input, the base model included when it is an input, needs a
`weight`; `normalize` (default TRUE) divides by the sum of the weights. The sum is accumulated in
float32 (float64 for float64 inputs) with the weights cast to that dtype, then cast back to the
input dtype:

    result = (sum_i float(weight_i) * x_i) / sum_i float(weight_i)      (normalize)

A base model has no special role. With normalize, weights summing to zero are a ConfigError
(mergekit would silently produce inf/NaN).
"""

from __future__ import annotations

from evomerge.errors import ConfigError
from evomerge.engine.methods.base import MergeMethod, Tunable


class Linear(MergeMethod):
    name = "linear"
    requires_base = False
    model_count = (1, None)
    base_takes_model_params = True
    reference_url = "https://arxiv.org/abs/2203.05482"
    tensor_params = (
        Tunable(
            "weight",
            default=None,
            required=True,
            kind="model",
            search_low=0.0,
            search_high=1.0,
            doc="this model's coefficient; any finite number",
        ),
    )
    global_params = (
        Tunable(
            "normalize",
            default=True,
            kind="global",
            type="bool",
            doc="divide by the sum of the weights",
        ),
    )

    def check_tensor(self, models, base, model_params, global_params, tensor):
        import torch

        if not self._resolve_global(global_params or {})["normalize"]:
            return
        weights = [self._resolve_model(m, None, model_params.get(m) or {})["weight"] for m in models]
        if float(torch.tensor(weights, dtype=torch.float32).sum()) == 0.0:  # the sum `_merge` divides by
            raise ConfigError(
                f"linear weights sum to zero for tensor {tensor!r}, so normalize divides by zero",
                where="models[*].parameters.weight",
                fix="use weights with a non-zero sum, or set normalize: false",
            )

    def _merge(self, tensors, base_index, model_params, global_params, generator):
        import torch

        first = tensors[0]
        work = torch.float64 if first.dtype == torch.float64 else torch.float32
        weights = torch.tensor([p["weight"] for p in model_params], dtype=work, device=first.device)
        shape = (1,) * first.dim()
        result = torch.zeros_like(first, dtype=work)
        for tensor, coefficient in zip(tensors, weights.unbind(0)):
            result.addcmul_(tensor, coefficient.reshape(shape))
        if global_params["normalize"]:
            total = weights.sum()
            if float(total) == 0.0:
                raise ConfigError(
                    "linear weights sum to zero, so normalize divides by zero",
                    where="models[*].parameters.weight",
                    fix="use weights with a non-zero sum, or set normalize: false",
                )
            result.div_(total.reshape(shape))
        return result.to(first.dtype)
