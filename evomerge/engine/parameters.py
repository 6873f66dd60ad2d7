"""How one parameter's value is found for one tensor: mergekit 0.1.5's scopes, filters and gradients.

Why it exists: a recipe says `t: [0, 0.5, 1]` or `density: [{filter: mlp, value: 0.3}, {value: 0.7}]`;
the plan needs one number per tensor and model. These rules are mergekit's exactly:
- scopes are searched from most to least specific (a slice source's / model's own `parameters`, then
  the output slice's, then a module's, then the top-level `parameters`); the first scope that yields
  a value wins;
- a gradient (list of numbers) is read at position t in [0, 1]: `scaled = t * (n - 1)`, linear between
  `values[int(scaled)]` and the next one; t is `i / (layers_in_slice - 1)` for the i-th layer of an
  output slice (1 when the slice has one layer) and 0 for non-layer tensors (embeddings, final norm,
  lm_head), so those take a gradient's first value;
- a list of `{filter, value}` is searched in order and the first entry whose filter is absent, `"*"`,
  or a substring of the tensor name wins; if none matches, the next scope is searched.
The plan (`plan.py`) and the report's per-layer curves (search/report.py) read values through here.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Iterable

from evomerge.engine.recipe import ConditionalParameter

def layer_t(index: int, num_layers: int) -> float:
    """Position of the index-th layer of an output slice in a gradient (mergekit's plan_slice)."""
    return index / (num_layers - 1) if num_layers > 1 else 1.0


def filter_matches(filter_: str | None, tensor_name: str) -> bool:
    """mergekit: no filter or '*' matches everything, else substring match on the tensor name."""
    return filter_ is None or filter_ == "*" or (bool(tensor_name) and filter_ in tensor_name)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def evaluate_setting(setting: Any, tensor_name: str, t: float = 0.0,
                     coerce: Callable[[Any], Any] = lambda v: v) -> Any:
    """Resolve filters and gradients to one value, or None when no filter matches (mergekit)."""
    if isinstance(setting, ConditionalParameter):
        setting = [setting]
    if isinstance(setting, (bool, int, float, str)):
        return coerce(setting)
    if isinstance(setting, list):
        if not setting:
            return None
        if all(isinstance(e, (bool, int, float, str)) for e in setting):
            values = [coerce(e) for e in setting]
            if not all(_is_number(v) for v in values):
                return values[int(t * (len(values) - 1))]
            scaled = t * (len(values) - 1)
            i0 = int(scaled)
            i1 = min(len(values) - 1, i0 + 1)
            frac = scaled - i0
            return coerce((1 - frac) * values[i0] + frac * values[i1])
        for cond in setting:
            if filter_matches(cond.filter, tensor_name):
                return evaluate_setting(cond.value, tensor_name, t, coerce)
        return None
    raise TypeError(f"unexpected parameter setting {setting!r}")


def resolve_parameter(name: str, scopes: Iterable[dict | None], tensor_name: str, t: float,
                      coerce: Callable[[Any], Any] = lambda v: v) -> Any:
    """First value found for `name`, scanning scopes from most to least specific; None if absent."""
    for scope in scopes:
        if scope and name in scope:
            value = evaluate_setting(scope[name], tensor_name, t, coerce)
            if value is not None:
                return value
    return None


def setting_scalars(setting: Any, where: str) -> Iterable[tuple[Any, str]]:
    """Every scalar in a setting with its YAML path (for bound checks that name the field)."""
    if isinstance(setting, ConditionalParameter):
        yield from setting_scalars(setting.value, f"{where}.value")
    elif isinstance(setting, list):
        for i, e in enumerate(setting):
            if isinstance(e, ConditionalParameter):
                yield from setting_scalars(e.value, f"{where}[{i}].value")
            else:
                yield e, f"{where}[{i}]"
    else:
        yield setting, where


def to_float(value: Any) -> Any:
    """Numbers stay numbers; numeric strings ('1e-3', which YAML reads as text) become floats."""
    if isinstance(value, str):
        try:
            f = float(value)
        except ValueError:
            return value
        return f
    return value


def is_finite_number(value: Any) -> bool:
    return _is_number(value) and math.isfinite(value)
