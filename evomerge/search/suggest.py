"""Between Optuna and mergekit: trial -> Params -> MergeRecipe.

Why it exists: this is the seam of the search. `suggest_params` is the ONLY caller of
`trial.suggest_*` (so a `FixedTrial`, an enqueued baseline and a real trial all go through the same
code), and it returns a flat `Params` dict named as `SearchSpace.dimensions` says. `build_recipe` is a
pure function from (space, params) to a mergekit recipe: the winner's `best.yaml` is rebuilt from the
stored params by the same function that built the scored candidate. `baseline_params` gives the naive
recipes (uniform weights, t = 0.5, default TIES) that are enqueued as the first trials.
"""

from __future__ import annotations

import math
from typing import Any

from evomerge.search.space import REST, ParamSpec, SearchSpace

Params = dict[str, Any]  # flat: optuna parameter name -> float | bool | str


def suggest_params(trial, space: SearchSpace) -> Params:
    """Ask the trial for every searched value of the space (the method first when it is searched)."""
    params: Params = {}
    if len(space.methods) > 1:
        method = trial.suggest_categorical("method", list(space.method_names))
        params["method"] = method
    else:
        method = space.methods[0].name
    for dim in space.dimensions(method):
        if dim.choices is not None:
            params[dim.name] = trial.suggest_categorical(dim.name, list(dim.choices))
        elif dim.integer:
            params[dim.name] = trial.suggest_int(dim.name, int(dim.low), int(dim.high), log=dim.log)
        else:
            params[dim.name] = trial.suggest_float(dim.name, dim.low, dim.high, log=dim.log)
    return params


def method_of(space: SearchSpace, params: Params) -> str:
    if len(space.methods) == 1:
        return space.methods[0].name
    try:
        return params["method"]
    except KeyError:
        raise KeyError("params lack 'method' although the space searches the method") from None


def _setting(space: SearchSpace, method: str, spec: ParamSpec, owner: str | None, params: Params) -> Any:
    """The recipe value of one tunable for one owner (a model name, or None for global/shared)."""
    if spec.fixed is not None:
        return spec.fixed
    prefix = [method, spec.name] + ([owner] if owner else [])

    def value(group: str | None) -> Any:
        base = prefix + ([group] if group else [])
        if spec.points == 1:
            return params[".".join(base)]
        return [params[".".join(base + [str(k)])] for k in range(spec.points)]

    if not spec.filters:
        return value(None)
    entries = [{"filter": f, "value": value(f)} for f in spec.filters]
    entries.append({"value": value(REST)})
    return entries


def build_recipe(space: SearchSpace, params: Params):
    """Params -> MergeRecipe, or an MoEConfig for `method: moe` (pure: the same inputs always give the
    same recipe)."""
    from evomerge.engine.recipe import MergeRecipe
    from evomerge.moe.tunables import NAME as MOE
    from evomerge.search.layer_path import build_path_recipe
    from evomerge.search.space import LAYER_PATH, method_impl

    method = method_of(space, params)
    if method == MOE:
        return _moe_config(space, params)
    if method == LAYER_PATH:
        return build_path_recipe(space, params)
    impl = method_impl(method)
    mspace = space.method(method)
    base, inputs = space.roles(method)
    tuned = {m.name for m in space.tuned_models(method)}
    model_specs = [s for s in mspace.params if s.kind == "model"]
    global_specs = [s for s in mspace.params if s.kind == "global"]

    models = []
    for m in inputs:
        mparams = {}
        if m.name in tuned:
            for spec in model_specs:
                owner = None if spec.shared else m.name
                mparams[spec.name] = _setting(space, method, spec, owner, params)
        models.append({"model": m.path, **({"parameters": mparams} if mparams else {})})
    glob = {spec.name: _setting(space, method, spec, None, params) for spec in global_specs}
    data: dict[str, Any] = {"merge_method": method, "models": models, "dtype": space.dtype}
    if space.out_dtype:
        data["out_dtype"] = space.out_dtype
    if base is not None:
        data["base_model"] = base.path
    if glob:
        data["parameters"] = glob
    if impl.uses_generator:
        data["random_seed"] = space.budget.seed
    return MergeRecipe.from_dict(data, source=f"trial params {params}")


def _moe_config(space: SearchSpace, params: Params):
    """Params -> the mergekit-moe config of one candidate MoE (experts in the space's model order)."""
    from evomerge.errors import ConfigError
    from evomerge.moe.config import MoEConfig
    from evomerge.moe.tunables import MOE, NAME

    specs = {s.name: s for s in space.method(NAME).params}

    def value(name: str, owner: str | None = None) -> Any:
        spec = specs.get(name)
        if spec is None:
            return MOE.tunable(name).default
        return _setting(space, NAME, spec, None if spec.shared else owner, params)

    setup = space.moe
    experts = []
    for m in space.tuned_models(NAME):
        if not value("use", m.name):
            continue
        e: dict[str, Any] = {"source_model": m.path}
        if setup is not None and m.name in setup.prompts:
            e["positive_prompts"] = list(setup.prompts[m.name])
        if setup is not None and m.name in setup.negative_prompts:
            e["negative_prompts"] = list(setup.negative_prompts[m.name])
        for name in ("noise_scale", "residual_scale"):
            if name in specs:  # only what the space sets (mergekit-moe's default: no noise, no scaling)
                e[name] = float(value(name, m.name))
        experts.append(e)
    if len(experts) < 2:
        used = ", ".join(m.name for m in space.tuned_models(NAME) if value("use", m.name)) or "none"
        raise ConfigError(f"this candidate uses fewer than two experts ({used}), which is not an MoE; the trial "
                          "fails without a merge", where="parameters.moe.use",
                          fix="none needed (the sampler learns to avoid it); fix use: true for models that must "
                              "take part")
    data = {
        "base_model": space.base.path,
        "gate_mode": value("gate_mode"),
        "dtype": space.score_dtype,
        "experts_per_token": min(int(value("experts_per_token")), len(experts)),
        "experts": experts,
        "random_seed": space.budget.seed,
    }
    return MoEConfig.from_dict(data, source=f"trial params {params}")


def baseline_params(space: SearchSpace) -> list[tuple[str, Params]]:
    """(label, params) of the naive recipe of each method: every searched value at its baseline
    (the method default inside the range, else the middle: t = 0.5; equal weights); for a layer path,
    its seeds (search/layer_path.py: the identity path, an RYS repeat, swaps)."""
    if space.layer_path is not None:
        from evomerge.search.layer_path import seed_params

        return seed_params(space)
    out = []
    for mspace in space.methods:
        params: Params = {}
        if len(space.methods) > 1:
            params["method"] = mspace.name
        specs = {s.name: s for s in mspace.params}
        for dim in space.dimensions(mspace.name):
            spec = specs[dim.name.split(".")[1]]
            params[dim.name] = baseline_value(spec)
        out.append((f"baseline:{mspace.name}", params))
    return out


def baseline_value(spec: ParamSpec, n_models: int = 1) -> Any:
    """The naive value a user would type: the method's default when it is inside the searched range,
    else the middle of the range (t = 0.5); for a choice, the default or the first choice."""
    if spec.fixed is not None:
        return spec.fixed
    if spec.choices is not None:
        return spec.default if spec.default in spec.choices else spec.choices[0]
    default = spec.default
    if isinstance(default, (int, float)) and not isinstance(default, bool):
        if spec.low <= default <= spec.high and math.isfinite(default):
            return float(default)
    if spec.log:
        return float(math.sqrt(spec.low * spec.high))
    return (spec.low + spec.high) / 2


def parent_recipes(space: SearchSpace) -> list[tuple[str, Any]]:
    """(label, recipe) that reproduce each source model unchanged (linear, weight 1), for the report."""
    from evomerge.engine.recipe import MergeRecipe

    parents = list(space.models)
    if space.base is not None and space.base.path not in {m.path for m in parents}:
        parents.insert(0, space.base)
    out = []
    for m in parents:
        recipe = MergeRecipe.from_dict(
            {"merge_method": "linear", "models": [{"model": m.path, "parameters": {"weight": 1.0}}],
             "dtype": space.dtype, **({"out_dtype": space.out_dtype} if space.out_dtype else {})}
        )
        out.append((f"parent:{m.name}", recipe))
    return out


NAIVE_LAMBDAS = (0.25, 0.5, 0.75, 1.0, 1.25, 1.5)
# the sparsifying task-vector methods every result is compared with, at mergekit's defaults (weight 1) and
# the density people type (mergekit's own default, 1, would not sparsify at all)
NAIVE_SPARSE = (("ties", {"density": 0.5}), ("dare_ties", {"density": 0.5}),
                ("della", {"density": 0.5, "epsilon": 0.15}))


def naive_recipes(space: SearchSpace) -> tuple[list[tuple[str, Any]], list[tuple[str, Any]]]:
    """The naive merges a result should beat, as (label, recipe): uniform linear over the models, slerp
    t = 0.5 (two models), TIES, DARE-TIES and DELLA at mergekit's defaults (with a base; a method the
    space searches has its own baseline trial instead), and, second, the grid of task
    arithmetic recipes (unit weights, lambda in NAIVE_LAMBDAS; with a base) whose best on the search
    split is the strongest simple baseline in the literature."""
    from evomerge.engine.recipe import MergeRecipe

    models = [m for m in space.models if space.base is None or m.path != space.base.path]
    dtypes = {"dtype": space.dtype, **({"out_dtype": space.out_dtype} if space.out_dtype else {})}
    fixed: list[tuple[str, Any]] = []
    grid: list[tuple[str, Any]] = []
    if len(space.models) >= 2:
        fixed.append(("naive:linear (uniform)", MergeRecipe.from_dict(
            {"merge_method": "linear", "models": [{"model": m.path, "parameters": {"weight": 1.0}}
                                                  for m in space.models], **dtypes})))
    searched = set(space.method_names)  # a searched method's own baseline trial is its naive recipe already
    if len(space.models) == 2 and "slerp" not in searched:
        a, b = space.models
        fixed.append(("naive:slerp (t 0.5)", MergeRecipe.from_dict(
            {"merge_method": "slerp", "base_model": a.path, "models": [{"model": a.path}, {"model": b.path}],
             "parameters": {"t": 0.5}, **dtypes})))
    for method, params in NAIVE_SPARSE:
        if space.base is None or not models or method in searched:
            continue
        entries = [{"model": m.path, "parameters": {"weight": 1.0, **params}} for m in models]
        seed = {"random_seed": space.budget.seed} if method != "ties" else {}  # DARE and DELLA draw
        label = ", ".join(f"{k} {v:g}" for k, v in params.items())
        fixed.append((f"naive:{method} (mergekit defaults, {label})", MergeRecipe.from_dict(
            {"merge_method": method, "base_model": space.base.path, "models": entries, **seed, **dtypes})))
    if space.base is not None and models:
        for lam in NAIVE_LAMBDAS:
            grid.append((f"naive:task_arithmetic lambda {lam:g}", MergeRecipe.from_dict(
                {"merge_method": "task_arithmetic", "base_model": space.base.path,
                 "models": [{"model": m.path, "parameters": {"weight": 1.0}} for m in models],
                 "parameters": {"lambda": lam}, **dtypes})))
    return fixed, grid


def reference_recipes(space: SearchSpace) -> list[tuple[str, dict]]:
    """(label, recipe dict) of the models `fitness: anchors` learns its anchor items from: the parents,
    the baseline recipe of each method, and the fixed naive merges that draw nothing (DARE's and DELLA's
    random drops would only add noise to the references' answer patterns)."""
    refs = [(label, r.to_dict()) for label, r in parent_recipes(space)]
    refs += [(label, build_recipe(space, params).to_dict()) for label, params in baseline_params(space)]
    refs += [(label, r.to_dict()) for label, r in naive_recipes(space)[0] if r.random_seed is None]
    return refs
