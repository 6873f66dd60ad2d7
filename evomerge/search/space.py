"""The search space: what a search may change, what it optimises, and its budget.

Why it exists: a `space.yaml` is the user's whole description of a search. This module reads it
(strict safe YAML: duplicate keys refused, pydantic with `extra="forbid"`, errors with field paths), resolves model paths and
the objective's task folder, checks every tunable against the merge method's own declaration
(`evomerge.engine.methods`: bounds and defaults are read from there, never repeated here), and produces a
frozen `SearchSpace`. It also OWNS THE PARAMETER NAMES: `SearchSpace.dimensions(method)` lists the
searched dimensions with their Optuna names; `suggest.py` turns them into `trial.suggest_*` calls and
`build_recipe` (in `suggest.py`) turns the values back into a mergekit recipe.

File layout (see search_spaces/ for complete examples):

    name: my_search                     # optional; default: the file name
    models: [./experts/up, {name: rev, path: ./experts/rev}]   # `toy:<skill>` = the embedded toy family
    base_model: ./base                  # needed by ties/dare/task_arithmetic
    dtype: float32
    method: slerp                       # or a list: [linear, slerp, ties] (the method is searched)
    parameters:                         # per method; anything not listed keeps the method's default
      slerp:
        t: {points: 3, filters: [self_attn, mlp]}  # searched gradient, bounds from the method
      ties:
        density: {low: 0.1, high: 1.0}  # searched per model
        weight: 0.5                     # fixed
        normalize: {choices: [true, false]}
    objective:
      tasks_dir: toy                    # a folder of lm-eval task YAML (relative to this file) or `toy`
      tasks: [{task: toy_up, weight: 1, metric: exact_match, direction: maximize}]
      splits: {search: search, select: select, report: report}
    search: {trials: 50, sampler: auto, pruner: none, seed: 0, limit: null, fitness: full, top_k: 5}
    # fitness: full (every item of `limit`) | fidelity (+ fidelity: {limit: 8, factor: 2} and a pruner)
    #          | anchors (+ anchors: {items: 8}); see search/fitness.py

Parameter names: `<method>.<tunable>[.<model>][.<filter>][.<k>]`, e.g. `slerp.t.mlp.2`,
`ties.density.add`, plus `method` when the method itself is searched. `<filter>` is one of the
tunable's filters or `rest` (the unfiltered fallback); `<k>` is the gradient control point.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from evomerge.errors import ConfigError
from evomerge.yamlfile import parse as parse_yaml
from evomerge.yamlfile import read_text
from evomerge.evaluation.protocol import Carve, ScoringProtocol, SplitSpec

SAMPLERS = ("auto", "cmaes", "tpe", "nsga2", "random", "grid")
PRUNERS = ("none", "median", "hyperband", "successive_halving")
REST = "rest"
_NAME_RE = re.compile(r"^[A-Za-z0-9_-]+$")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# --- the resolved, frozen space ------------------------------------------------------------------
class ModelRef(_Strict):
    """A source model: a short name (used in parameter names and reports) and its absolute path."""

    name: str
    path: str


class ParamSpec(_Strict):
    """One tunable of one method, as the space sets it: fixed, searched over a range, or a choice.

    `fixed` (a number, bool, or gradient list) wins when set. Otherwise the value is searched in
    [low, high] (a bool tunable over `choices`). `points` > 1 makes a gradient with that many control
    points interpolated over the layers (mergekit's gradient); `filters` gives separate values for
    tensors whose names contain each filter, plus `rest`. `shared` gives every model the same value
    (per-model tunables only).
    """

    name: str
    kind: Literal["model", "global"]
    type: Literal["float", "int", "bool", "str"]
    fixed: Any = None
    low: float | None = None
    high: float | None = None
    log: bool = False
    choices: tuple[Any, ...] | None = None
    points: int = 1
    filters: tuple[str, ...] = ()
    shared: bool = False
    default: Any = None  # the method's default (used by the baseline)

    @property
    def searched(self) -> bool:
        return self.fixed is None


class MethodSpace(_Strict):
    """A merge method and the way the space sets each of its tunables."""

    name: str
    params: tuple[ParamSpec, ...]


class Task(_Strict):
    task: str
    weight: float = 1.0
    metric: str = "exact_match"
    direction: Literal["maximize", "minimize"] = "maximize"


class Objective(_Strict):
    tasks: tuple[Task, ...]
    tasks_dir: str | None = None  # absolute, resolved
    splits: SplitSpec = SplitSpec()
    protocol: ScoringProtocol = ScoringProtocol()
    multi_objective: bool = False  # one objective per task (Pareto front, NSGA-II)
    reference_items: str | None = None  # JSONL of items no model has seen (membership audit); absolute


class Fidelity(_Strict):
    """Item-count rungs (`fitness: fidelity`): `limit` items per task first, then `factor` times as many,
    up to the search limit; each rung scores only its new items, and the pruner may stop the trial after
    any rung but the last (whose value is the full-limit score)."""

    limit: int = Field(ge=1)
    factor: int = Field(2, ge=2)


class Anchors(_Strict):
    """Anchor items (`fitness: anchors`): `items` per task, chosen once before the search from the
    parents' and baselines' per-item results on the search split; a trial scores only those."""

    items: int = Field(8, ge=1)


class Budget(_Strict):
    trials: int = Field(50, ge=1)
    sampler: Literal["auto", "cmaes", "tpe", "nsga2", "random", "grid"] = "auto"
    pruner: Literal["none", "median", "hyperband", "successive_halving"] = "none"
    seed: int = 0
    limit: int | None = Field(None, ge=1)  # items of the search split per trial (seeded subset)
    fidelity: Fidelity | None = None
    # how a trial's search fitness is measured: every item of the limit (full), item-count rungs with a
    # pruner (fidelity), or an estimate from anchor items (anchors); see search/fitness.py
    fitness: Literal["full", "fidelity", "anchors"] | None = None  # None: fidelity when `fidelity` is set
    anchors: Anchors | None = None
    top_k: int = Field(5, ge=1)  # candidates re-scored on the select split
    baselines: bool = True
    grid_points: int = Field(5, ge=2)

    @property
    def fitness_mode(self) -> str:
        """`fitness`, or when unset: fidelity if a `fidelity` section is given (as before the setting)."""
        return self.fitness or ("fidelity" if self.fidelity is not None else "full")

    @property
    def anchor_items(self) -> int:
        return (self.anchors or Anchors()).items


@dataclass(frozen=True)
class Dimension:
    """One searched Optuna parameter: a float range or a categorical choice."""

    name: str
    low: float | None = None
    high: float | None = None
    log: bool = False
    choices: tuple[Any, ...] | None = None
    integer: bool = False  # a whole-number range (suggest_int)


class MoESetup(_Strict):
    """The fixed part of an MoE construction (`method: moe`): each candidate expert's router prompts,
    by model name. The searched part (which experts, top-k, gate mode, scales) is `parameters.moe`."""

    prompts: dict[str, tuple[str, ...]] = {}
    negative_prompts: dict[str, tuple[str, ...]] = {}


class SearchSpace(_Strict):
    """A validated search space (frozen). Build it with `load_space`."""

    name: str
    path: str | None = None  # the file it came from
    models: tuple[ModelRef, ...]
    base: ModelRef | None = None
    tokenizer: str | None = None
    dtype: Literal["float32", "float16", "bfloat16", "float64"] = "float32"  # merges computed in
    out_dtype: Literal["float32", "float16", "bfloat16", "float64"] | None = None  # scored and exported in
    methods: tuple[MethodSpace, ...]
    objective: Objective
    budget: Budget = Budget()
    moe: MoESetup | None = None  # with method: moe
    overridden: frozenset[str] = frozenset()  # budget fields set by `with_overrides` (flags): they win on resume

    # -- queries ----------------------------------------------------------------------------------
    @property
    def method_names(self) -> tuple[str, ...]:
        return tuple(m.name for m in self.methods)

    def method(self, name: str) -> MethodSpace:
        for m in self.methods:
            if m.name == name:
                return m
        raise KeyError(name)

    def roles(self, method: str) -> tuple[ModelRef | None, tuple[ModelRef, ...]]:
        """(base, inputs) of a recipe for `method`; see `_roles` for the rule."""
        return _roles(self, method)

    def tuned_models(self, method: str) -> tuple[ModelRef, ...]:
        """The models that take per-model values under `method` (not the base of a task-vector method)."""
        impl = method_impl(method)
        base, inputs = self.roles(method)
        return tuple(
            m
            for m in inputs
            if not (base is not None and m.path == base.path and not impl.base_takes_model_params)
        )

    def dimensions(self, method: str) -> list[Dimension]:
        """The searched Optuna parameters of `method`, in a fixed order."""
        out: list[Dimension] = []
        for spec in self.method(method).params:
            if not spec.searched:
                continue
            for name in self.param_names(method, spec):
                if spec.type == "bool":
                    out.append(Dimension(name, choices=tuple(spec.choices or (True, False))))
                elif spec.choices is not None:
                    out.append(Dimension(name, choices=tuple(spec.choices)))
                else:
                    out.append(Dimension(name, low=spec.low, high=spec.high, log=spec.log,
                                         integer=spec.type == "int"))
        return out

    def param_names(self, method: str, spec: ParamSpec) -> list[str]:
        """Every Optuna name one tunable expands to (models x filters x control points)."""
        owners = [None] if (spec.kind == "global" or spec.shared) else [m.name for m in self.tuned_models(method)]
        groups = [None] if not spec.filters else [*spec.filters, REST]
        points = [None] if spec.points == 1 else list(range(spec.points))
        names = []
        for owner in owners:
            for group in groups:
                for k in points:
                    parts = [method, spec.name]
                    parts += [owner] if owner else []
                    parts += [group] if group else []
                    parts += [str(k)] if k is not None else []
                    names.append(".".join(parts))
        return names

    def all_dimensions(self) -> list[Dimension]:
        """Every dimension of every method, plus `method` when it is searched."""
        out = []
        if len(self.methods) > 1:
            out.append(Dimension("method", choices=self.method_names))
        for m in self.methods:
            out.extend(self.dimensions(m.name))
        return out

    @property
    def is_continuous(self) -> bool:
        """True when every searched dimension is a float range (CMA-ES applies)."""
        dims = self.all_dimensions()
        return bool(dims) and all(d.choices is None for d in dims)

    @property
    def score_dtype(self) -> str:
        """The dtype of the model that is scored, and that best.yaml exports."""
        return self.out_dtype or self.dtype

    def fingerprint(self) -> str:
        """Hash of what defines the trials (models, methods, objective tasks, dtype); not the budget, so
        a resumed run may raise --trials or change the sampler. The splits and the protocol are compared
        separately on resume (`search/record.py`), so that a refusal can name what changed."""
        data = self.model_dump(mode="json", include={"models", "base", "dtype", "out_dtype", "methods"})
        if self.moe is not None:
            data["moe"] = self.moe.model_dump(mode="json")
        data["objective"] = self.objective.model_dump(mode="json", exclude={"splits", "protocol", "reference_items"})
        data["limit"] = self.budget.limit
        data["fidelity"] = self.budget.fidelity.limit if self.budget.fidelity else None
        if self.budget.fitness_mode == "anchors":  # values are estimates from anchor items: another scale
            data["anchors"] = self.budget.anchor_items
        blob = json.dumps(data, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    def with_overrides(self, **overrides: Any) -> "SearchSpace":
        """A copy with budget fields replaced (CLI flags); None values are ignored. Validated."""
        changes = {k: v for k, v in overrides.items() if v is not None}
        if not changes:
            return self
        data = self.budget.model_dump()
        data.update(changes)
        try:
            budget = Budget.model_validate(data)
        except ValidationError as exc:
            err = exc.errors()[0]
            field = ".".join(str(p) for p in err["loc"])
            raise ConfigError(
                err["msg"], where=f"--{field.replace('_', '-')}", fix="see `evomerge search --help`"
            ) from None
        space = self.model_copy(update={"budget": budget, "overridden": self.overridden | set(changes)})
        _check_budget(space, "command line")
        return space


# --- loading -------------------------------------------------------------------------------------
class _RawModel(_Strict):
    name: str | None = None
    path: str


class _RawTask(_Strict):
    task: str
    weight: float = Field(1.0, ge=0)
    metric: str = "exact_match"
    direction: Literal["maximize", "minimize"] = "maximize"


class _RawSplits(_Strict):
    """`{carve: {search: .6, select: .2, report: .2}, seed: 0}` (evomerge carves un-split tasks), or
    `{search: search, select: select, report: report}` (tasks already split: `T_<name>`)."""

    carve: Carve | None = None
    seed: int = 0
    search: str | None = None
    select: str | None = None
    report: str | None = None


class _RawObjective(_Strict):
    tasks: list[_RawTask | str] = Field(min_length=1)
    tasks_dir: str | None = None
    splits: _RawSplits | None = None
    protocol: ScoringProtocol = ScoringProtocol()
    multi_objective: bool = False
    reference_items: str | None = None  # JSONL of items no model can have seen (membership audit)


class _RawMoE(_Strict):
    prompts: dict[str, list[str]] = {}
    negative_prompts: dict[str, list[str]] = {}


class _RawSpace(_Strict):
    name: str | None = None
    models: list[_RawModel | str] = Field(min_length=1)
    base_model: str | None = None
    tokenizer: str | None = None
    dtype: Literal["float32", "float16", "bfloat16", "float64"] | None = None  # default: the sources' dtype
    out_dtype: Literal["float32", "float16", "bfloat16", "float64"] | None = None
    method: str | list[str]
    parameters: dict[str, dict[str, Any]] = {}
    objective: _RawObjective
    search: Budget = Budget()
    moe: _RawMoE | None = None


def load_space(path: str | Path) -> SearchSpace:
    """Read and validate a search space file. Every mistake is a ConfigError with a field path."""
    p = Path(path)
    text = read_text(
        p, what="search space file", missing_fix="check the path; ready-made spaces are in search_spaces/"
    )
    data = parse_yaml(text, where=str(path))
    return space_from_dict(data, source=str(path), root=p.resolve().parent, default_name=p.stem)


def is_space_file(path: str | Path) -> bool:
    """True when `path` reads as a search space (a mapping with an `objective`), not a merge recipe."""
    import yaml

    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError, yaml.YAMLError):
        return False
    return isinstance(data, dict) and "objective" in data


def space_from_dict(
    data: Any, *, source: str = "space", root: Path | None = None, default_name: str = "search"
) -> SearchSpace:
    """Validate a parsed space mapping; relative paths resolve against `root` (default: cwd)."""
    root = root or Path.cwd()
    if not isinstance(data, dict):
        raise ConfigError("a search space must be a YAML mapping", where=source,
                          fix="see search_spaces/ for complete examples")
    try:
        raw = _RawSpace.model_validate(data)
    except ValidationError as exc:
        raise _validation_error(exc, source) from None

    name = raw.name or default_name
    if not _NAME_RE.match(name):
        raise ConfigError(f"name {name!r} may only hold letters, digits, '_' and '-'", where=f"{source}: name",
                          fix="rename it (it names the run folder)")
    models = []
    for i, entry in enumerate(raw.models):
        where = f"{source}: models[{i}]"
        rm = _RawModel(path=entry) if isinstance(entry, str) else entry
        resolved = _resolve_model_path(rm.path, root, where)
        alias = rm.name or _alias(rm.path)
        if not _NAME_RE.match(alias):
            raise ConfigError(f"model name {alias!r} may only hold letters, digits, '_' and '-'",
                              where=f"{where}.name", fix="give the model a short name: {name: x, path: ...}")
        models.append(ModelRef(name=alias, path=resolved))
    _check_unique([m.name for m in models], f"{source}: models", "model names",
                  "give the models distinct names: {name: x, path: ...}")
    _check_unique([m.path for m in models], f"{source}: models", "model paths", "list each model once")
    base = None
    if raw.base_model is not None:
        bpath = _resolve_model_path(raw.base_model, root, f"{source}: base_model")
        base = next((m for m in models if m.path == bpath), None) or ModelRef(
            name=_unique_alias(_alias(raw.base_model), [m.name for m in models]), path=bpath
        )
    tokenizer = None
    if raw.tokenizer is not None:
        tokenizer = _resolve_model_path(raw.tokenizer, root, f"{source}: tokenizer", need_config=False)

    method_names = [raw.method] if isinstance(raw.method, str) else list(raw.method)
    if not method_names:
        raise ConfigError("no merge method given", where=f"{source}: method",
                          fix="write method: slerp, or a list such as [linear, slerp, ties]")
    _check_unique(method_names, f"{source}: method", "methods", "list each method once")
    for i, mname in enumerate(method_names):
        try:
            method_impl(mname)
        except ConfigError as exc:
            suffix = f"[{i}]" if isinstance(raw.method, list) else ""
            raise ConfigError(exc.what, where=f"{source}: method{suffix}", fix=exc.fix) from None
    for key in raw.parameters:
        if key not in method_names:
            raise ConfigError(f"parameters given for {key!r}, which is not a searched method",
                              where=f"{source}: parameters.{key}",
                              fix=f"add {key} to method, or use one of: {', '.join(method_names)}")

    objective = _objective(raw.objective, root, source)
    space_methods = []
    partial = SearchSpace(name=name, models=tuple(models), base=base, methods=(), objective=objective)
    for i, mname in enumerate(method_names):
        where = f"{source}: method" + (f"[{i}]" if isinstance(raw.method, list) else "")
        space_methods.append(
            _method_space(mname, raw.parameters.get(mname, {}), partial, where, f"{source}: parameters.{mname}")
        )
    space = SearchSpace(
        name=name,
        path=source,
        models=tuple(models),
        base=base,
        tokenizer=tokenizer,
        dtype=raw.dtype or _source_dtype(base or models[0]),
        out_dtype=raw.out_dtype,
        methods=tuple(space_methods),
        objective=objective,
        budget=raw.search,
        moe=_moe_setup(raw.moe, models, space_methods, source),
    )
    _check_budget(space, source)
    return space


def _moe_setup(raw: "_RawMoE | None", models: list[ModelRef], methods: list[MethodSpace],
               source: str) -> MoESetup | None:
    """The `moe:` section, checked against the models and the gate modes the search may use."""
    from evomerge.moe.tunables import NAME

    mspace = next((m for m in methods if m.name == NAME), None)
    if mspace is None:
        if raw is not None:
            raise ConfigError("a moe: section, but moe is not a searched method", where=f"{source}: moe",
                              fix="add moe to method, or remove the moe: section")
        return None
    raw = raw or _RawMoE()
    names = [m.name for m in models]
    ept = next((p for p in mspace.params if p.name == "experts_per_token"), None)
    top = None if ept is None else (ept.fixed if ept.fixed is not None else (max(ept.choices) if ept.choices else ept.high))
    if top is not None and top > len(names):
        raise ConfigError(f"experts_per_token reaches {top:g}, but only {len(names)} models are candidate experts",
                          where=f"{source}: parameters.moe.experts_per_token",
                          fix=f"use at most {len(names)}, or list more models")
    for key, table in (("prompts", raw.prompts), ("negative_prompts", raw.negative_prompts)):
        for name, prompts in table.items():
            if name not in names:
                import difflib

                close = difflib.get_close_matches(name, names, n=1)
                raise ConfigError(f"{name!r} is not one of the models", where=f"{source}: moe.{key}.{name}",
                                  fix=(f"did you mean {close[0]!r}? " if close else "") +
                                      f"prompts are given per model name: {', '.join(names)}")
            if not prompts or not all(isinstance(p, str) and p.strip() for p in prompts):
                raise ConfigError("give a non-empty list of non-empty prompts", where=f"{source}: moe.{key}.{name}",
                                  fix="e.g. [\"up abc=\", \"up xyz=\"]")
    from evomerge.moe.config import PROMPT_MODES

    gate = next((p for p in mspace.params if p.name == "gate_mode"), None)
    modes = {"hidden"} if gate is None else ({gate.fixed} if gate.fixed is not None else set(gate.choices or ()))
    if modes & set(PROMPT_MODES):
        missing = [n for n in names if n not in raw.prompts]
        if missing:
            raise ConfigError(f"gate_mode {sorted(modes & set(PROMPT_MODES))[0]} places each router row from its "
                              f"expert's prompts, and {', '.join(missing)} has none", where=f"{source}: moe.prompts",
                              fix="give prompts for every model (moe.prompts.<name>: [...]), or search only the "
                                  "random gate modes")
        seen: dict[tuple, str] = {}
        for n in names:
            key = (tuple(raw.prompts[n]), tuple(raw.negative_prompts.get(n, ())))
            if key in seen:
                raise ConfigError(f"{seen[key]} and {n} have the same prompts, so the router cannot tell them apart",
                                  where=f"{source}: moe.prompts.{n}", fix="give each model prompts of its own")
            seen[key] = n
    return MoESetup(prompts={k: tuple(v) for k, v in raw.prompts.items()},
                    negative_prompts={k: tuple(v) for k, v in raw.negative_prompts.items()})


def method_impl(name: str):
    """The declaration of `name`: a merge method of the engine's registry, or `moe` (an MoE
    construction, moe/tunables.py). Unknown names get a "did you mean" over both."""
    from evomerge.engine import methods as registry
    from evomerge.moe.tunables import MOE

    if name == MOE.name:
        return MOE
    try:
        return registry.get(name)
    except ConfigError as exc:
        if isinstance(name, str) and name.lower() in ("mixtral", "frankenmoe", "mixture_of_experts"):
            raise ConfigError(exc.what, where=exc.where, fix="did you mean 'moe'? (an MoE built from the models)") \
                from None
        raise ConfigError(exc.what, where=exc.where, fix=f"{exc.fix}, moe") from None


def _check_budget(space: SearchSpace, source: str = "space") -> None:
    b = space.budget
    if b.sampler == "cmaes" and not space.is_continuous:
        raise ConfigError(
            "CMA-ES needs a space of float ranges only (no method choice, no true/false choices)",
            where=f"{source}: search.sampler",
            fix="use sampler: tpe (or auto), or fix the categorical parameters",
        )
    if b.sampler == "grid" and len(space.methods) > 1:
        raise ConfigError("a grid cannot search the method choice", where=f"{source}: search.sampler",
                          fix="fix one method for a grid, or use tpe/random")
    if b.sampler == "grid" and not space.all_dimensions():
        raise ConfigError("nothing to search", where=f"{source}: parameters", fix="give at least one range")
    if space.objective.multi_objective:
        if b.sampler not in ("auto", "nsga2", "random", "tpe", "grid"):
            raise ConfigError(f"sampler {b.sampler} is single-objective", where=f"{source}: search.sampler",
                              fix="use nsga2 (or auto) with objective.multi_objective: true")
        if b.pruner != "none" or b.fidelity is not None:
            raise ConfigError("Optuna cannot prune multi-objective trials", where=f"{source}: search.pruner",
                              fix="set pruner: none and fidelity: null, or a single objective")
    mode = b.fitness_mode
    if mode == "fidelity" and b.fidelity is None:
        first = max(1, (b.limit or 64) // 8)
        raise ConfigError("fitness: fidelity needs its first rung", where=f"{source}: search.fidelity",
                          fix=f"add search.fidelity: {{limit: {first}}} (items per task of the first rung; each "
                              "next rung has `factor` (2) times as many, up to search.limit)")
    if mode == "fidelity" and b.limit is None:
        raise ConfigError("fitness: fidelity needs search.limit (the items per task of the last rung)",
                          where=f"{source}: search.limit", fix="add search.limit: N (e.g. 64)")
    if mode == "fidelity" and b.pruner == "none":
        raise ConfigError("fitness: fidelity without a pruner scores every rung of every trial (the full cost)",
                          where=f"{source}: search.pruner",
                          fix="add search.pruner: successive_halving (or hyperband, median), or fitness: full")
    if mode != "fidelity" and b.fidelity is not None:
        raise ConfigError(f"search.fidelity is only used by fitness: fidelity (this space has fitness: {mode})",
                          where=f"{source}: search.fidelity", fix="remove search.fidelity, or set fitness: fidelity")
    if mode != "anchors" and b.anchors is not None:
        raise ConfigError(f"search.anchors is only used by fitness: anchors (this space has fitness: {mode})",
                          where=f"{source}: search.anchors", fix="remove search.anchors, or set fitness: anchors")
    if mode == "anchors" and b.pruner != "none":
        raise ConfigError("an anchor estimate has no intermediate score for a pruner to act on",
                          where=f"{source}: search.pruner", fix="set pruner: none with fitness: anchors")
    if mode == "anchors" and b.limit is not None and b.anchor_items > b.limit:
        raise ConfigError(f"anchors.items {b.anchor_items} is more than search.limit {b.limit}",
                          where=f"{source}: search.anchors.items",
                          fix=f"use at most {b.limit} anchor items per task (fewer is the point)")
    if b.pruner != "none" and b.fidelity is None:
        raise ConfigError("a pruner needs an intermediate score to act on", where=f"{source}: search.pruner",
                          fix="add fitness: fidelity and search.fidelity: {limit: N} (score N items first), "
                              "or pruner: none")
    if b.fidelity is not None and b.limit is not None and b.fidelity.limit >= b.limit:
        raise ConfigError("fidelity.limit must be smaller than limit", where=f"{source}: search.fidelity.limit",
                          fix="use fewer items for the cheap first score")


def _objective(raw: _RawObjective, root: Path, source: str) -> Objective:
    tasks_dir = None
    if raw.tasks_dir is not None:
        if raw.tasks_dir == "toy":
            tasks_dir = str(Path(_toy_family().tasks_dir).resolve())
        else:
            d = (root / raw.tasks_dir).resolve()
            if not d.is_dir():
                raise ConfigError(f"task folder {raw.tasks_dir!r} not found ({d})",
                                  where=f"{source}: objective.tasks_dir",
                                  fix="give a folder of lm-eval task YAML, relative to the space file, or `toy`")
            tasks_dir = str(d)
    tasks = []
    for i, t in enumerate(raw.tasks):
        rt = _RawTask(task=t) if isinstance(t, str) else t
        tasks.append(Task(**rt.model_dump()))
    _check_unique([t.task for t in tasks], f"{source}: objective.tasks", "tasks", "list each task once")
    if not raw.multi_objective and sum(t.weight for t in tasks) <= 0:
        raise ConfigError("the task weights sum to zero", where=f"{source}: objective.tasks",
                          fix="give at least one task a positive weight")
    reference = None
    if raw.reference_items is not None:
        f = (root / raw.reference_items).resolve()
        if not f.is_file():
            raise ConfigError(f"reference items file {raw.reference_items!r} not found ({f})",
                              where=f"{source}: objective.reference_items",
                              fix="give a JSONL file (one {\"text\": ...} or {\"prompt\": ..., \"answer\": ...} per line) "
                                  "relative to the space file")
        reference = str(f)
    return Objective(tasks=tuple(tasks), tasks_dir=tasks_dir, splits=_splits(raw.splits, source, toy=raw.tasks_dir == "toy"),
                     protocol=raw.protocol, multi_objective=raw.multi_objective, reference_items=reference)


def _splits(raw: _RawSplits | None, source: str, *, toy: bool = False) -> SplitSpec:
    """The split rule; omitted, evomerge carves (the toy family's tasks come already split)."""
    if raw is None:
        return SplitSpec(mode="named") if toy else SplitSpec()
    names = {r: getattr(raw, r) for r in ("search", "select", "report") if getattr(raw, r) is not None}
    if names and (raw.carve is not None or raw.seed != 0):
        raise ConfigError("give either split names (search/select/report) or carve (with seed), not both",
                          where=f"{source}: objective.splits",
                          fix="carve: {search: 0.6, select: 0.2, report: 0.2} splits un-split tasks; "
                              "names say the tasks are already split as <task>_<name>")
    if names:
        full = {r: names.get(r, r) for r in ("search", "select", "report")}
        if len(set(full.values())) < 3:
            raise ConfigError(f"two split roles name the same split ({full})", where=f"{source}: objective.splits",
                              fix="give search, select and report three different splits")
        return SplitSpec(mode="named", names=full)
    return SplitSpec(mode="carve", fractions=raw.carve or Carve(), seed=raw.seed)


def _source_dtype(model: ModelRef) -> str:
    """The dtype a model folder declares (config.json `dtype` / `torch_dtype`), else float32."""
    try:
        config = json.loads((Path(model.path) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return "float32"
    value = str(config.get("dtype") or config.get("torch_dtype") or "float32").removeprefix("torch.")
    return value if value in ("float32", "float16", "bfloat16", "float64") else "float32"


def _roles(space: SearchSpace, method: str) -> tuple[ModelRef | None, tuple[ModelRef, ...]]:
    """Which models a `method` recipe merges, and which is its base.

    - Methods without a base (linear): the listed models, each an ordinary input.
    - Methods with an optional base (nuslerp, multislerp): the space's base_model, if any, and the
      other listed models.
    - Methods with a base: the space's base_model when base + models fit the method's input count
      (ties, dare, task_arithmetic); for a method with a fixed small input count (slerp: two) the
      first listed model is the base (slerp's t = 0 end) and the next ones fill the other inputs.
    """
    impl = method_impl(method)
    models = space.models
    if impl.optional_base:  # nuslerp, multislerp: task vectors against the base when the space has one
        return space.base, tuple(m for m in models if space.base is None or m.path != space.base.path)
    if not impl.requires_base:
        return None, models
    low, high = impl.model_count
    if space.base is not None:
        inputs = models if space.base.path in {m.path for m in models} else (*models, space.base)
        if len(inputs) >= low and (high is None or len(inputs) <= high):
            return space.base, models
    if high is None:
        return None, models  # a task-vector method without base_model: refused by _method_space
    return models[0], models  # more than `high` models: refused by _method_space, never truncated


def _method_space(name: str, given: dict, partial: SearchSpace, where: str, pwhere: str) -> MethodSpace:
    from evomerge.moe.tunables import NAME as MOE

    try:
        impl = method_impl(name)
    except ConfigError as exc:
        raise ConfigError(exc.what, where=where, fix=exc.fix) from None
    base, inputs = _roles(partial, name)
    count = len(inputs) + (1 if base is not None and base.path not in {m.path for m in inputs} else 0)
    if name == MOE:
        if base is None:
            raise ConfigError("an MoE needs a base model (it gives attention, norms, embeddings and the tokenizer)",
                              where=where.split(":")[0] + ": base_model", fix="add base_model: <path>")
        if len(inputs) < 2:
            raise ConfigError(f"an MoE needs at least two candidate experts, this space lists {len(inputs)}",
                              where=where.split(":")[0] + ": models", fix="list two or more fine-tunes of the base")
        count = max(count, impl.model_count[0])
    low, high = impl.model_count
    if impl.requires_base and base is None:
        raise ConfigError(f"{name} needs a base model", where=where.split(":")[0] + ": base_model",
                          fix="add base_model: <path> (the model the task vectors are taken from)")
    if count < low or (high is not None and count > high):
        need = f"exactly {low}" if low == high else (f"at least {low}" if high is None else f"{low} to {high}")
        listed = ", ".join(m.name for m in inputs)
        raise ConfigError(f"{name} takes {need} input models, this space gives {count} ({listed})", where=where,
                          fix=(f"list {high} models for {name} (the first is its base), or use a method that "
                               "merges more (linear, task_arithmetic, ties)") if high is not None and count > high
                          else "change models/base_model or the method")
    if impl.non_base_count is not None:
        low, high = impl.non_base_count
        others = len(inputs) - int(base is not None and base.path in {m.path for m in inputs})
        if others < low or (high is not None and others > high):
            need = f"exactly {low}" if low == high else (f"at least {low}" if high is None else f"{low} to {high}")
            raise ConfigError(f"{name} merges {need} models besides the base, this space gives {others}",
                              where=where, fix="change models or the method")
    for key in given:
        impl.check_param_name(key, f"{pwhere}.{key}")
    params = []
    for tunable in impl.tunables:
        if tunable.name in given:
            params.append(_param_spec(tunable, given[tunable.name], f"{pwhere}.{tunable.name}"))
        elif tunable.required:
            # Required and not given: search it over the method's suggested range.
            params.append(_param_spec(tunable, {}, f"{pwhere}.{tunable.name}"))
    return MethodSpace(name=name, params=tuple(params))


_SPEC_KEYS = ("low", "high", "log", "points", "filters", "shared", "choices")


def _param_spec(tunable, value: Any, where: str) -> ParamSpec:
    """A space entry for one tunable -> ParamSpec, bounds checked against the method's declaration."""
    common = dict(name=tunable.name, kind=tunable.kind, type=tunable.type, default=tunable.default)
    if not isinstance(value, dict):
        # fixed: a scalar, or a gradient list of numbers
        if isinstance(value, list):
            if tunable.type != "float" or not value:
                raise ConfigError(f"{tunable.name} cannot be a list here", where=where,
                                  fix=f"give one value, {tunable.describe_range()}")
            fixed = [tunable.check(v, f"{where}[{i}]") for i, v in enumerate(value)]
        else:
            fixed = tunable.check(value, where)
        return ParamSpec(fixed=fixed, **common)
    for key in value:
        if key not in _SPEC_KEYS:
            import difflib

            close = difflib.get_close_matches(str(key), _SPEC_KEYS, n=1)
            raise ConfigError(f"unknown key {key!r}", where=f"{where}.{key}",
                              fix=f"did you mean {close[0]!r}?" if close else f"allowed: {', '.join(_SPEC_KEYS)}")
    if not tunable.searchable:
        raise ConfigError(f"{tunable.name} cannot be searched", where=where, fix="give it a fixed value")
    shared = value.get("shared", False)
    if not isinstance(shared, bool):
        raise ConfigError("shared must be true or false", where=f"{where}.shared")
    if shared and tunable.kind != "model":
        raise ConfigError(f"{tunable.name} is one value per tensor already", where=f"{where}.shared",
                          fix="remove shared")
    points = value.get("points", 1)
    if isinstance(points, bool) or not isinstance(points, int) or points < 1:
        raise ConfigError(f"points must be a whole number >= 1, got {points!r}", where=f"{where}.points",
                          fix="use 1 for one value, K > 1 for a gradient of K control points over the layers")
    filters = value.get("filters") or []
    if not isinstance(filters, list) or not all(isinstance(f, str) and _NAME_RE.match(f) for f in filters):
        raise ConfigError("filters must be a list of tensor-name substrings", where=f"{where}.filters",
                          fix="e.g. filters: [self_attn, mlp]")
    if REST in filters or len(set(filters)) != len(filters):
        raise ConfigError(f"filters must be distinct and not {REST!r} (the fallback is implicit)",
                          where=f"{where}.filters", fix="e.g. filters: [self_attn, mlp]")
    if tunable.type == "bool":
        choices = value.get("choices", [True, False])
        if set(value) - {"choices"}:
            raise ConfigError(f"{tunable.name} is true/false: only `choices` applies", where=where,
                              fix="write {choices: [true, false]} or a fixed true/false")
        if not isinstance(choices, list) or not choices:
            raise ConfigError("choices must be a non-empty list", where=f"{where}.choices")
        checked = tuple(tunable.check(c, f"{where}.choices[{i}]") for i, c in enumerate(choices))
        return ParamSpec(choices=checked, **common)
    if tunable.type == "str" and "choices" not in value:
        value = {**value, "choices": list(tunable.options)}
    if "choices" in value:
        choices = value["choices"]
        if not isinstance(choices, list) or not choices:
            raise ConfigError("choices must be a non-empty list", where=f"{where}.choices")
        checked = tuple(tunable.check(c, f"{where}.choices[{i}]") for i, c in enumerate(choices))
        if set(value) - {"choices", "points", "filters", "shared"}:
            raise ConfigError("give either choices or low/high", where=where)
        return ParamSpec(choices=checked, points=points, filters=tuple(filters), shared=shared, **common)
    rng = tunable.search_range
    low = value.get("low", rng[0] if rng else None)
    high = value.get("high", rng[1] if rng else None)
    if low is None or high is None:
        raise ConfigError(f"{tunable.name} has no default search range", where=where,
                          fix="give low and high")
    low = tunable.check(low, f"{where}.low")
    high = tunable.check(high, f"{where}.high")
    if not low < high:
        raise ConfigError(f"low ({low:g}) must be below high ({high:g})", where=where,
                          fix="swap them, or give a fixed value instead of a range")
    log = value.get("log", False)
    if not isinstance(log, bool) or (log and low <= 0):
        raise ConfigError("log needs true/false and a positive low", where=f"{where}.log")
    return ParamSpec(low=low, high=high, log=log, points=points, filters=tuple(filters), shared=shared, **common)


# --- helpers -------------------------------------------------------------------------------------
def _toy_family():
    from evomerge.toy.family import family

    return family()


def _resolve_model_path(text: str, root: Path, where: str, *, need_config: bool = True) -> str:
    if text.startswith("toy:"):
        fam = _toy_family()
        key = text[4:]
        table = {**fam.experts, **fam.models}  # toy:rev, toy:expert_rev, toy:base
        if key not in table:
            import difflib

            close = difflib.get_close_matches(key, list(table), n=1)
            raise ConfigError(f"the toy family has no model {key!r}", where=where,
                              fix=(f"did you mean toy:{close[0]}? " if close else "")
                              + "available: " + ", ".join(f"toy:{k}" for k in table))
        return str(Path(table[key]).resolve())
    p = Path(text).expanduser()
    p = p if p.is_absolute() else (root / p)
    p = p.resolve()
    if not p.is_dir() or (need_config and not (p / "config.json").is_file()):
        raise ConfigError(f"model folder {text!r} not found or has no config.json ({p})", where=where,
                          fix="give a local Hugging Face model folder (relative paths start at the space file)")
    return str(p)


def _alias(text: str) -> str:
    stem = text[4:] if text.startswith("toy:") else Path(text.rstrip("/")).name
    alias = re.sub(r"[^A-Za-z0-9_-]+", "_", stem).strip("_") or "model"
    return alias


def _unique_alias(alias: str, taken: list[str]) -> str:
    out, i = alias, 2
    while out in taken:
        out, i = f"{alias}{i}", i + 1
    return out


def _check_unique(items: list, where: str, what: str, fix: str) -> None:
    seen = set()
    for item in items:
        if item in seen:
            raise ConfigError(f"duplicate {what}: {item!r}", where=where, fix=fix)
        seen.add(item)


def _validation_error(exc: ValidationError, source: str) -> ConfigError:
    err = sorted(exc.errors(), key=lambda e: {"extra_forbidden": 0, "missing": 1}.get(e["type"], 2))[0]
    parts = []
    for part in err["loc"]:
        if isinstance(part, int):
            parts.append(f"[{part}]")
        elif isinstance(part, str) and (part.startswith("_Raw") or part in ("str", "list[str]")):
            continue
        else:
            parts.append(("." if parts else "") + str(part))
    where = f"{source}: {''.join(parts) or 'space'}"
    if err["type"] == "extra_forbidden":
        import difflib

        key = str(err["loc"][-1])
        known = {
            "": _RawSpace.model_fields, "objective": _RawObjective.model_fields, "search": Budget.model_fields,
            "splits": _RawSplits.model_fields, "protocol": ScoringProtocol.model_fields,
            "carve": Carve.model_fields, "tasks": _RawTask.model_fields, "models": _RawModel.model_fields,
            "fidelity": Fidelity.model_fields, "anchors": Anchors.model_fields,
        }
        section = next((str(p) for p in reversed(err["loc"][:-1]) if isinstance(p, str) and str(p) in known), "")
        if section == "objective" and "tasks" in [str(p) for p in err["loc"][:-1]]:
            section = "tasks"
        fields = list(known[section])
        close = difflib.get_close_matches(key, fields, n=1)
        fix = f"did you mean {close[0]!r}?" if close else f"allowed keys here: {', '.join(fields)}"
        return ConfigError(f"unknown key {key!r}", where=where, fix=fix)
    if err["type"] == "missing":
        return ConfigError("required key is missing", where=where, fix="see search_spaces/ for complete examples")
    msg = err["msg"].removeprefix("Value error, ")
    return ConfigError(msg, where=where)


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
