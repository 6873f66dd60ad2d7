"""The layer-path search (`method: layer_path`): which layers a token runs through, searched.

Why it exists: data-flow-space merging (Sakana's DFS half) needs an encoding an Optuna sampler can
work with and that always gives a path mergekit can build. A candidate is the anchor's own path
(every layer once, in order) changed by up to `edits` edits. Edit k is the parameters
`layer_path.op.k` (none, repeat, swap, skip), `layer_path.start.k` and `layer_path.length.k` (anchor
layers [start, start + length), clipped to the span), `layer_path.donor.k` (swap) and
`layer_path.gain.k` (repeat, swap). Edits are read against the anchor's layer indices, never against
positions left by earlier edits, so a value means the same in every trial:
- swap puts the donor's layers [start, end) in place of the anchor's (aligned: same indices);
- skip drops them; for a layer that two swaps or skips cover, the later edit wins;
- repeat runs layers [start, end) (as swapped or skipped) a second time right after `end - 1`, each
  repeated step with the repeat's gain (RYS: a middle run twice).
The span never includes the anchor's first or last layer, so every path begins and ends with the
anchor (mergekit's embeddings come from the first slice, the norm and head from the last). A gain g
scales the step's residual branches (engine/layer_path.py: exported as passthrough `scale` on o_proj
and down_proj, Sakana's junction scaling by the pre-norm identity); 1 writes no scale.

`build_path_recipe(space, params)` is the pure params -> passthrough recipe `build_recipe` calls;
`seed_params` gives the seeds queued first (identity, an RYS repeat of the middle, a swap of the middle
from each donor, the space's own seeds); `layer_path_setup` reads the space file's `layer_path:`
section; `describe` gives `evomerge validate` the depth and parameter range.
"""

from __future__ import annotations

import difflib
from dataclasses import replace
from typing import Any, Literal

from pydantic import Field

from evomerge.errors import ConfigError
from evomerge.engine.layer_path import Step, check_gains, check_path, describe as describe_steps, path_recipe, path_steps
from evomerge.search.space import (LAYER_PATH, PATH_OPS, LayerPathSetup, ModelRef, PathEdit, SearchSpace, Strict)

MAX_SWAP_SEEDS = 3  # donors that get a swap seed of their own


class IntRange(Strict):
    low: int = Field(ge=1)
    high: int = Field(ge=1)


class FloatRange(Strict):
    low: float = Field(gt=0)
    high: float = Field(gt=0)


class RawLayerPath(Strict):
    """The space file's `layer_path:` section (every key optional)."""

    anchor: str | None = None  # a model name; default: the first model
    edits: int = Field(2, ge=1, le=16)
    ops: list[Literal["repeat", "swap", "skip"]] | None = None  # default: all (swap only with a donor)
    layers: tuple[int, int] | None = None  # anchor layers [first, end) edits may cover; default [1, N-1)
    length: int | IntRange | None = None  # layers per edit; default 1 to max(2, N // 4), within the span
    gain: float | FloatRange | None = None  # default: none (gain 1, exact)
    seeds: list[list[PathEdit]] = []  # candidates of your own, queued first (at most `edits` edits each)


# --- the space file's section ----------------------------------------------------------------------
def layer_path_setup(raw: RawLayerPath | None, models: list[ModelRef], base: ModelRef | None,
                     method_names: list[str], source: str) -> LayerPathSetup | None:
    """The `layer_path:` section resolved against the models (layer counts and architecture read from
    their checkpoints' headers), or None when `layer_path` is not the searched method."""
    where = f"{source}: layer_path"
    if LAYER_PATH not in method_names:
        if raw is not None:
            raise ConfigError("a layer_path: section, but layer_path is not the searched method", where=where,
                              fix="add method: layer_path, or remove the layer_path: section")
        return None
    if len(method_names) > 1:
        raise ConfigError("layer_path is searched on its own (a path is not a parameter-space merge)",
                          where=f"{source}: method", fix="method: layer_path; for PS+DFS run the PS search first "
                          "and give its merged winner as the anchor (docs/layer_path.md)")
    if base is not None:
        raise ConfigError("a layer path has an anchor, not a base model", where=f"{source}: base_model",
                          fix="remove base_model and name the anchor: layer_path: {anchor: <model name>}")
    raw = raw or RawLayerPath()
    anchor = _anchor(raw, models, where)
    layers, suffixes = _layer_counts(models, source)
    setup = _setup(raw, anchor, [m for m in models if m.name != anchor.name], layers[anchor.path], where)
    if setup.gain is not None:
        check_gains(suffixes, f"{where}.gain")
    for i, seed in enumerate(setup.seeds):
        _seed_path(setup, seed, models, f"{where}.seeds[{i}]")
    return setup


def _anchor(raw: RawLayerPath, models: list[ModelRef], where: str) -> ModelRef:
    if raw.anchor is None:
        return models[0]
    found = next((m for m in models if m.name == raw.anchor), None)
    if found is None:
        close = difflib.get_close_matches(raw.anchor, [m.name for m in models], n=1)
        raise ConfigError(f"anchor {raw.anchor!r} is not one of the models", where=f"{where}.anchor",
                          fix=(f"did you mean {close[0]!r}? " if close else "") +
                              f"name one of: {', '.join(m.name for m in models)}")
    return found


def _layer_counts(models: list[ModelRef], source: str) -> tuple[dict[str, int], list[str]]:
    """Each model's layer count (one architecture, one depth: swaps are aligned), and the anchor's layer
    tensor names; read from the checkpoints' headers."""
    from evomerge.engine.checkpoints import Sources

    fields = {m.path: f"{source}: models[{i}]" for i, m in enumerate(models)}
    sources = Sources.open(fields)
    try:
        sources.check_compatible()
        counts = {m.path: sources.num_layers(m.path) for m in models}
        suffixes = list(sources.checkpoint(models[0].path).layer_suffixes)
    finally:
        sources.close()
    first = models[0]
    for i, m in enumerate(models):
        if counts[m.path] != counts[first.path]:
            raise ConfigError(f"{m.name} has {counts[m.path]} layers, {first.name} {counts[first.path]}: a layer path "
                              "swaps aligned blocks (layer i of a donor for layer i of the anchor)",
                              where=f"{source}: models[{i}]", fix="use models of one architecture and depth")
    return counts, suffixes


def _setup(raw: RawLayerPath, anchor: ModelRef, donors: list[ModelRef], n: int, where: str) -> LayerPathSetup:
    """Ops, span, length and gain checked against the anchor's `n` layers and the donors."""
    if n < 3:
        raise ConfigError(f"the anchor has {n} layers; a path keeps the first and the last, so nothing is left "
                          "to edit", where=f"{where}.anchor", fix="use an anchor with at least 3 layers")
    ops = tuple(raw.ops) if raw.ops else tuple(o for o in PATH_OPS if o != "swap" or donors)
    if not ops or len(set(ops)) != len(ops):
        raise ConfigError("ops must list distinct operations", where=f"{where}.ops", fix="e.g. [repeat, swap, skip]")
    if "swap" in ops and not donors:
        raise ConfigError("swap needs a donor, and the only model is the anchor", where=f"{where}.ops",
                          fix="list a donor under models, or drop swap from ops")
    lo, hi = raw.layers or (1, n - 1)
    if lo < 1 or hi > n - 1 or lo >= hi:
        raise ConfigError(f"layers [{lo}, {hi}] must lie within [1, {n - 1}] and not be empty: the first layer (0) "
                          f"and the last ({n - 1}) stay the anchor's, since mergekit takes the embeddings from the "
                          "first slice and the norm and head from the last", where=f"{where}.layers",
                          fix=f"use layers: [1, {n - 1}] (the end is exclusive) or a narrower range")
    length = _length(raw.length, hi - lo, n, f"{where}.length")
    gain = None
    if raw.gain is not None and raw.gain != 1.0:
        g = raw.gain
        gain = (g.low, g.high) if isinstance(g, FloatRange) else (float(g), float(g))
        if gain[0] > gain[1]:
            raise ConfigError(f"gain low ({gain[0]:g}) is above high ({gain[1]:g})", where=f"{where}.gain",
                              fix="swap them")
    return LayerPathSetup(anchor=anchor.name, layers=n, donors=tuple(d.name for d in donors), edits=raw.edits,
                          ops=ops, span=(lo, hi), length=length, gain=gain,
                          seeds=tuple(tuple(s) for s in raw.seeds))


def _length(raw: int | IntRange | None, width: int, n: int, where: str) -> tuple[int, int]:
    if raw is None:
        return 1, max(1, min(width, max(2, n // 4)))
    low, high = (raw, raw) if isinstance(raw, int) else (raw.low, raw.high)
    if not 1 <= low <= high <= width:
        raise ConfigError(f"length {low}..{high} must lie within 1..{width} (the layers edits may cover)",
                          where=where, fix=f"use length: {{low: 1, high: {width}}} or less")
    return low, high


def _seed_path(setup: LayerPathSetup, edits: tuple[PathEdit, ...], models: list[ModelRef], where: str) -> None:
    """A seed of the space file: at most `edits` edits, each inside the span, of an op the space searches,
    a swap naming a donor; its path checked like every candidate's."""
    if len(edits) > setup.edits:
        raise ConfigError(f"{len(edits)} edits, but candidates make at most {setup.edits}", where=where,
                          fix=f"raise layer_path.edits to {len(edits)} or shorten the seed")
    lo, hi = setup.span
    for j, e in enumerate(edits):
        at = f"{where}[{j}]"
        if e.op != "none" and e.op not in setup.ops:
            raise ConfigError(f"op {e.op!r} is not searched here", where=f"{at}.op", fix=f"use one of: {', '.join(setup.ops)}")
        if not (lo <= e.start and e.start + e.length <= hi):
            raise ConfigError(f"layers [{e.start}, {e.start + e.length}) leave the span [{lo}, {hi}]", where=at,
                              fix="the first and last layers stay the anchor's; out-of-range layers do not exist")
        if e.op == "swap" and e.donor not in setup.donors:
            raise ConfigError(f"swap from {e.donor!r}, which is not a donor", where=f"{at}.donor",
                              fix=f"name one of: {', '.join(setup.donors) or '(none: list a donor model)'}")
    paths = {m.name: m.path for m in models}
    counts = {m.path: setup.layers for m in models}
    check_path(apply_edits(setup, list(edits), paths), paths[setup.anchor], counts, where=where,
               names={m.path: m.name for m in models})


# --- params -> path -> recipe ----------------------------------------------------------------------
def edits_of(setup: LayerPathSetup, params: dict[str, Any]) -> list[PathEdit]:
    """The candidate's edits, read from its flat params (fixed dimensions take their one value)."""
    out = []
    hi = setup.span[1]
    for k in range(setup.edits):
        start = int(params[f"{LAYER_PATH}.start.{k}"])
        length = int(params.get(f"{LAYER_PATH}.length.{k}", setup.length[0]))
        donor = params.get(f"{LAYER_PATH}.donor.{k}", setup.donors[0] if setup.donors else None)
        gain = params.get(f"{LAYER_PATH}.gain.{k}", setup.gain[0] if setup.gain else 1.0)
        out.append(PathEdit(op=params[f"{LAYER_PATH}.op.{k}"], start=start, length=max(1, min(length, hi - start)),
                            donor=donor, gain=float(gain)))
    return out


def apply_edits(setup: LayerPathSetup, edits: list[PathEdit], paths: dict[str, str]) -> list[Step]:
    """The anchor's path with `edits` applied (see the module's docstring); `paths`: model name -> path."""
    anchor = paths[setup.anchor]
    blocks = [[Step(anchor, i)] for i in range(setup.layers)]
    for e in edits:
        if e.op in ("swap", "skip"):
            for i in range(e.start, e.start + e.length):
                blocks[i] = [] if e.op == "skip" else [Step(paths[e.donor], i, _gain(e.gain))]
    steps: list[Step] = []
    for i, block in enumerate(blocks):
        steps += block
        for e in edits:
            if e.op == "repeat" and e.start + e.length - 1 == i:
                steps += [replace(s, gain=_gain(e.gain)) for j in range(e.start, e.start + e.length) for s in blocks[j]]
    return steps


def _gain(gain: float) -> float | None:
    """The step's gain as exported: None for 1 (no scale written), else rounded to 4 decimals."""
    g = round(float(gain), 4)
    return None if g == 1.0 else g


def path_of(space: SearchSpace, params: dict[str, Any]) -> list[Step]:
    """The candidate's steps, checked (a path mergekit and the resident model can both build)."""
    setup = space.layer_path
    paths = {m.name: m.path for m in space.models}
    steps = apply_edits(setup, edits_of(setup, params), paths)
    check_path(steps, paths[setup.anchor], {m.path: setup.layers for m in space.models},
               names={m.path: m.name for m in space.models})
    return steps


def build_path_recipe(space: SearchSpace, params: dict[str, Any]):
    """Params -> the mergekit passthrough recipe of the candidate's path (pure)."""
    return path_recipe(path_of(space, params), dtype=space.dtype, out_dtype=space.out_dtype)


# --- seeds -------------------------------------------------------------------------------------------
def seed_params(space: SearchSpace) -> list[tuple[str, dict[str, Any]]]:
    """(label, params) of the seeds queued first: the identity path, an RYS repeat of the middle run, a
    swap of the middle run from each donor (at most MAX_SWAP_SEEDS), then the space's own seeds."""
    setup = space.layer_path
    lo, hi = setup.span
    length = setup.length[1]
    middle = lo + (hi - lo - length) // 2
    seeds: list[tuple[str, list[PathEdit]]] = [("identity", [])]
    if "repeat" in setup.ops:
        seeds.append((f"repeat {middle}-{middle + length - 1}", [PathEdit(op="repeat", start=middle, length=length)]))
    if "swap" in setup.ops:
        for donor in setup.donors[:MAX_SWAP_SEEDS]:
            seeds.append((f"swap {middle}-{middle + length - 1} from {donor}",
                          [PathEdit(op="swap", start=middle, length=length, donor=donor)]))
    seeds += [(f"seed {i + 1}", list(s)) for i, s in enumerate(setup.seeds)]
    return [(f"baseline:{LAYER_PATH} {label}", _params(setup, edits)) for label, edits in seeds]


def _params(setup: LayerPathSetup, edits: list[PathEdit]) -> dict[str, Any]:
    """The flat params of `edits` (slots past them: op none), each value inside its dimension."""
    gain1 = 1.0 if setup.gain is None or setup.gain[0] <= 1.0 <= setup.gain[1] else sum(setup.gain) / 2
    padded = list(edits) + [PathEdit(op="none", start=setup.span[0], length=setup.length[0])] * (setup.edits - len(edits))
    params: dict[str, Any] = {}
    for dim in setup.dimensions():
        _, field, k = dim.name.split(".")
        e = padded[int(k)]
        if field == "donor":
            params[dim.name] = e.donor or setup.donors[0]
        elif field == "gain":
            params[dim.name] = e.gain if e.gain != 1.0 else gain1
        else:
            params[dim.name] = getattr(e, field)
    return params


# --- what validate and best.yaml show ---------------------------------------------------------------
def describe(space: SearchSpace) -> list[str]:
    """`evomerge validate`'s lines: the anchor, donors and edits; the depth range and parameter range."""
    setup = space.layer_path
    anchor = next(m for m in space.models if m.name == setup.anchor)
    non_layer, per_layer = parameter_counts(anchor.path)
    n, (lo, hi) = setup.layers, setup.span
    longest = min(setup.length[1], hi - lo)
    shallow = n - min(hi - lo, setup.edits * longest) if "skip" in setup.ops else n
    deep = n + setup.edits * longest if "repeat" in setup.ops else n
    gain = "gain 1" if setup.gain is None else f"gain {setup.gain[0]:g}-{setup.gain[1]:g}"
    return [f"layer path  anchor {setup.anchor} ({n} layers), donors {', '.join(setup.donors) or 'none'}; "
            f"{setup.edits} edits of {'/'.join(setup.ops)} over layers {lo}-{hi - 1}, length "
            f"{setup.length[0]}-{setup.length[1]}, {gain}",
            f"depth       {shallow} to {deep} layers (identity {n}); parameters {_millions(non_layer + shallow * per_layer)}"
            f" to {_millions(non_layer + deep * per_layer)} (identity {_millions(non_layer + n * per_layer)})"]


def parameter_counts(path: str) -> tuple[int, int]:
    """(parameters outside the layers, parameters of one layer) of a checkpoint, from its headers."""
    from evomerge.engine.checkpoints import Sources

    sources = Sources.open([path])
    try:
        ck = sources.checkpoint(path)
        non_layer = sum(_numel(ck.tensors[name].shape) for name in ck.non_layer)
        per_layer = sum(_numel(ck.tensors[ck.layer_name(0, s)].shape) for s in ck.layer_suffixes)
    finally:
        sources.close()
    return non_layer, per_layer


def path_parameters(space: SearchSpace, steps: list[Step]) -> int:
    """Parameters of the model a path exports (layers of one size: the anchor's)."""
    anchor = next(m for m in space.models if m.name == space.layer_path.anchor)
    non_layer, per_layer = parameter_counts(anchor.path)
    return non_layer + len(steps) * per_layer


def path_comment(space: SearchSpace, recipe) -> str:
    """best.yaml's comment line: the path of a passthrough recipe, its depth and parameter count."""
    steps = path_steps(recipe)
    names = {m.path: m.name for m in space.models}
    return (f"layer path: {describe_steps(steps, names)} ({len(steps)} layers, "
            f"{_millions(path_parameters(space, steps))} parameters)")


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _millions(n: int) -> str:
    return f"{n / 1e6:.2f}M"


__all__ = ["RawLayerPath", "apply_edits", "build_path_recipe", "describe", "edits_of", "layer_path_setup",
           "path_comment", "path_of", "path_parameters", "seed_params"]
