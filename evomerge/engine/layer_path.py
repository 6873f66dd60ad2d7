"""A layer path: the layers a token runs through, in order, and the mergekit passthrough recipe of it.

Why it exists: data-flow-space merging (Sakana's DFS, RYS's repeated middle layers, layer swapping)
searches which layers a token passes through. A path is a list of `Step`s: (model, layer, gain).
Written as a mergekit `passthrough` recipe with `slices:` (one slice per run of consecutive layers of
one model with one gain), it is a plain frankenmerge: `evomerge merge` and `mergekit-yaml` build it,
and the result loads in plain transformers (the per-layer config lists are rebuilt by
`layer_config.py`).

The gain of a step is exported exactly: a step with gain g has its residual branches scaled by g,
i.e. its `self_attn.o_proj` and `mlp.down_proj` (weights and biases, `GAIN_FILTERS`) multiplied by g
through passthrough's per-source `scale` with filters. In a pre-norm block both branch inputs are
normalised, so this is the same model, up to the norms' epsilon, as Sakana's junction scaling of the
residual stream by 1/g on entering the step and by g on leaving it (scaling the stream entering step
k by w_k is the same as multiplying that step's o_proj and down_proj by 1/prod_{j<=k} w_j). A gain of
1 writes no `scale` (the tensor is copied, not multiplied). Post-norm blocks (Gemma 2/3 normalise the
branch output) would undo the scale: `check_gains` refuses gains for them.

Rules of a path (`check_path`): it is not empty; its first and last steps come from the anchor
(mergekit takes the embeddings from the first slice and the final norm and lm_head from the last, so
any other model there would change the embeddings or the head); every layer exists in its model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterable, Mapping

from evomerge.errors import ConfigError

if TYPE_CHECKING:  # pragma: no cover
    from evomerge.engine.recipe import MergeRecipe

GAIN_FILTERS = ("self_attn.o_proj", "mlp.down_proj")
POST_NORMS = ("post_feedforward_layernorm",)  # a block that normalises its branch outputs (Gemma 2/3)


@dataclass(frozen=True)
class Step:
    """One layer on the path: `layer` of `model` (a path as the recipe names it), its residual branches
    scaled by `gain` (None: unscaled)."""

    model: str
    layer: int
    gain: float | None = None


def runs(steps: Iterable[Step]) -> list[tuple[str, int, int, float | None]]:
    """The path as slices: (model, start, end, gain) for each run of consecutive layers of one model
    with one gain."""
    out: list[list] = []
    for s in steps:
        last = out[-1] if out else None
        if last is not None and last[0] == s.model and last[2] == s.layer and last[3] == s.gain:
            last[2] += 1
        else:
            out.append([s.model, s.layer, s.layer + 1, s.gain])
    return [tuple(r) for r in out]


def path_recipe(steps: list[Step], *, dtype: str | None = None, out_dtype: str | None = None) -> "MergeRecipe":
    """The mergekit passthrough recipe that stacks `steps` (gains as per-source `scale` filters)."""
    from evomerge.engine.recipe import MergeRecipe

    slices = []
    for model, start, end, gain in runs(steps):
        source: dict = {"model": model, "layer_range": [start, end]}
        if gain is not None:
            source["parameters"] = {"scale": [{"filter": f, "value": float(gain)} for f in GAIN_FILTERS]}
        slices.append({"sources": [source]})
    data: dict = {"merge_method": "passthrough", "slices": slices}
    if dtype:
        data["dtype"] = dtype
    if out_dtype:
        data["out_dtype"] = out_dtype
    return MergeRecipe.from_dict(data, source="layer path")


def is_path_recipe(recipe: Mapping) -> bool:
    """A passthrough recipe with `slices:` (a frankenmerge), as a plain dict: the search's worker scores
    it on shared layers instead of merging it into its resident model."""
    return recipe.get("merge_method") == "passthrough" and bool(recipe.get("slices"))


def path_steps(recipe: "MergeRecipe") -> list[Step]:
    """The steps of a passthrough `slices:` recipe written by `path_recipe` (a scale that is not one
    gain on GAIN_FILTERS reads as None)."""
    steps = []
    for sl in recipe.slices or []:
        src = sl.sources[0]
        gain = _gain((src.parameters or {}).get("scale"))
        steps += [Step(src.model, layer, gain) for layer in range(*src.layer_range)]
    return steps


def _gain(setting) -> float | None:
    if not isinstance(setting, list):
        return None
    values = {getattr(c, "filter", None): getattr(c, "value", None) for c in setting}
    gains = {values.get(f) for f in GAIN_FILTERS}
    if set(values) != set(GAIN_FILTERS) or len(gains) != 1:
        return None
    gain = gains.pop()
    return float(gain) if isinstance(gain, (int, float)) else None


def check_path(steps: list[Step], anchor: str, layer_counts: Mapping[str, int], *, where: str = "layer path",
               names: Mapping[str, str] | None = None) -> None:
    """A path the export and the in-memory model can both build: not empty, first and last steps from
    `anchor`, every layer inside its model (`layer_counts`: model -> number of layers). `names` gives
    short names for messages."""
    def name(model: str) -> str:
        return (names or {}).get(model, model)

    if not steps:
        raise ConfigError("the layer path is empty", where=where, fix="keep at least the anchor's first and last layers")
    for end, step in (("first", steps[0]), ("last", steps[-1])):
        if step.model != anchor:
            raise ConfigError(
                f"the {end} layer of the path comes from {name(step.model)}, not from the anchor {name(anchor)}",
                where=where, fix="mergekit takes the embeddings from the first slice and the final norm and "
                                 "lm_head from the last: begin and end the path with the anchor's layers")
    for i, step in enumerate(steps):
        n = layer_counts.get(step.model)
        if n is None:
            raise ConfigError(f"step {i} names {name(step.model)}, which is not a model of this path", where=where,
                              fix=f"use one of: {', '.join(name(m) for m in layer_counts)}")
        if not 0 <= step.layer < n:
            raise ConfigError(f"step {i}: layer {step.layer} is out of range ({name(step.model)} has {n} layers)",
                              where=where, fix=f"use layers 0 to {n - 1}")


def check_gains(layer_suffixes: Iterable[str], where: str) -> None:
    """Gains are only exact for pre-norm blocks whose branches end in GAIN_FILTERS."""
    suffixes = list(layer_suffixes)
    missing = [f for f in GAIN_FILTERS if not any(f in s for s in suffixes)]
    post = [p for p in POST_NORMS if any(p in s for s in suffixes)]
    if missing or post:
        why = (f"its layers have no {', '.join(missing)}" if missing
               else "its blocks normalise their branch outputs (post-norm), which undoes a branch scale")
        raise ConfigError(f"gains cannot be exported for this architecture: {why}", where=where,
                          fix="search without gains (leave gain out: every step keeps gain 1)")


def describe(steps: list[Step], names: Mapping[str, str] | None = None) -> str:
    """`up[0:3] up[1:3]x0.8 up[3:4]`: each slice as model[start:end], with its gain when scaled."""
    parts = []
    for model, start, end, gain in runs(steps):
        label = (names or {}).get(model, model)
        parts.append(f"{label}[{start}:{end}]" + (f"x{gain:.3g}" if gain is not None else ""))
    return " ".join(parts)


__all__ = ["GAIN_FILTERS", "Step", "check_gains", "check_path", "describe", "is_path_recipe", "path_recipe",
           "path_steps", "runs"]
