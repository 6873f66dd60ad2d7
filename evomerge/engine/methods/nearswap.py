"""NearSwap: take the other model's value where it is close to the base's, keep the base elsewhere.

mergekit 0.1.5 `nearswap` (base + exactly one model), per entry, in the inputs' dtype:

    w      = clamp(t / max(|base - other|, 1e-6), 0, 1)
    result = w * other + (1 - w) * base

so entries that differ by less than t are swapped in entirely, and larger differences less and less.
`t` is required (a small distance, e.g. 0.0001).
"""

from __future__ import annotations

from evomerge.engine.methods.base import MergeMethod, Tunable


class NearSwap(MergeMethod):
    name = "nearswap"
    requires_base = True
    model_count = (2, 2)
    base_takes_model_params = False
    reference_url = "https://huggingface.co/alchemonaut/QuartetAnemoi-70B-t0.0001"
    tensor_params = ()
    global_params = (
        Tunable("t", default=None, required=True, low=0.0, kind="global", search_low=0.0, search_high=0.01,
                doc="distance below which the other model's entry replaces the base's"),
    )

    def _merge(self, tensors, base_index, model_params, global_params, generator):
        a = tensors[base_index]
        b = tensors[1 - base_index]
        weight = (global_params["t"] / (a - b).abs().clamp(min=1e-6)).clamp(min=0, max=1)
        return weight * b + (1 - weight) * a
