"""The space file: `space.yaml` as written (its strict schema) and its loading into a `SearchSpace`.

Why it exists: a `space.yaml` is the user's whole description of a search. This module reads it
(strict safe YAML: duplicate keys refused, pydantic with `extra="forbid"`, errors with field paths and
"did you mean"), resolves model paths (`models.py`) and the objective's task folder, checks each method
and its tunables (`methods.py`), and returns the frozen `SearchSpace` (`space.py`). The CLI, the
search and `evomerge eval --space` load spaces through `load_space`.

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
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationError

from evomerge.errors import ConfigError
from evomerge.evaluation.protocol import Carve, ScoringProtocol, SplitSpec
from evomerge.search.layer_path import RawLayerPath, layer_path_setup
from evomerge.search.methods import method_space, moe_setup
from evomerge.search.models import alias, declared_dtype, model_path, toy_family, unique_alias
from evomerge.search.space import (NAME_RE, Anchors, Budget, Fidelity, ModelRef, Objective, SearchSpace, Task,
                                   Strict, check_budget, method_impl)
from evomerge.yamlfile import parse as parse_yaml
from evomerge.yamlfile import read_text


class _RawModel(Strict):
    name: str | None = None
    path: str


class _RawTask(Strict):
    task: str
    weight: float = Field(1.0, ge=0)
    metric: str = "exact_match"
    direction: Literal["maximize", "minimize"] = "maximize"


class _RawSplits(Strict):
    """`{carve: {search: .6, select: .2, report: .2}, seed: 0}` (evomerge carves un-split tasks), or
    `{search: search, select: select, report: report}` (tasks already split: `T_<name>`)."""

    carve: Carve | None = None
    seed: int = 0
    search: str | None = None
    select: str | None = None
    report: str | None = None


class _RawObjective(Strict):
    tasks: list[_RawTask | str] = Field(min_length=1)
    tasks_dir: str | None = None
    splits: _RawSplits | None = None
    protocol: ScoringProtocol = ScoringProtocol()
    multi_objective: bool = False
    reference_items: str | None = None  # JSONL of items no model can have seen (membership audit)


class _RawMoE(Strict):
    prompts: dict[str, list[str]] = {}
    negative_prompts: dict[str, list[str]] = {}


class _RawSpace(Strict):
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
    layer_path: RawLayerPath | None = None  # with method: layer_path (search/layer_path.py)


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
    if not NAME_RE.match(name):
        raise ConfigError(f"name {name!r} may only hold letters, digits, '_' and '-'", where=f"{source}: name",
                          fix="rename it (it names the run folder)")
    models, base = _models(raw, root, source)
    tokenizer = None
    if raw.tokenizer is not None:
        tokenizer = model_path(raw.tokenizer, root, f"{source}: tokenizer", need_config=False)
    method_names = _method_names(raw, source)
    objective = _objective(raw.objective, root, source)
    partial = SearchSpace(name=name, models=tuple(models), base=base, methods=(), objective=objective)
    space_methods = []
    for i, mname in enumerate(method_names):
        where = f"{source}: method" + (f"[{i}]" if isinstance(raw.method, list) else "")
        space_methods.append(
            method_space(mname, raw.parameters.get(mname, {}), partial, where, f"{source}: parameters.{mname}")
        )
    space = SearchSpace(
        name=name,
        path=source,
        models=tuple(models),
        base=base,
        tokenizer=tokenizer,
        dtype=raw.dtype or declared_dtype(base or models[0]),
        out_dtype=raw.out_dtype,
        methods=tuple(space_methods),
        objective=objective,
        budget=raw.search,
        moe=moe_setup(raw.moe, models, space_methods, source),
        layer_path=layer_path_setup(raw.layer_path, models, base, method_names, source),
    )
    check_budget(space, source)
    return space


def _models(raw: _RawSpace, root: Path, source: str) -> tuple[list[ModelRef], ModelRef | None]:
    """The listed models (distinct names and folders) and the base model (one of them, or another)."""
    models = []
    for i, entry in enumerate(raw.models):
        where = f"{source}: models[{i}]"
        rm = _RawModel(path=entry) if isinstance(entry, str) else entry
        resolved = model_path(rm.path, root, where)
        name = rm.name or alias(rm.path)
        if not NAME_RE.match(name):
            raise ConfigError(f"model name {name!r} may only hold letters, digits, '_' and '-'",
                              where=f"{where}.name", fix="give the model a short name: {name: x, path: ...}")
        models.append(ModelRef(name=name, path=resolved))
    _check_unique([m.name for m in models], f"{source}: models", "model names",
                  "give the models distinct names: {name: x, path: ...}")
    _check_unique([m.path for m in models], f"{source}: models", "model paths", "list each model once")
    base = None
    if raw.base_model is not None:
        bpath = model_path(raw.base_model, root, f"{source}: base_model")
        base = next((m for m in models if m.path == bpath), None) or ModelRef(
            name=unique_alias(alias(raw.base_model), [m.name for m in models]), path=bpath
        )
    return models, base


def _method_names(raw: _RawSpace, source: str) -> list[str]:
    """The searched methods: known names (engine registry or moe), each once, and every
    `parameters:` key one of them."""
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
    return method_names


def _objective(raw: _RawObjective, root: Path, source: str) -> Objective:
    """The objective: its task folder (or the toy family's), tasks, weights, splits and reference items."""
    tasks_dir = None
    if raw.tasks_dir is not None:
        if raw.tasks_dir == "toy":
            tasks_dir = str(Path(toy_family().tasks_dir).resolve())
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
            "layer_path": RawLayerPath.model_fields,
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
