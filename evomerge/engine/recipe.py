"""A merge recipe is mergekit's YAML schema; this module reads, writes and resolves it.

`MergeRecipe` mirrors mergekit 0.1.5's `MergeConfiguration` (the subset evomerge executes) with
`extra="forbid"` everywhere, so a typo is an error with its field path instead of a silently ignored
key. `to_yaml` writes short YAML mergekit-yaml accepts (number lists in flow style, `# ...` header
comments), and `from_yaml(to_yaml(r)) == r`.

Parameter resolution (`resolve_parameter`, `evaluate_setting`) follows mergekit exactly:
- scopes are searched from most to least specific (a slice source's / model's own `parameters`, then
  the output slice's, then the top-level `parameters`); the first scope that yields a value wins;
- a gradient (list of numbers) is read at position t in [0, 1]: `scaled = t * (n - 1)`, linear between
  `values[int(scaled)]` and the next one; t is `i / (layers_in_slice - 1)` for the i-th layer of an
  output slice (1 when the slice has one layer) and 0 for non-layer tensors (embeddings, final norm,
  lm_head), so those take a gradient's first value;
- a list of `{filter, value}` is searched in order and the first entry whose filter is absent, `"*"`,
  or a substring of the tensor name wins; if none matches, the next scope is searched.

`random_seed` is evomerge's one extension (mergekit takes `--random-seed` on its command line instead).
mergekit 0.1.5 ignores unknown top-level keys, so a recipe carrying it still runs under mergekit-yaml.
"""

from __future__ import annotations

import difflib
import math
import os
from pathlib import Path
from typing import Any, Callable, Iterable, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr
from pydantic import ValidationError, field_validator, model_validator

from evomerge.errors import ConfigError
from evomerge.yamlfile import comment_header
from evomerge.yamlfile import parse as parse_yaml
from evomerge.yamlfile import read_text

Scalar = Union[StrictBool, StrictInt, StrictFloat, StrictStr]
ScalarOrGradient = Union[Scalar, list[Scalar]]

DTYPES = ("float32", "float16", "bfloat16", "float64")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=False)


class ConditionalParameter(_Strict):
    """One `{filter, value}` entry: applies to tensors whose name contains `filter`."""

    filter: str | None = None
    value: ScalarOrGradient


ParameterSetting = Union[ScalarOrGradient, ConditionalParameter, list[ConditionalParameter]]


class InputModel(_Strict):
    """An entry of `models:`: a model path and its own parameters."""

    model: str
    parameters: dict[str, ParameterSetting] | None = None


class InputSlice(_Strict):
    """A source of an output slice: layers [start, end) of one model."""

    model: str
    layer_range: tuple[int, int]
    parameters: dict[str, ParameterSetting] | None = None

    @field_validator("layer_range")
    @classmethod
    def _ordered(cls, v: tuple[int, int]) -> tuple[int, int]:
        if v[0] < 0 or v[1] <= v[0]:
            raise ValueError(f"layer_range must be [start, end) with 0 <= start < end, got {list(v)}")
        return v


class OutputSlice(_Strict):
    """An entry of `slices:`: sources merged into consecutive output layers."""

    sources: list[InputSlice] = Field(min_length=1)
    base_model: str | None = None
    parameters: dict[str, ParameterSetting] | None = None

    @model_validator(mode="after")
    def _same_length(self) -> "OutputSlice":
        lengths = {s.layer_range[1] - s.layer_range[0] for s in self.sources}
        if len(lengths) > 1:
            raise ValueError(
                "all sources of a slice must span the same number of layers, got "
                + ", ".join(f"{s.model}: {list(s.layer_range)}" for s in self.sources)
            )
        return self


class MergeRecipe(_Strict):
    """mergekit's YAML schema (the part evomerge runs) plus `random_seed` for DARE."""

    merge_method: str
    base_model: str | None = None
    models: list[InputModel] | None = None
    slices: list[OutputSlice] | None = None
    parameters: dict[str, ParameterSetting] | None = None
    dtype: Literal["float32", "float16", "bfloat16", "float64"] | None = None
    out_dtype: Literal["float32", "float16", "bfloat16", "float64"] | None = None
    tokenizer_source: str | None = None
    tokenizer: dict | None = None  # mergekit's tokenizer: block; refused with a reason (merge.check_recipe)
    chat_template: str | None = None  # Jinja text, a name (chatml), or auto
    random_seed: int | None = None

    @model_validator(mode="after")
    def _models_or_slices(self) -> "MergeRecipe":
        if bool(self.models) == bool(self.slices):
            raise ValueError("give exactly one of 'models' or 'slices' (a non-empty list)")
        return self

    # --- reading --------------------------------------------------------------------------------
    @classmethod
    def from_yaml(cls, text: str, *, source: str | None = None) -> "MergeRecipe":
        data = parse_yaml(text, where=source or "recipe")
        if not isinstance(data, dict):
            raise ConfigError("a recipe must be a YAML mapping with at least 'merge_method'",
                              where=source or "recipe",
                              fix="see examples/ for a complete recipe") from None
        return cls.from_dict(data, source=source)

    @classmethod
    def from_dict(cls, data: dict, *, source: str | None = None) -> "MergeRecipe":
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            raise _config_error(exc, data, source) from None

    # --- writing --------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return self.model_dump(mode="json", exclude_none=True)

    def to_yaml(self, comments: Iterable[str] = ()) -> str:
        import yaml

        header = comment_header(comments)
        body = yaml.dump(self.to_dict(), Dumper=_Dumper, sort_keys=False, default_flow_style=False,
                         allow_unicode=True, width=100)
        return header + body

    # --- convenience ----------------------------------------------------------------------------
    def referenced_models(self) -> list[str]:
        """Every model path in the recipe, in first-mention order (base first)."""
        seen: dict[str, None] = {}
        if self.base_model:
            seen[self.base_model] = None
        for m in self.models or []:
            seen[m.model] = None
        for s in self.slices or []:
            if s.base_model:
                seen[s.base_model] = None
            for src in s.sources:
                seen[src.model] = None
        return list(seen)

    def relocated(self, root: str | os.PathLike) -> "MergeRecipe":
        """The same recipe with every model folder looked up by its name under `root` (a recipe moved
        to another machine: `/old/place/up` becomes `root/up`). Two models with one folder name are
        refused: they cannot both live under `root`."""
        names: dict[str, str] = {}
        for model in self.referenced_models() + ([self.tokenizer_source] if self.tokenizer_source not in
                                                 (None, "base", "union") else []):
            name = Path(model.rstrip("/\\")).name
            if names.setdefault(name, model) != model:
                raise ConfigError(f"--model-root cannot tell {names[name]!r} and {model!r} apart: both folders "
                                  f"are named {name!r}", where="--model-root",
                                  fix="merge with the paths as written, or rename one of the folders")
        mapping = {model: str(Path(root) / name) for name, model in names.items()}
        data = self.to_dict()

        def move(x):
            if isinstance(x, dict):
                return {k: (mapping.get(v, v) if k in ("model", "base_model", "tokenizer_source")
                            and isinstance(v, str) else move(v)) for k, v in x.items()}
            if isinstance(x, list):
                return [move(v) for v in x]
            return x

        return MergeRecipe.from_dict(move(data))

    def model_fields_paths(self) -> dict[str, str]:
        """model path -> the YAML field where it is first mentioned (for error messages)."""
        where: dict[str, str] = {}
        if self.base_model:
            where.setdefault(self.base_model, "base_model")
        for i, m in enumerate(self.models or []):
            where.setdefault(m.model, f"models[{i}].model")
        for i, s in enumerate(self.slices or []):
            if s.base_model:
                where.setdefault(s.base_model, f"slices[{i}].base_model")
            for j, src in enumerate(s.sources):
                where.setdefault(src.model, f"slices[{i}].sources[{j}].model")
        if self.tokenizer_source and self.tokenizer_source not in ("base", "union"):
            where.setdefault(self.tokenizer_source, "tokenizer_source")
        return where

    def iter_parameter_settings(self) -> Iterable[tuple[str, str, Any, bool]]:
        """(yaml path of the parameters block, name, setting, per_model) for every setting."""
        for name, setting in (self.parameters or {}).items():
            yield "parameters", name, setting, False
        for i, m in enumerate(self.models or []):
            for name, setting in (m.parameters or {}).items():
                yield f"models[{i}].parameters", name, setting, True
        for i, s in enumerate(self.slices or []):
            for name, setting in (s.parameters or {}).items():
                yield f"slices[{i}].parameters", name, setting, False
            for j, src in enumerate(s.sources):
                for name, setting in (src.parameters or {}).items():
                    yield f"slices[{i}].sources[{j}].parameters", name, setting, True


def load_recipe(path: str | os.PathLike) -> MergeRecipe:
    """Read a recipe file; a missing or malformed file is a ConfigError naming it."""
    text = read_text(
        path, what="recipe file",
        missing_fix="check the path (relative paths are resolved from the current folder)",
    )
    return MergeRecipe.from_yaml(text, source=str(path))


# --- YAML output ----------------------------------------------------------------------------------
def _make_dumper():
    import yaml

    class Dumper(yaml.SafeDumper):
        """Number lists in flow style (`[0, 0.5, 1]`), everything else block style."""

        def represent_list(self, data):
            flow = all(isinstance(e, (int, float)) and not isinstance(e, bool) for e in data)
            return self.represent_sequence("tag:yaml.org,2002:seq", data, flow_style=flow)

    Dumper.add_representer(list, Dumper.represent_list)
    return Dumper


class _LazyDumper:
    _cls = None

    def __call__(self, *args, **kwargs):
        if _LazyDumper._cls is None:
            _LazyDumper._cls = _make_dumper()
        return _LazyDumper._cls(*args, **kwargs)


_Dumper = _LazyDumper()


# --- validation errors ----------------------------------------------------------------------------
_FIELDS = {
    "recipe": list(MergeRecipe.model_fields),
    "model": list(InputModel.model_fields),
    "slice": list(OutputSlice.model_fields),
    "source": list(InputSlice.model_fields),
    "cond": list(ConditionalParameter.model_fields),
}


def format_path(loc: Iterable[Any]) -> str:
    """('models', 1, 'parameters', 'density') -> 'models[1].parameters.density'."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out


def _clean_loc(loc: tuple) -> tuple:
    # pydantic puts union-branch names into the location (e.g. 'list[ConditionalParameter]'); drop them.
    out = []
    for part in loc:
        if isinstance(part, str) and ("[" in part or part in (
                "bool", "int", "float", "str", "ConditionalParameter", "tuple", "literal")):
            continue
        if isinstance(part, str) and part.startswith("function-"):
            continue
        out.append(part)
    return tuple(out)


def _config_error(exc: ValidationError, data: dict, source: str | None) -> ConfigError:
    errors = exc.errors()
    # Prefer the most informative error: unknown keys first, then missing, then the rest.
    def rank(e):
        return {"extra_forbidden": 0, "missing": 1}.get(e["type"], 2)

    err = sorted(errors, key=rank)[0]
    loc = _clean_loc(tuple(err["loc"]))
    where = format_path(loc) or "recipe"
    if source:
        where = f"{source}: {where}"
    if err["type"] == "extra_forbidden":
        key = str(loc[-1]) if loc else "?"
        kind = _kind_of(loc[:-1])
        known = _FIELDS[kind]
        close = difflib.get_close_matches(key, known, n=1)
        fix = f"did you mean '{close[0]}'?" if close else f"allowed keys here: {', '.join(known)}"
        if key in ("modules", "residual_weight"):
            fix = f"'{key}' is a mergekit option evomerge does not support; remove it"
        return ConfigError(f"unknown key '{key}'", where=where, fix=fix)
    if err["type"] == "missing":
        return ConfigError("required key is missing", where=where, fix="add it (see examples/)")
    msg = err["msg"]
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, "):]
    fix = None
    if loc and loc[-1] in ("dtype", "out_dtype"):
        fix = f"use one of {', '.join(DTYPES)}"
    return ConfigError(msg, where=where, fix=fix)


def _kind_of(loc: tuple) -> str:
    if not loc:
        return "recipe"
    names = [p for p in loc if isinstance(p, str)]
    last = names[-1] if names else ""
    if last == "models":
        return "model"
    if last == "sources":
        return "source"
    if last == "slices":
        return "slice"
    if "parameters" in names:
        return "cond"
    return "recipe"


# --- parameter resolution (mergekit's rules) ------------------------------------------------------
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
