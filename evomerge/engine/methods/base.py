"""What every merge method is: declared tunables, input rules, and the shared tensor arithmetic.

A merge method is pure arithmetic on the tensors of one output weight. This module holds the parts
all methods share, so each method module is only its own formula:

- `Tunable`: the ONE place a parameter is declared (name, default, valid range, whether it is per
  model or global, whether a search may tune it). The recipe validator and the search space read
  bounds and defaults from here; nothing else repeats them.
- `MergeMethod`: the contract the engine calls (`merge`), plus the checks the engine runs before any
  heavy work (`check_models`, `check_params`, `Tunable.check`).
- The checks and dtype promotion `merge` applies before a method's own formula (`_merge`).
The shared tensor arithmetic (magnitude trimming, DARE's drop, L1 rescaling, TIES sign election) is
`arithmetic.py`; the task-vector skeleton that uses it is `task_arithmetic.TaskArithmetic`.

torch is imported inside functions only, so importing the registry (to validate a YAML file or to
print `--help`) stays cheap.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from evomerge.errors import CheckpointError, ConfigError

if TYPE_CHECKING:  # pragma: no cover - typing only
    import torch

Kind = Literal["model", "global"]


@dataclass(frozen=True)
class Tunable:
    """One parameter of a merge method, declared once.

    `low`/`high` are the VALID range (None = unbounded); `low_open`/`high_open` make an end
    exclusive (density is in (0, 1]). `search_low`/`search_high` are the suggested range for a
    search (default: the valid range); a search may only tune a tunable with `searchable=True`.
    `kind="model"` values are given per input model (weight, density); `kind="global"` values are
    shared by all inputs of a tensor (t, lambda, normalize). `type` is "float", "int" (a whole number,
    karcher's max_iter) or "bool".
    A tunable with `default=None` and `required=False` is simply absent unless given (passthrough's
    `scale`).
    """

    name: str
    default: float | bool | None = None
    low: float | None = None
    high: float | None = None
    required: bool = False
    kind: Kind = "model"
    searchable: bool = True
    type: Literal["float", "int", "bool", "str"] = "float"
    options: tuple[str, ...] = ()  # the allowed values of a "str" tunable (an MoE's gate_mode)
    low_open: bool = False
    high_open: bool = False
    search_low: float | None = None
    search_high: float | None = None
    doc: str = ""

    @property
    def search_range(self) -> tuple[float, float] | None:
        """The (low, high) a search should use, or None if not searchable / not a number."""
        if not self.searchable or self.type not in ("float", "int"):
            return None
        low = self.search_low if self.search_low is not None else self.low
        high = self.search_high if self.search_high is not None else self.high
        if low is None or high is None:
            return None
        return (float(low), float(high))

    def describe_range(self) -> str:
        if self.type == "bool":
            return "true or false"
        if self.type == "str":
            return "one of " + ", ".join(self.options)
        if self.type == "int" and self.high is None and self.low is not None:
            return f"a whole number >= {self.low:g}"
        if self.low is None and self.high is None:
            return "a finite number"
        left = "(" if self.low_open else "["
        right = ")" if self.high_open else "]"
        low = "-inf" if self.low is None else f"{self.low:g}"
        high = "inf" if self.high is None else f"{self.high:g}"
        return f"a number in {left}{low}, {high}{right}"

    def check(self, value: Any, where: str) -> float | bool:
        """Return `value` as this tunable's type, or raise ConfigError naming `where`."""
        if self.type == "bool":
            if truthy(value) is not None:
                return truthy(value)
            raise ConfigError(
                f"{self.name} must be true or false, got {value!r}",
                where=where,
                fix=f"write {self.name}: true or {self.name}: false",
            )
        if self.type == "str":
            if isinstance(value, str) and value in self.options:
                return value
            import difflib

            close = difflib.get_close_matches(str(value), self.options, n=1)
            raise ConfigError(f"{self.name} must be one of {', '.join(self.options)}, got {value!r}", where=where,
                              fix=(f"did you mean {close[0]!r}? " if close else "") + f"use {self.describe_range()}")
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(
                f"{self.name} must be a number, got {value!r}",
                where=where,
                fix=f"set {self.name} to {self.describe_range()}",
            )
        number = float(value)
        if self.type == "int":
            if not math.isfinite(number) or not number.is_integer():
                raise ConfigError(f"{self.name} must be a whole number, got {value!r}", where=where,
                                  fix=f"set {self.name} to {self.describe_range()}")
        if not math.isfinite(number):
            raise ConfigError(
                f"{self.name} must be finite, got {value!r}",
                where=where,
                fix=f"set {self.name} to {self.describe_range()}",
            )
        too_low = self.low is not None and (
            number <= self.low if self.low_open else number < self.low
        )
        too_high = self.high is not None and (
            number >= self.high if self.high_open else number > self.high
        )
        if too_low or too_high:
            raise ConfigError(
                f"{self.name}={value!r} is out of range",
                where=where,
                fix=f"set {self.name} to {self.describe_range()}",
            )
        return int(number) if self.type == "int" else number


# The values mergekit's pydantic validation reads as a bool (YAML `normalize: 1.0` is true there).
_TRUE, _FALSE = ("1", "on", "t", "true", "y", "yes"), ("0", "off", "f", "false", "n", "no")


def truthy(value: Any) -> bool | None:
    """`value` as mergekit reads a bool parameter (true/false, 0/1 numbers, "yes"/"no"...), else None."""
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in _TRUE + _FALSE:
        return value.strip().lower() in _TRUE
    return None


class MergeMethod:
    """Base class: subclasses set the class attributes and implement `_merge`.

    Attributes:
        name: the mergekit `merge_method` string.
        requires_base: the method treats one input as the base (and needs one).
        model_count: (min, max or None) number of INPUTS, base included, as mergekit counts them.
        tensor_params: per-model tunables (`kind="model"`).
        global_params: per-tensor shared tunables (`kind="global"`).
        base_takes_model_params: whether the base input also gets per-model values (linear: yes, the
            base is an ordinary input; task arithmetic family: no, only non-base models do).
        uses_generator: whether `merge` draws random numbers (DARE).
        optional_base: the method works with or without a base, and treats it as the base when one is
            given (nuslerp, multislerp: task vectors against it); `requires_base` implies it.
        non_base_count: (min, max or None) number of inputs other than the base, when the method
            counts them (nuslerp: exactly 2), checked besides `model_count`.
    """

    name: ClassVar[str]
    requires_base: ClassVar[bool] = False
    optional_base: ClassVar[bool] = False
    non_base_count: ClassVar[tuple[int, int | None] | None] = None
    model_count: ClassVar[tuple[int, int | None]] = (1, None)
    tensor_params: ClassVar[tuple[Tunable, ...]] = ()
    global_params: ClassVar[tuple[Tunable, ...]] = ()
    base_takes_model_params: ClassVar[bool] = True
    uses_generator: ClassVar[bool] = False
    reference_url: ClassVar[str] = ""

    # ---- declarations ---------------------------------------------------------------------
    @property
    def takes_base(self) -> bool:
        """Whether a given base model has the base's role (not that of an ordinary input)."""
        return self.requires_base or self.optional_base

    @property
    def tunables(self) -> tuple[Tunable, ...]:
        return self.tensor_params + self.global_params

    def tunable(self, name: str) -> Tunable | None:
        return next((t for t in self.tunables if t.name == name), None)

    def param_names(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.tunables)

    def params_for(self, model: str, base: str | None) -> tuple[Tunable, ...]:
        """The per-model tunables that `model` takes (none for the base of a base-aware method)."""
        if self.takes_base and model == base and not self.base_takes_model_params:
            return ()
        return self.tensor_params

    # ---- checks the engine runs before merging ---------------------------------------------
    def check_param_name(self, name: str, where: str) -> Tunable:
        """Return the tunable called `name`, or raise ConfigError with a suggestion."""
        import difflib

        found = self.tunable(name)
        if found is not None:
            return found
        known = self.param_names()
        close = difflib.get_close_matches(name, known, n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        listing = ", ".join(known) if known else "none"
        raise ConfigError(
            f"unknown parameter {name!r} for merge method {self.name!r}",
            where=where,
            fix=f"{hint}{self.name} takes: {listing}",
        )

    def check_params(self, params: dict[str, Any], where: str) -> dict[str, float | bool]:
        """Check a `parameters:` mapping of scalar values (names and ranges). Returns coerced values.

        `where` is the field path of the mapping, e.g. "models[1].parameters"; errors name
        "models[1].parameters.density".
        """
        out = {}
        for key, value in params.items():
            tunable = self.check_param_name(key, f"{where}.{key}")
            out[key] = tunable.check(value, f"{where}.{key}")
        return out

    def inputs(self, models: list[str], base: str | None, *, append_base: bool = True) -> list[str]:
        """The ordered input list mergekit builds: with `models:`, a base that is not listed is
        appended at the end (for every method); with `slices:` (`append_base=False`) it is not."""
        order = list(models)
        if append_base and base is not None and base not in order:
            order.append(base)
        return order

    def check_models(
        self, models: list[str], base: str | None, where: str = "models", *, append_base: bool = True
    ) -> list[str]:
        """Check input count and base rules; return the ordered inputs `merge` will receive."""
        seen = set()
        for model in models:
            if model in seen:
                raise ConfigError(
                    f"model {model!r} is listed twice",
                    where=where,
                    fix="list each input model once",
                )
            seen.add(model)
        order = self.inputs(models, base, append_base=append_base)
        if self.requires_base:
            if base is None:
                raise ConfigError(
                    f"merge method {self.name!r} needs a base model",
                    where="base_model",
                    fix=f"add base_model: <path> (the model {self.name} computes task vectors"
                    " against / interpolates from)",
                )
            if base not in order:
                raise ConfigError(
                    f"base model {base!r} is not among the inputs",
                    where=where,
                    fix="add the base model to the sources of this slice",
                )
        low, high = self.model_count
        count = len(order)
        if count < low or (high is not None and count > high):
            if high == low:
                need = f"exactly {low}"
            elif high is None:
                need = f"at least {low}"
            else:
                need = f"between {low} and {high}"
            base_note = " (the base model counts)" if base is not None and base in order else ""
            raise ConfigError(
                f"merge method {self.name!r} takes {need} input models{base_note}, got {count}",
                where=where,
                fix=f"give {self.name} {need} models",
            )
        if self.non_base_count is not None:
            low, high = self.non_base_count
            has_base = self.takes_base and base is not None and base in order
            others = count - int(has_base)
            if others < low or (high is not None and others > high):
                need = f"exactly {low}" if high == low else (f"at least {low}" if high is None else
                                                             f"between {low} and {high}")
                raise ConfigError(
                    f"merge method {self.name!r} merges {need} models besides the base, got {others}",
                    where=where,
                    fix=f"give {self.name} {need} models" + (" plus an optional base_model" if self.optional_base
                                                            else ""),
                )
        return order

    def check_tensor(self, models: list[str], base: str | None, model_params: dict[str, dict],
                     global_params: dict, tensor: str) -> None:
        """Checks that need one output tensor's resolved parameters but no tensor data (`plan` runs
        them, so `evomerge validate` refuses what `merge` would). Default: none beyond the ranges."""

    # ---- the merge ------------------------------------------------------------------------
    def merge(
        self,
        tensors: dict[str, torch.Tensor],
        base: str | None,
        model_params: dict[str, dict],
        global_params: dict,
        *,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Merge the tensors of one output weight.

        `tensors` is ordered as the inputs (see `inputs`), base included. `model_params[m]` and
        `global_params` hold resolved scalars; missing ones take the Tunable default (or raise
        ConfigError when required); a name the method does not declare is a ConfigError. Values
        the method does not use for that input (the base's own weight in TIES) are ignored, as
        mergekit ignores them. Inputs of different float dtypes are promoted to a common dtype
        first (as mergekit does); the result has that dtype and the common shape. Non-floating
        tensors (integer buffers) must agree across inputs and are copied. `generator` is used only
        by methods with `uses_generator` (see their docs); None means torch's global RNG.
        """
        if not tensors:
            raise ConfigError(f"merge method {self.name!r} got no input tensors", where="models")
        names = list(tensors)
        base_name = base if (self.takes_base and base is not None) else None
        self.check_models(names, base_name, where="models", append_base=False)
        values = [tensors[n] for n in names]
        first = values[0]
        _check_shapes(names, values)
        if not all(v.is_floating_point() for v in values):
            return _copied_buffer(names, values)
        values = _promoted(values)
        dtype = values[0].dtype
        self._check_given_names(model_params, global_params)
        per_model = [self._resolve_model(n, base_name, model_params.get(n) or {}) for n in names]
        shared = self._resolve_global(global_params or {})
        base_index = names.index(base_name) if base_name is not None else None
        result = self._merge(values, base_index, per_model, shared, generator)
        if result.shape != first.shape or result.dtype != dtype:
            raise AssertionError(  # a bug in a method, not a user error
                f"{self.name} returned {tuple(result.shape)} {result.dtype}, expected "
                f"{tuple(first.shape)} {dtype}"
            )
        return result

    def _check_given_names(self, model_params: dict[str, dict] | None, global_params: dict | None) -> None:
        """Every given parameter name is one of this method's tunables."""
        for model, given in (model_params or {}).items():
            for key in given or {}:
                self.check_param_name(key, f"parameters.{key} (model {model})")
        for key in global_params or {}:
            self.check_param_name(key, f"parameters.{key}")

    def _resolve_model(self, model: str, base: str | None, given: dict) -> dict:
        out = {}
        for tunable in self.params_for(model, base):
            where = f"parameters.{tunable.name} (model {model})"
            value = given.get(tunable.name)
            if value is None:
                if tunable.required:
                    raise ConfigError(
                        f"missing required parameter {tunable.name!r} for model {model!r}",
                        where=where,
                        fix=f"set {tunable.name} in the model's parameters or the global"
                        " parameters",
                    )
                out[tunable.name] = tunable.default
            else:
                out[tunable.name] = tunable.check(value, where)
        return out

    def _resolve_global(self, given: dict) -> dict:
        out = {}
        for tunable in self.global_params:
            where = f"parameters.{tunable.name}"
            value = given.get(tunable.name)
            if value is None:
                if tunable.required:
                    raise ConfigError(
                        f"missing required parameter {tunable.name!r} for {self.name}",
                        where=where,
                        fix=f"set {tunable.name} in the recipe's parameters",
                    )
                out[tunable.name] = tunable.default
            else:
                out[tunable.name] = tunable.check(value, where)
        return out

    def _merge(
        self,
        tensors: list[torch.Tensor],
        base_index: int | None,
        model_params: list[dict],
        global_params: dict,
        generator: torch.Generator | None,
    ) -> torch.Tensor:
        """The formula: inputs share one float dtype and shape; params are checked and complete."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<merge method {self.name}>"


def _check_shapes(names: list[str], values: list[torch.Tensor]) -> None:
    """The inputs of one output tensor share one shape."""
    first = values[0]
    for n, v in zip(names, values):
        if v.shape != first.shape:
            raise CheckpointError(
                f"tensor shapes disagree: {names[0]} has {tuple(first.shape)}, {n} has "
                f"{tuple(v.shape)}",
                where=n,
                fix="merge models of the same architecture and size",
            )


def _copied_buffer(names: list[str], values: list[torch.Tensor]) -> torch.Tensor:
    """A non-floating tensor (an integer buffer) is not merged: it must agree across inputs, and is copied."""
    import torch

    first = values[0]
    if any(v.dtype != first.dtype or not torch.equal(v, first) for v in values[1:]):
        raise CheckpointError(
            "a non-floating-point buffer differs between inputs",
            where=", ".join(names),
            fix="merge models whose integer buffers agree",
        )
    return first.clone()


def _promoted(values: list[torch.Tensor]) -> list[torch.Tensor]:
    """The inputs in their common float dtype (torch.promote_types, as mergekit does)."""
    import torch

    dtype = values[0].dtype
    for v in values[1:]:
        dtype = torch.promote_types(dtype, v.dtype)
    return [v.to(dtype) for v in values]
