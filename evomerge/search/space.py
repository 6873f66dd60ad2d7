"""The search space: what a search may change, what it optimises, and its budget (frozen).

Why it exists: a `SearchSpace` is the resolved, validated form of a user's `space.yaml`
(`spacefile.py` reads the file; `methods.py` checks each tunable against the merge method's own
declaration, so bounds and defaults are never repeated here). This module OWNS THE PARAMETER NAMES:
`SearchSpace.dimensions(method)` lists the searched dimensions with their Optuna names; `suggest.py`
turns them into `trial.suggest_*` calls and `build_recipe` turns the values back into a mergekit
recipe. It also says which models a method merges (`roles`) and which budgets are coherent
(`check_budget`, also run on the command line's overrides).

Parameter names: `<method>.<tunable>[.<model>][.<filter>][.<k>]`, e.g. `slerp.t.mlp.2`,
`ties.density.add`, plus `method` when the method itself is searched. `<filter>` is one of the
tunable's filters or `rest` (the unfiltered fallback); `<k>` is the gradient control point. A layer
path's (`method: layer_path`, `LayerPathSetup`) are `layer_path.<op|start|length|donor|gain>.<k>`, k
the edit.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from evomerge.errors import ConfigError
from evomerge.engine.methods.base import MergeMethod
from evomerge.evaluation.protocol import ScoringProtocol, SplitSpec
from evomerge.engine.seeds import Seed

SAMPLERS = ("auto", "cmaes", "tpe", "gp", "nsga2", "random", "grid")
PRUNERS = ("none", "median", "hyperband", "successive_halving")
REST = "rest"
NAME_RE = re.compile(r"^[A-Za-z0-9_-]+$")  # model names, run names, filters


class Strict(BaseModel):
    """The base of every space model: unknown keys refused, frozen."""

    model_config = ConfigDict(extra="forbid", frozen=True)


# --- the resolved, frozen space ------------------------------------------------------------------
class ModelRef(Strict):
    """A source model: a short name (used in parameter names and reports) and its absolute path."""

    name: str
    path: str


class ParamSpec(Strict):
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


class MethodSpace(Strict):
    """A merge method and the way the space sets each of its tunables."""

    name: str
    params: tuple[ParamSpec, ...]


class Task(Strict):
    task: str
    weight: float = 1.0
    metric: str = "exact_match"
    direction: Literal["maximize", "minimize"] = "maximize"


class Objective(Strict):
    tasks: tuple[Task, ...]
    tasks_dir: str | None = None  # absolute, resolved
    splits: SplitSpec = SplitSpec()
    protocol: ScoringProtocol = ScoringProtocol()
    multi_objective: bool = False  # one objective per task (Pareto front, NSGA-II)
    reference_items: str | None = None  # JSONL of items no model has seen (membership audit); absolute


class Fidelity(Strict):
    """Item-count rungs (`fitness: fidelity`): `limit` items per task first, then `factor` times as many,
    up to the search limit; each rung scores only its new items, and the pruner may stop the trial after
    any rung but the last (whose value is the full-limit score)."""

    limit: int = Field(ge=1)
    factor: int = Field(2, ge=2)


class Anchors(Strict):
    """Anchor items (`fitness: anchors`): `items` per task, chosen once before the search from the
    parents' and baselines' per-item results on the search split; a trial scores only those."""

    items: int = Field(8, ge=1)


class Budget(Strict):
    trials: int = Field(50, ge=1)
    sampler: Literal["auto", "cmaes", "tpe", "gp", "nsga2", "random", "grid"] = "auto"
    pruner: Literal["none", "median", "hyperband", "successive_halving"] = "none"
    seed: Seed = 0
    limit: int | None = Field(None, ge=1)  # items of the search split per trial (seeded subset)
    fidelity: Fidelity | None = None
    # how a trial's search fitness is measured: every item of the limit (full), item-count rungs with a
    # pruner (fidelity), or an estimate from anchor items (anchors); see search/fitness.py
    fitness: Literal["full", "fidelity", "anchors"] | None = None  # None: fidelity when `fidelity` is set
    anchors: Anchors | None = None
    top_k: int = Field(5, ge=1)  # candidates re-scored on the select split
    # synchronous rounds of this many trials, told in trial order: the same trials for the same seed
    # whatever the worker count and timing (None: asynchronous, a new trial whenever a worker is free)
    batch: int | None = Field(None, ge=1)
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


class MoESetup(Strict):
    """The fixed part of an MoE construction (`method: moe`): each candidate expert's router prompts,
    by model name. The searched part (which experts, top-k, gate mode, scales) is `parameters.moe`."""

    prompts: dict[str, tuple[str, ...]] = {}
    negative_prompts: dict[str, tuple[str, ...]] = {}


LAYER_PATH = "layer_path"  # the method name of a layer-path (data-flow) search
PATH_OPS = ("repeat", "swap", "skip")


class PathEdit(Strict):
    """One edit of the anchor's path (`method: layer_path`; search/layer_path.py applies it): `op` on the
    anchor's layers [start, start + length), with a donor (swap) and a gain (repeat, swap)."""

    op: Literal["none", "repeat", "swap", "skip"]
    start: int = 1
    length: int = Field(1, ge=1)
    donor: str | None = None
    gain: float = Field(1.0, gt=0)


class LayerPathSetup(Strict):
    """The fixed part of a layer-path search: the anchor (by name) and its layer count, the donors, how
    many edits a candidate makes (`edits`), which operations, over which anchor layers (`span`, [first,
    end): never the first or last layer), how long (`length`, a range), the gain range (None: gain 1),
    and the user's own seed candidates. The searched part is `SearchSpace.dimensions(LAYER_PATH)`."""

    anchor: str
    layers: int
    donors: tuple[str, ...] = ()
    edits: int = 2
    ops: tuple[str, ...] = PATH_OPS
    span: tuple[int, int]
    length: tuple[int, int] = (1, 1)
    gain: tuple[float, float] | None = None
    seeds: tuple[tuple[PathEdit, ...], ...] = ()

    def dimensions(self) -> list["Dimension"]:
        """Per edit k: `layer_path.op.k`, `.start.k`, and when they vary `.length.k`, `.donor.k`, `.gain.k`."""
        out: list[Dimension] = []
        for k in range(self.edits):
            out.append(Dimension(f"{LAYER_PATH}.op.{k}", choices=("none", *self.ops)))
            out.append(Dimension(f"{LAYER_PATH}.start.{k}", low=self.span[0], high=self.span[1] - 1, integer=True))
            if self.length[1] > self.length[0]:
                out.append(Dimension(f"{LAYER_PATH}.length.{k}", low=self.length[0], high=self.length[1], integer=True))
            if "swap" in self.ops and len(self.donors) > 1:
                out.append(Dimension(f"{LAYER_PATH}.donor.{k}", choices=self.donors))
            if self.gain is not None and self.gain[1] > self.gain[0]:
                out.append(Dimension(f"{LAYER_PATH}.gain.{k}", low=self.gain[0], high=self.gain[1]))
        return out


class SearchSpace(Strict):
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
    layer_path: LayerPathSetup | None = None  # with method: layer_path
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
        """(base, inputs) of a recipe for `method`; see `model_roles` for the rule."""
        return model_roles(self, method)

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
        if method == LAYER_PATH and self.layer_path is not None:
            return self.layer_path.dimensions()
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
        if self.layer_path is not None:
            data["layer_path"] = self.layer_path.model_dump(mode="json")
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
        check_budget(space, "command line")
        return space


def method_impl(name: str):
    """The declaration of `name`: a merge method of the engine's registry, or `moe` (an MoE
    construction, moe/tunables.py). Unknown names get a "did you mean" over both."""
    from evomerge.engine import methods as registry
    from evomerge.moe.tunables import MOE

    if name == MOE.name:
        return MOE
    if name == LAYER_PATH:
        return LayerPathMethod()
    try:
        return registry.get(name)
    except ConfigError as exc:
        if isinstance(name, str) and name.lower() in ("mixtral", "frankenmoe", "mixture_of_experts"):
            raise ConfigError(exc.what, where=exc.where, fix="did you mean 'moe'? (an MoE built from the models)") \
                from None
        raise ConfigError(exc.what, where=exc.where, fix=f"{exc.fix}, moe, {LAYER_PATH}") from None


class LayerPathMethod(MergeMethod):
    """The declaration of `method: layer_path`: any number of models (the anchor and its donors), no base,
    no tensor tunables (its dimensions are the path's edits, `LayerPathSetup.dimensions`)."""

    name = LAYER_PATH
    model_count = (1, None)

    def _merge(self, *args, **kwargs):  # pragma: no cover - a path is exported as passthrough slices
        raise NotImplementedError("a layer path is built as a passthrough recipe (engine/layer_path.py)")


def model_roles(space: SearchSpace, method: str) -> tuple[ModelRef | None, tuple[ModelRef, ...]]:
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
        return None, models  # a task-vector method without base_model: refused by methods.method_space
    return models[0], models  # more than `high` models: refused by methods.method_space, never truncated


def check_budget(space: SearchSpace, source: str = "space") -> None:
    """The search settings agree with each other and with the space (sampler, pruner, fitness)."""
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
