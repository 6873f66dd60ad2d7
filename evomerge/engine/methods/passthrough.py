"""Passthrough: copy one model's tensor unchanged, optionally multiplied by `scale`.

mergekit 0.1.5 `passthrough` takes exactly one input (frankenmerges list one source per slice;
the engine renames layers, this method only copies). Its per-model `scale` has no default: when
absent the tensor is returned as is, otherwise `tensor * scale` in the tensor's own dtype.
A base model has no special role (with `models:` a listed base_model counts as a second input,
which mergekit rejects too).
"""

from __future__ import annotations

from evomerge.engine.methods.base import MergeMethod, Tunable


class Passthrough(MergeMethod):
    name = "passthrough"
    requires_base = False
    model_count = (1, 1)
    base_takes_model_params = True
    tensor_params = (
        Tunable(
            "scale",
            default=None,
            kind="model",
            search_low=0.0,
            search_high=2.0,
            doc="multiply the tensor by this (absent: unchanged)",
        ),
    )
    global_params = ()

    def _merge(self, tensors, base_index, model_params, global_params, generator):
        scale = model_params[0]["scale"]
        tensor = tensors[0]
        return tensor.clone() if scale is None else tensor * scale
