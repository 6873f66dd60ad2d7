"""Per-layer config fields rebuilt for a new stack of layers (frankenmerges, layer paths).

Why it exists: a `slices:` merge changes the layer count, and some configs list one entry per layer
(`layer_types` of Qwen2, Mistral-style sliding-window models and Gemma; `no_rope_layers`; per-layer
`intermediate_size` lists). transformers refuses a config whose list has another length than
`num_hidden_layers` ("`num_hidden_layers` (6) must be equal to the number of `layer_types` (4)"),
and a list truncated or padded by hand would give a layer the wrong attention type. mergekit 0.1.5
copies the donor's config unchanged apart from the layer count, so its output of such a model does
not load; evomerge rebuilds each list from the layers the output actually stacks: output layer i
takes entry `l` of its source model's list, where `l` is the source layer it was read from.

Rule: a top-level config value is per-layer when it is a list whose length equals the donor's layer
count, except fields that are token ids or names (`architectures`, `*_token_id(s)`, `bad_words_ids`,
`suppress_tokens`, ...). Lists of layer *indices* (`mlp_only_layers: [0, 3]`) are not per-layer lists
and are left as they are. `plan.py` applies this to the output config of every `slices:` merge, so the
search's in-memory path model (which takes the exported config) and `evomerge merge` agree.
"""

from __future__ import annotations

from typing import Iterable

NOT_PER_LAYER = ("architectures", "bad_words_ids", "suppress_tokens", "begin_suppress_tokens",
                 "forced_decoder_ids", "begin_suppress_token_ids")


def per_layer_keys(config: dict) -> list[str]:
    """The top-level keys of `config` that hold one entry per layer."""
    n = config.get("num_hidden_layers") or config.get("n_layer")
    if not isinstance(n, int) or n < 1:
        return []
    return [k for k, v in config.items()
            if isinstance(v, list) and len(v) == n and k not in NOT_PER_LAYER
            and not k.endswith(("_token_id", "_token_ids"))]


def restack(out_config: dict, donor_config: dict, origins: Iterable[tuple[dict, int]]) -> dict:
    """`out_config` with every per-layer list of `donor_config` rebuilt for the output's layers.

    `origins` gives, for each output layer in order, (the config of the model it is read from, the
    layer index in that model). A source config without that per-layer list lends the donor's entry at
    that index. Returns a new dict; `out_config` is not changed."""
    origins = list(origins)
    out = dict(out_config)
    for key in per_layer_keys(donor_config):
        donor_list = donor_config[key]
        values = []
        for config, layer in origins:
            own = config[key] if key in per_layer_keys(config) else donor_list
            values.append(own[min(layer, len(own) - 1)])
        out[key] = values
    return out


__all__ = ["NOT_PER_LAYER", "per_layer_keys", "restack"]
