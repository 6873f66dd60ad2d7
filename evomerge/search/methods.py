"""A space's methods and their tunables: the `method:` list and the `parameters:` section, resolved.

Why it exists: every value a space gives a tunable (fixed, a range, a choice, a gradient, per filter)
is checked here against the merge method's own declaration (`engine/methods`, or `moe/tunables.py`
for `method: moe`): names, bounds and defaults are read from there, never repeated. It also checks that
a method gets the inputs it needs (base, model count) and the `moe:` section (router prompts) against
the models. `spacefile.space_from_dict` calls it once per method while loading a space.
"""

from __future__ import annotations

from typing import Any

from evomerge.errors import ConfigError
from evomerge.search.space import (NAME_RE, REST, MethodSpace, ModelRef, MoESetup, ParamSpec, SearchSpace, method_impl,
                                   model_roles)

SPEC_KEYS = ("low", "high", "log", "points", "filters", "shared", "choices")


def method_space(name: str, given: dict, partial: SearchSpace, where: str, pwhere: str) -> MethodSpace:
    """One searched method: its inputs checked against the method's counts and base rule, and a ParamSpec
    for every tunable the space sets (and every required one, searched over its suggested range)."""
    from evomerge.moe.tunables import NAME as MOE

    try:
        impl = method_impl(name)
    except ConfigError as exc:
        raise ConfigError(exc.what, where=where, fix=exc.fix) from None
    base, inputs = model_roles(partial, name)
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
            params.append(param_spec(tunable, given[tunable.name], f"{pwhere}.{tunable.name}"))
        elif tunable.required:
            # Required and not given: search it over the method's suggested range.
            params.append(param_spec(tunable, {}, f"{pwhere}.{tunable.name}"))
    return MethodSpace(name=name, params=tuple(params))


def param_spec(tunable, value: Any, where: str) -> ParamSpec:
    """A space entry for one tunable -> ParamSpec, bounds checked against the method's declaration:
    a fixed value (a scalar or a gradient list), or a mapping that searches it (a choice or a range)."""
    common = dict(name=tunable.name, kind=tunable.kind, type=tunable.type, default=tunable.default)
    if not isinstance(value, dict):
        return ParamSpec(fixed=_fixed(tunable, value, where), **common)
    _check_keys(value, where)
    if not tunable.searchable:
        raise ConfigError(f"{tunable.name} cannot be searched", where=where, fix="give it a fixed value")
    shape = _shape(tunable, value, where)
    if tunable.type == "bool":
        if set(value) - {"choices"}:
            raise ConfigError(f"{tunable.name} is true/false: only `choices` applies", where=where,
                              fix="write {choices: [true, false]} or a fixed true/false")
        return ParamSpec(choices=_choices(tunable, value.get("choices", [True, False]), where), **common)
    if tunable.type == "str" and "choices" not in value:
        value = {**value, "choices": list(tunable.options)}
    if "choices" in value:
        checked = _choices(tunable, value["choices"], where)
        if set(value) - {"choices", "points", "filters", "shared"}:
            raise ConfigError("give either choices or low/high", where=where)
        return ParamSpec(choices=checked, **shape, **common)
    return ParamSpec(**_search_range(tunable, value, where), **shape, **common)


def _fixed(tunable, value: Any, where: str) -> Any:
    """A fixed value: a scalar, or a gradient list of numbers."""
    if isinstance(value, list):
        if tunable.type != "float" or not value:
            raise ConfigError(f"{tunable.name} cannot be a list here", where=where,
                              fix=f"give one value, {tunable.describe_range()}")
        return [tunable.check(v, f"{where}[{i}]") for i, v in enumerate(value)]
    return tunable.check(value, where)


def _check_keys(value: dict, where: str) -> None:
    for key in value:
        if key not in SPEC_KEYS:
            import difflib

            close = difflib.get_close_matches(str(key), SPEC_KEYS, n=1)
            raise ConfigError(f"unknown key {key!r}", where=f"{where}.{key}",
                              fix=f"did you mean {close[0]!r}?" if close else f"allowed: {', '.join(SPEC_KEYS)}")


def _shape(tunable, value: dict, where: str) -> dict:
    """How many values a searched tunable expands to: `shared` (one for every model), `points` (a
    gradient's control points) and `filters` (one per tensor-name filter, plus `rest`)."""
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
    if not isinstance(filters, list) or not all(isinstance(f, str) and NAME_RE.match(f) for f in filters):
        raise ConfigError("filters must be a list of tensor-name substrings", where=f"{where}.filters",
                          fix="e.g. filters: [self_attn, mlp]")
    if REST in filters or len(set(filters)) != len(filters):
        raise ConfigError(f"filters must be distinct and not {REST!r} (the fallback is implicit)",
                          where=f"{where}.filters", fix="e.g. filters: [self_attn, mlp]")
    return {"points": points, "filters": tuple(filters), "shared": shared}


def _choices(tunable, choices: Any, where: str) -> tuple:
    if not isinstance(choices, list) or not choices:
        raise ConfigError("choices must be a non-empty list", where=f"{where}.choices")
    return tuple(tunable.check(c, f"{where}.choices[{i}]") for i, c in enumerate(choices))


def _search_range(tunable, value: dict, where: str) -> dict:
    """low, high (default: the method's suggested range) and log of a searched number."""
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
    return {"low": low, "high": high, "log": log}


def moe_setup(raw: Any, models: list[ModelRef], methods: list[MethodSpace], source: str) -> MoESetup | None:
    """The `moe:` section (`raw`: its `prompts` and `negative_prompts`, or None when there is none),
    checked against the models and the gate modes the search may use."""
    from evomerge.moe.tunables import NAME

    mspace = next((m for m in methods if m.name == NAME), None)
    if mspace is None:
        if raw is not None:
            raise ConfigError("a moe: section, but moe is not a searched method", where=f"{source}: moe",
                              fix="add moe to method, or remove the moe: section")
        return None
    positive = dict(raw.prompts) if raw is not None else {}
    negative = dict(raw.negative_prompts) if raw is not None else {}
    names = [m.name for m in models]
    ept = next((p for p in mspace.params if p.name == "experts_per_token"), None)
    top = None if ept is None else (ept.fixed if ept.fixed is not None else (max(ept.choices) if ept.choices else ept.high))
    if top is not None and top > len(names):
        raise ConfigError(f"experts_per_token reaches {top:g}, but only {len(names)} models are candidate experts",
                          where=f"{source}: parameters.moe.experts_per_token",
                          fix=f"use at most {len(names)}, or list more models")
    for key, table in (("prompts", positive), ("negative_prompts", negative)):
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
        missing = [n for n in names if n not in positive]
        if missing:
            raise ConfigError(f"gate_mode {sorted(modes & set(PROMPT_MODES))[0]} places each router row from its "
                              f"expert's prompts, and {', '.join(missing)} has none", where=f"{source}: moe.prompts",
                              fix="give prompts for every model (moe.prompts.<name>: [...]), or search only the "
                                  "random gate modes")
        seen: dict[tuple, str] = {}
        for n in names:
            key = (tuple(positive[n]), tuple(negative.get(n, ())))
            if key in seen:
                raise ConfigError(f"{seen[key]} and {n} have the same prompts, so the router cannot tell them apart",
                                  where=f"{source}: moe.prompts.{n}", fix="give each model prompts of its own")
            seen[key] = n
    return MoESetup(prompts={k: tuple(v) for k, v in positive.items()},
                    negative_prompts={k: tuple(v) for k, v in negative.items()})
