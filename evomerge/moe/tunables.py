"""What a search may tune when it builds an MoE: the construction declared like a merge method's tunables.

Why it exists: the search space reads every method's tunables (names, bounds, defaults, what is per
model and what is global) from one declaration, and so does it for `method: moe`. An MoE is not a
tensor merge, so `MoEConstruction` only declares; `moe/build.py` builds. The per-model values belong
to each candidate expert (every listed model; the base donates attention and embeddings and is an
expert only when it is listed too):

- `use` (true/false): whether the model is one of the experts. A candidate with fewer than two
  experts is not an MoE and is refused (a failed trial, no merge).
- `residual_scale`: the expert's down projection is multiplied by it (mergekit-moe's residual_scale).
- `noise_scale`: Gaussian noise of this standard deviation is added to the expert's weights.

Global: `experts_per_token` (the router's top-k; clipped to the number of experts used) and
`gate_mode` (how the router is placed: hidden, cheap_embed, random, uniform_random).

Defaults are the naive MoE a user would write: every expert, 2 per token, hidden-state routers, no
scaling, no noise. That is the search's baseline.
"""

from __future__ import annotations

from typing import ClassVar

from evomerge.engine.methods.base import MergeMethod, Tunable
from evomerge.moe.config import GATE_MODES

NAME = "moe"


class MoEConstruction(MergeMethod):
    name: ClassVar[str] = NAME
    requires_base = True  # the base donates attention, norms, embeddings and the tokenizer
    model_count = (2, None)  # candidate experts
    base_takes_model_params = True  # a listed base is a candidate expert like any other
    reference_url = "https://github.com/arcee-ai/mergekit/blob/main/docs/moe.md"
    tensor_params = (
        Tunable("use", default=True, type="bool", doc="the model is one of the experts"),
        Tunable("residual_scale", default=1.0, low=0.0, low_open=True, search_low=0.5, search_high=1.5,
                doc="multiplies the expert's down projection"),
        Tunable("noise_scale", default=None, low=0.0, search_low=0.0, search_high=0.01,
                doc="standard deviation of noise added to the expert's weights"),
    )
    global_params = (
        Tunable("experts_per_token", default=2, low=1, type="int", kind="global", search_low=1, search_high=2,
                doc="experts each token is routed to"),
        Tunable("gate_mode", default="hidden", type="str", options=(*GATE_MODES, "hidden_avg"), kind="global",
                doc="how the router weights are placed"),
    )

    def _merge(self, *args, **kwargs):  # pragma: no cover - never called: MoEs are built by moe/build.py
        raise NotImplementedError("an MoE is built by evomerge.moe.build, not merged tensor by tensor")


MOE = MoEConstruction()

__all__ = ["MOE", "MoEConstruction", "NAME"]
