"""A merge recipe is mergekit's YAML schema; this module reads and writes it.

`MergeRecipe` mirrors mergekit 0.1.5's `MergeConfiguration` with `extra="forbid"` everywhere: `models:`,
`slices:` or `modules: {default: ...}`, parameters, dtypes, `tokenizer_source` or the `tokenizer:`
block (`source`, `tokens`, `pad_to_multiple_of`), `chat_template`, and a top-level `name:` (mergekit's
multi-merge files name each merge; it changes nothing). Before the schema sees a file, `keys.py` sorts
out the keys mergekit would silently ignore (a warning each) from typos (one error naming them all).
`to_yaml` writes short YAML mergekit-yaml accepts (number lists in flow style, `# ...` header
comments), and `from_yaml(to_yaml(r)) == r`. How a parameter's value is found for one tensor is
`parameters.py`.

`random_seed` is evomerge's one extension (mergekit takes `--random-seed` on its command line instead).
mergekit 0.1.5 ignores unknown top-level keys, so a recipe carrying it still runs under mergekit-yaml.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterable, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr
from pydantic import ValidationError, field_validator, model_validator

from evomerge.errors import ConfigError
from evomerge.yamlfile import comment_header
from evomerge.yamlfile import parse as parse_yaml
from evomerge.yamlfile import read_text

Scalar = Union[StrictBool, StrictInt, StrictFloat, StrictStr]
ScalarOrGradient = Union[Scalar, list[Scalar]]

DTYPES = ("float32", "float16", "bfloat16", "float64")
MODULE = "default"  # the one module of a single-stack model, as mergekit names it


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


class OutputModule(_Strict):
    """An entry of `modules:` (mergekit's form for models with several layer stacks): `models` or
    `slices`, and parameters searched after a slice's and before the top-level ones."""

    models: list[InputModel] | None = None
    slices: list[OutputSlice] | None = None
    parameters: dict[str, ParameterSetting] | None = None

    @model_validator(mode="after")
    def _models_or_slices(self) -> "OutputModule":
        if bool(self.models) == bool(self.slices):
            raise ValueError("give exactly one of 'models' or 'slices' (a non-empty list)")
        return self


class ModelTokenSource(_Strict):
    """A new token's embedding row taken from one model's token (`token_id` or `token`)."""

    kind: Literal["model_token"]
    model: str
    token_id: int | None = None
    token: str | None = None

    @model_validator(mode="after")
    def _one_of(self) -> "ModelTokenSource":
        if (self.token_id is None) == (self.token is None):
            raise ValueError("give exactly one of token_id or token")
        return self


class ZeroSource(_Strict):
    """A token's embedding row of zeros."""

    kind: Literal["zero"]


class TokenEmbedding(_Strict):
    """An entry of `tokenizer.tokens`: where the token's row comes from; `force` uses that source
    even for models that have the token."""

    source: ModelTokenSource | ZeroSource | str | None = None
    force: bool = False


class TokenizerSpec(_Strict):
    """mergekit's `tokenizer:` block: the output vocabulary (`base`, `union` or a model's) and rows."""

    source: str = "union"
    tokens: dict[str, TokenEmbedding] | None = None
    pad_to_multiple_of: int | None = Field(None, ge=1)


class MergeRecipe(_Strict):
    """mergekit's YAML schema plus `random_seed` for DARE."""

    name: str | None = None  # mergekit-multi names its merges; one recipe ignores it
    merge_method: str
    base_model: str | None = None
    models: list[InputModel] | None = None
    slices: list[OutputSlice] | None = None
    modules: dict[str, OutputModule] | None = None
    parameters: dict[str, ParameterSetting] | None = None
    dtype: Literal["float32", "float16", "bfloat16", "float64"] | None = None
    out_dtype: Literal["float32", "float16", "bfloat16", "float64"] | None = None
    tokenizer_source: str | None = None
    tokenizer: TokenizerSpec | None = None
    chat_template: str | None = None  # Jinja text, a name (chatml, alpaca, ...), or auto
    random_seed: int | None = None

    @model_validator(mode="after")
    def _one_body(self) -> "MergeRecipe":
        if sum(bool(x) for x in (self.models, self.slices, self.modules)) != 1:
            raise ValueError("give exactly one of 'models', 'slices' or 'modules' (non-empty)")
        if self.modules and list(self.modules) != [MODULE]:
            raise ValueError(f"evomerge merges models with one layer stack, which mergekit calls module "
                             f"'{MODULE}'; got modules {', '.join(map(repr, self.modules))}")
        if self.tokenizer_source is not None and self.tokenizer is not None:
            raise ValueError("give tokenizer_source or the tokenizer: block, not both")
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
        from evomerge.engine.keys import sort_keys

        data = sort_keys(data, source)
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            raise _config_error(exc, data, source) from None

    # --- writing --------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return self.model_dump(mode="json", exclude_none=True, exclude_defaults=False)

    def to_yaml(self, comments: Iterable[str] = ()) -> str:
        import yaml

        header = comment_header(comments)
        body = yaml.dump(self.to_dict(), Dumper=_Dumper, sort_keys=False, default_flow_style=False,
                         allow_unicode=True, width=100)
        return header + body

    # --- the body: models or slices, at the top or in modules.default ---------------------------
    @property
    def input_models(self) -> list[InputModel] | None:
        return self.modules[MODULE].models if self.modules else self.models

    @property
    def output_slices(self) -> list[OutputSlice] | None:
        return self.modules[MODULE].slices if self.modules else self.slices

    @property
    def module_parameters(self) -> dict[str, ParameterSetting] | None:
        return self.modules[MODULE].parameters if self.modules else None

    @property
    def body_path(self) -> str:
        """The YAML path prefix of `models`/`slices` in error messages ("" or "modules.default.")."""
        return f"modules.{MODULE}." if self.modules else ""

    @property
    def tokenizer_choice(self) -> str | None:
        """The output vocabulary asked for: `base`, `union`, a model, or None (the donor's, as is)."""
        return self.tokenizer.source if self.tokenizer is not None else self.tokenizer_source

    def referenced_models(self) -> list[str]:
        """Every model path in the recipe, in first-mention order (base first)."""
        return list(self.model_fields_paths(tokenizer=False))

    def relocated(self, root: str | os.PathLike) -> "MergeRecipe":
        """The same recipe with every model folder looked up by its name under `root` (a recipe moved
        to another machine: `/old/place/up` becomes `root/up`). Two models with one folder name are
        refused: they cannot both live under `root`; so is a reference that would lead outside it."""
        from evomerge.engine.model_root import under_root

        return self.renamed(under_root(list(self.model_fields_paths()), root,
                                       fix="merge with the paths as written, or rename one of the folders"))

    def renamed(self, mapping: dict[str, str]) -> "MergeRecipe":
        """The same recipe with each model reference in `mapping` replaced by its value (everywhere a
        model is named: models, slices, base_model, tokenizer sources)."""
        def move(x, key=None):
            if isinstance(x, str) and key in ("model", "base_model", "tokenizer_source", "source"):
                return mapping.get(x, x)
            if isinstance(x, dict):
                return {k: move(v, k) for k, v in x.items()}
            if isinstance(x, list):
                return [move(v) for v in x]
            return x

        return MergeRecipe.from_dict(move(self.to_dict()))

    def model_fields_paths(self, *, tokenizer: bool = True) -> dict[str, str]:
        """model path -> the YAML field where it is first mentioned (for error messages); with
        `tokenizer`, also the models that only give a tokenizer or token rows."""
        where: dict[str, str] = {}
        if self.base_model:
            where.setdefault(self.base_model, "base_model")
        body = self.body_path
        for i, m in enumerate(self.input_models or []):
            where.setdefault(m.model, f"{body}models[{i}].model")
        for i, s in enumerate(self.output_slices or []):
            if s.base_model:
                where.setdefault(s.base_model, f"{body}slices[{i}].base_model")
            for j, src in enumerate(s.sources):
                where.setdefault(src.model, f"{body}slices[{i}].sources[{j}].model")
        if tokenizer:
            for model, at in self._tokenizer_models():
                where.setdefault(model, at)
        return where

    def _tokenizer_models(self) -> Iterable[tuple[str, str]]:
        choice = self.tokenizer_choice
        if choice not in (None, "base", "union"):
            yield choice, ("tokenizer.source" if self.tokenizer is not None else "tokenizer_source")
        for token, spec in ((self.tokenizer.tokens or {}) if self.tokenizer else {}).items():
            src = spec.source
            model = src.model if isinstance(src, ModelTokenSource) else src if isinstance(src, str) else None
            if model is not None:
                yield model, f"tokenizer.tokens[{token!r}].source"

    def iter_parameter_settings(self) -> Iterable[tuple[str, str, Any, bool]]:
        """(yaml path of the parameters block, name, setting, per_model) for every setting."""
        for name, setting in (self.parameters or {}).items():
            yield "parameters", name, setting, False
        body = self.body_path
        for name, setting in (self.module_parameters or {}).items():
            yield f"modules.{MODULE}.parameters", name, setting, False
        for i, m in enumerate(self.input_models or []):
            for name, setting in (m.parameters or {}).items():
                yield f"{body}models[{i}].parameters", name, setting, True
        for i, s in enumerate(self.output_slices or []):
            for name, setting in (s.parameters or {}).items():
                yield f"{body}slices[{i}].parameters", name, setting, False
            for j, src in enumerate(s.sources):
                for name, setting in (src.parameters or {}).items():
                    yield f"{body}slices[{i}].sources[{j}].parameters", name, setting, True


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
    if err["type"] == "extra_forbidden":  # keys.sort_keys finds these first; a dict built by code may not
        return ConfigError(f"unknown key '{loc[-1] if loc else '?'}'", where=where, fix="remove it")
    if err["type"] == "missing":
        return ConfigError("required key is missing", where=where, fix="add it (see examples/)")
    msg = err["msg"]
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, "):]
    fix = None
    if loc and loc[-1] in ("dtype", "out_dtype"):
        fix = f"use one of {', '.join(DTYPES)}"
    return ConfigError(msg, where=where, fix=fix)
