"""The merge plan: a recipe and its sources -> every output tensor's inputs and resolved parameters.

`plan(recipe, sources)` does every check and resolves, for each output tensor, which source tensors
feed it and the parameter values that apply to it (gradients and filters resolved exactly as mergekit
0.1.5 does; see evomerge.engine.recipe). It is cheap (no tensor data): the structure of a recipe's
shape is cached on `sources`, so a search re-plans each trial in milliseconds. `execution.py` computes
a plan into a sink; `merge.py` (`evomerge merge`, `evomerge validate`) and the search's workers call it.

How mergekit 0.1.5 lays out a merge, and so how we do:
- `models:` is one output slice whose sources are every listed model over all its layers; a
  `base_model` that is not listed is appended as the last input (for every method).
- Layer tensors of the i-th layer of an output slice read layer `layer_range[0] + i` of each source
  and are written as layer (layers of earlier slices + i): passthrough slices stack and renumber.
- Non-layer tensors take their inputs and parameters from the first slice (embeddings) or the last
  slice (final norm, lm_head), with t = 0 for gradients. An `lm_head.weight` missing from a tied
  checkpoint is read from its embedding (mergekit's tied_names); if no input has one, none is written.
- Tensors are read in their stored dtype and cast to `dtype` when set; the method computes in the
  promoted input dtype (upcasting internally where mergekit does); the result is cast to `out_dtype`
  when set. The output config's dtype is `out_dtype`, else `dtype`, else the donor's.
- The output config, generation config and tokenizer come from the base model, else the first model;
  with slices its layer count is the sum of the slices, and its per-layer lists (`layer_types`, ...)
  are rebuilt from the layers the slices stack (`layer_config.py`; mergekit leaves them as they were).
- Without `tokenizer_source` or a `tokenizer:` block the sources must share one vocabulary (checked)
  and embeddings are merged row for row. With one, the output vocabulary is built first
  (`vocabulary.py`) and every matrix indexed by token is re-indexed to it before the method merges
  it, as mergekit does; the output config's vocab_size is its row count.

DARE randomness: each output tensor gets its own `torch.Generator` seeded from (the recipe's
`random_seed`, default 0, and the tensor name), so a recipe always gives the same tensors, in memory
or on disk, whatever order tensors are merged in. (mergekit draws from one global RNG instead, so its
DARE drops differ from ours for the same seed; only the distribution matches.)
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from evomerge.errors import CheckpointError, ConfigError
from evomerge.engine.chat_template import chat_template_text
from evomerge.engine.layer_config import restack
from evomerge.engine.parameters import layer_t, resolve_parameter, setting_scalars, to_float
from evomerge.engine.recipe import MergeRecipe
from evomerge.engine.sinks import TensorSpec
from evomerge.engine.seeds import DEFAULT_SEED

if TYPE_CHECKING:  # pragma: no cover
    from evomerge.engine.checkpoints import Checkpoint, Sources
    from evomerge.engine.methods import MergeMethod
    from evomerge.engine.vocabulary import Vocabulary

FLOAT_DTYPES = ("float64", "float32", "bfloat16", "float16")


# --- plan data ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SliceSource:
    model: str
    start: int
    end: int
    where: str  # YAML path of this source's `parameters` block owner, e.g. "models[1]"


@dataclass(frozen=True)
class NormSlice:
    sources: tuple[SliceSource, ...]
    base: str | None
    where: str


@dataclass(frozen=True)
class TensorTask:
    """One output tensor: where its inputs come from and the resolved parameters."""

    name: str
    inputs: tuple[tuple[str, str], ...]  # (model, tensor name in that model), in input order
    base: str | None
    model_params: dict[str, dict]
    global_params: dict
    load_dtype: str | None
    spec: TensorSpec
    seed: int | None
    vocabulary: "Vocabulary | None" = None  # set for embedding/output matrices re-indexed to a new vocabulary


@dataclass
class MergePlan:
    recipe: MergeRecipe
    method: "MergeMethod"
    tasks: list[TensorTask]
    donor: str  # model whose config/generation config (and default tokenizer) the output takes
    out_config: dict
    num_layers: int
    slices: list[NormSlice] = field(default_factory=list)
    vocabulary: "Vocabulary | None" = None  # the recipe's tokenizer_source / tokenizer: block

    @property
    def specs(self) -> list[TensorSpec]:
        return [t.spec for t in self.tasks]

    @property
    def nbytes(self) -> int:
        return sum(t.spec.nbytes for t in self.tasks)


@dataclass(frozen=True)
class _Slot:
    """Structure of one output tensor, independent of parameter values (cached per recipe shape)."""

    name: str
    inputs: tuple[tuple[str, str], ...]
    slice_index: int
    t: float
    load_dtype: str | None
    spec: TensorSpec
    vocab: bool = False  # rows indexed by token: re-indexed when the recipe chooses a vocabulary


# --- static checks (no sources) ---------------------------------------------------------------------
def check_recipe(recipe: MergeRecipe) -> "MergeMethod":
    """Method, parameter names and values, model counts and base rules; returns the method."""
    from evomerge.engine import methods

    method = methods.get(recipe.merge_method)
    for block, name, setting, per_model in recipe.iter_parameter_settings():
        where = f"{block}.{name}"
        tunable = method.check_param_name(name, where)
        if per_model and tunable.kind == "global":
            raise ConfigError(
                f"{name!r} is a global option of {method.name}; a per-model value is ignored by mergekit",
                where=where, fix=f"move {name} to the top-level parameters (or the slice's parameters)")
        for value, at in setting_scalars(setting, where):
            tunable.check(to_float(value) if tunable.type == "float" else value, at)
    body = recipe.body_path
    if recipe.input_models:
        method.check_models([m.model for m in recipe.input_models], recipe.base_model, where=f"{body}models",
                            append_base=True)
    else:
        for i, s in enumerate(recipe.output_slices or []):
            method.check_models([src.model for src in s.sources], s.base_model or recipe.base_model,
                                where=f"{body}slices[{i}].sources", append_base=False)
    if recipe.chat_template is not None:
        chat_template_text(recipe, None)  # a name we do not know, or text that is no template
    return method


# --- planning -----------------------------------------------------------------------------------------
def plan(recipe: MergeRecipe, sources: "Sources") -> MergePlan:
    """Check the recipe against its sources and resolve every output tensor. Cheap (no tensor data)."""
    method = check_recipe(recipe)
    key = _structure_key(recipe)
    cached = sources.cache.get(("plan-structure", key))
    if cached is None:
        cached = _structure(recipe, method, sources)
        sources.cache[("plan-structure", key)] = cached
    slices, slots, donor, out_config, num_layers, vocabulary = cached
    seed = None
    if method.uses_generator:
        seed = recipe.random_seed if recipe.random_seed is not None else DEFAULT_SEED
    resolver = _Resolver(recipe, method, slices)
    tasks = []
    for slot in slots:
        sl = slices[slot.slice_index]
        base = sl.base
        model_params, global_params = resolver.resolve(slot, base)
        method.check_tensor([m for m, _ in slot.inputs], base, model_params, global_params, slot.name)
        tasks.append(TensorTask(
            name=slot.name, inputs=slot.inputs, base=base, model_params=model_params,
            global_params=global_params, load_dtype=slot.load_dtype, spec=slot.spec,
            seed=None if seed is None else tensor_seed(seed, slot.name),
            vocabulary=vocabulary if slot.vocab else None))
    return MergePlan(recipe=recipe, method=method, tasks=tasks, donor=donor, out_config=out_config,
                     num_layers=num_layers, slices=slices, vocabulary=vocabulary)


def tensor_seed(seed: int, name: str) -> int:
    """The per-tensor generator seed: a stable hash of (recipe seed, output tensor name)."""
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def _structure_key(recipe: MergeRecipe) -> str:
    shape = {
        "base": recipe.base_model, "dtype": recipe.dtype, "out_dtype": recipe.out_dtype,
        "models": [m.model for m in recipe.input_models or []],
        "slices": [[s.base_model, [(src.model, list(src.layer_range)) for src in s.sources]]
                   for s in recipe.output_slices or []],
        "method": recipe.merge_method,
        "tokenizer": [recipe.tokenizer_source, recipe.tokenizer.model_dump(mode="json") if recipe.tokenizer else None],
    }
    return json.dumps(shape, sort_keys=True)


def _normalize(recipe: MergeRecipe, method: "MergeMethod", sources: "Sources") -> list[NormSlice]:
    body = recipe.body_path
    if recipe.input_models:
        srcs = []
        for i, m in enumerate(recipe.input_models):
            srcs.append(SliceSource(m.model, 0, sources.num_layers(m.model), f"{body}models[{i}]"))
        if recipe.base_model and recipe.base_model not in {m.model for m in recipe.input_models}:
            srcs.append(SliceSource(recipe.base_model, 0, sources.num_layers(recipe.base_model), "base_model"))
        counts = {s.end for s in srcs}
        if len(counts) > 1:
            detail = ", ".join(f"{s.model}: {s.end}" for s in srcs)
            raise CheckpointError(f"the models have different layer counts ({detail})", where=f"{body}models",
                                  fix="use slices: with layer_range to pick matching layers")
        return [NormSlice(tuple(srcs), recipe.base_model, f"{body}models")]
    out = []
    for i, s in enumerate(recipe.output_slices or []):
        srcs = []
        for j, src in enumerate(s.sources):
            n = sources.num_layers(src.model)
            start, end = src.layer_range
            if end > n:
                raise ConfigError(
                    f"layer_range {list(src.layer_range)} is out of bounds: {src.model} has {n} layers",
                    where=f"{body}slices[{i}].sources[{j}].layer_range",
                    fix=f"use a range within [0, {n}] (the end is exclusive)")
            srcs.append(SliceSource(src.model, start, end, f"{body}slices[{i}].sources[{j}]"))
        out.append(NormSlice(tuple(srcs), s.base_model or recipe.base_model, f"{body}slices[{i}]"))
    return out



def _structure(recipe: MergeRecipe, method: "MergeMethod", sources: "Sources"):
    """Everything of a plan that does not depend on parameter values: the slices, every output tensor's
    slot (inputs, gradient position, dtypes), the donor, the output config and the layer count."""
    where = recipe.model_fields_paths()
    referenced = [m for m in recipe.referenced_models() if m in sources]
    missing = [m for m in recipe.referenced_models() if m not in sources]
    if missing:
        raise CheckpointError(f"model {missing[0]!r} was not opened", where=where.get(missing[0]),
                              fix="open Sources with every model the recipe names")
    sources.check_compatible(referenced, where=where, same_vocab=recipe.tokenizer_choice is None)
    slices = _normalize(recipe, method, sources)
    donor = recipe.base_model or slices[0].sources[0].model
    dck = sources.checkpoint(donor)
    vocabulary = None
    if recipe.tokenizer_choice is not None:
        from evomerge.engine.vocabulary import build_vocabulary

        vocabulary = build_vocabulary(recipe, sources, lambda model: _tokenizer_folder(model, sources, where))
    slots = _Slots(recipe, sources, slices, donor, where, vocabulary)
    slots.non_layer(slices[0], 0, pre=True)
    out_layer = slots.layers(dck)
    slots.non_layer(slices[-1], len(slices) - 1, pre=False)
    out_config = _out_config(recipe, dck.config, out_layer)
    if recipe.output_slices:  # lists of one entry per layer (layer_types, ...) follow the new stack
        origins = [(sources.config(sl.sources[0].model), layer) for sl in slices
                   for layer in range(sl.sources[0].start, sl.sources[0].end)]
        out_config = restack(out_config, dck.config, origins)
    if vocabulary is not None:
        out_config["vocab_size"] = vocabulary.size
    return slices, slots.slots, donor, out_config, out_layer, vocabulary


def _tokenizer_folder(model: str, sources: "Sources", where: dict[str, str]):
    """The folder of a model that gives only the tokenizer (opened models give their own)."""
    if model in sources:
        return sources.path(model)
    if model in sources.located:
        return sources.located[model].folder
    from evomerge.engine.references import locate

    return locate(model, where.get(model, "tokenizer_source"), weights=False).folder


class _Slots:
    """The output tensors of a merge in mergekit's order: the first slice's non-layer tensors
    (embeddings), every layer of every slice renumbered, the last slice's non-layer tensors."""

    def __init__(self, recipe: MergeRecipe, sources: "Sources", slices: list[NormSlice], donor: str,
                 where: dict[str, str], vocabulary: "Vocabulary | None" = None):
        self.recipe, self.sources, self.slices, self.donor, self.where = recipe, sources, slices, donor, where
        self.vocabulary = vocabulary
        self.slots: list[_Slot] = []

    def add(self, name: str, inputs: list[tuple[str, str]], slice_index: int, t: float, vocab: bool = False) -> None:
        sources, recipe = self.sources, self.recipe
        infos = [sources.info(m, n) for m, n in inputs]
        shapes = {i.shape[1:] if vocab else i.shape for i in infos}
        if len(shapes) > 1:
            detail = ", ".join(f"{m}: {list(i.shape)}" for (m, _), i in zip(inputs, infos))
            raise CheckpointError(f"tensor shapes disagree for {name} ({detail})",
                                  where=self.slices[slice_index].where,
                                  fix="merge checkpoints of the same architecture and size")
        floating = [i.dtype in FLOAT_DTYPES for i in infos]
        load = recipe.dtype if all(floating) else None
        dts = [load or i.dtype for i in infos]
        if all(floating):
            out_dtype = recipe.out_dtype or _promote(dts)
        else:
            out_dtype = dts[0]
        shape = (self.vocabulary.size, *infos[0].shape[1:]) if vocab else infos[0].shape
        self.slots.append(_Slot(name, tuple(inputs), slice_index, t, load, TensorSpec(name, shape, out_dtype), vocab))

    def non_layer(self, names_from: NormSlice, slice_index: int, pre: bool) -> None:
        """The tensors outside the layers (embeddings if `pre`, else final norm and lm_head)."""
        from evomerge.engine.checkpoints import TIED_FALLBACK

        sources = self.sources
        models = [s.model for s in names_from.sources]
        ordered: list[str] = []
        for m in [self.donor, *models]:
            if m in sources:
                for n in sources.checkpoint(m).non_layer:
                    if n not in ordered and _is_pre(n) == pre:
                        ordered.append(n)
        for name in ordered:
            present = [m for m in models if sources.has(m, name)]
            if not present:
                continue  # e.g. lm_head of tied checkpoints that only the donor has untied
            inputs = []
            for m in models:
                if sources.has(m, name):
                    inputs.append((m, name))
                elif name in TIED_FALLBACK and sources.has(m, TIED_FALLBACK[name]):
                    inputs.append((m, TIED_FALLBACK[name]))
                else:
                    raise CheckpointError(f"{m} has no tensor {name}", where=self.where.get(m),
                                          fix="merge checkpoints of the same architecture")
            self.add(name, inputs, slice_index, 0.0, vocab=self._by_token(inputs))

    def _by_token(self, inputs: list[tuple[str, str]]) -> bool:
        """Whether a non-layer tensor's rows are indexed by token (each input's first dimension is its
        config's vocab_size), so that a chosen vocabulary re-indexes it."""
        if self.vocabulary is None:
            return False
        for model, name in inputs:
            shape = self.sources.info(model, name).shape
            if len(shape) != 2 or shape[0] != self.sources.config(model).get("vocab_size"):
                return False
        return True

    def layers(self, dck: "Checkpoint") -> int:
        """Every layer of every slice, renumbered (`dck`: the donor, whose layer names are written).
        Returns the output's layer count."""
        out_layer = 0
        for si, sl in enumerate(self.slices):
            length = sl.sources[0].end - sl.sources[0].start
            for offset in range(length):
                t = layer_t(offset, length)
                for suffix in dck.layer_suffixes:
                    inputs = []
                    for src in sl.sources:
                        ck = self.sources.checkpoint(src.model)
                        inputs.append((src.model, ck.layer_name(src.start + offset, suffix)))
                    self.add(dck.layer_name(out_layer, suffix), inputs, si, t)
                out_layer += 1
        return out_layer


def _out_config(recipe: MergeRecipe, donor_config: dict, num_layers: int) -> dict:
    """The merged model's config.json: the donor's, with the layer count of slices and the dtype."""
    out_config = json.loads(json.dumps(donor_config))
    # a merged float model is not quantized: a donor's quantization_config (a GGUF or bitsandbytes
    # conversion leaves one) would make every later load try to dequantize it
    out_config.pop("quantization_config", None)
    if recipe.output_slices:
        out_config["num_hidden_layers"] = num_layers
        if "n_layer" in out_config:
            out_config["n_layer"] = num_layers
    dtype = recipe.out_dtype or recipe.dtype
    if dtype:
        if "torch_dtype" in out_config:
            out_config["torch_dtype"] = dtype
        out_config["dtype"] = dtype
    return out_config


def _is_pre(name: str) -> bool:
    return "embed" in name or name.split(".")[-2:-1] in (["wte"], ["wpe"])


def _promote(dtypes: list[str]) -> str:
    """torch.promote_types over float dtype names (bfloat16 + float16 -> float32)."""
    out = dtypes[0]
    rank = {"float16": 1, "bfloat16": 1, "float32": 2, "float64": 3}
    for d in dtypes[1:]:
        if d == out:
            continue
        if rank[d] == rank[out] == 1:
            out = "float32"
        elif rank[d] > rank[out]:
            out = d
    return out


class _Resolver:
    """Resolves parameters per output tensor with mergekit's scope order, filters and gradients.

    Parameter values are read from the recipe of this call (the cached plan structure holds none)."""

    def __init__(self, recipe: MergeRecipe, method: "MergeMethod", slices: list[NormSlice]):
        self.recipe = recipe
        self.method = method
        self.slices = slices
        self.top = recipe.parameters
        self.module = recipe.module_parameters
        # per slice: (slice parameters, {model: that source's own parameters})
        self.scopes: list[tuple[dict | None, dict[str, dict | None]]] = []
        if recipe.input_models:
            own = {m.model: m.parameters for m in recipe.input_models}
            self.scopes.append((None, own))
        else:
            for sl in recipe.output_slices or []:
                self.scopes.append((sl.parameters, {src.model: src.parameters for src in sl.sources}))

    def resolve(self, slot: _Slot, base: str | None) -> tuple[dict[str, dict], dict]:
        sl = self.slices[slot.slice_index]
        slice_params, own = self.scopes[slot.slice_index]
        method = self.method
        shared_scopes = (slice_params, self.module, self.top)
        global_params = {}
        for tun in method.global_params:
            value = resolve_parameter(tun.name, shared_scopes, slot.name, slot.t, _coercer(tun))
            if value is None:
                if tun.required:
                    raise ConfigError(f"missing required parameter {tun.name!r} for {method.name}",
                                      where=f"{sl.where}.parameters" if self.recipe.output_slices else "parameters",
                                      fix=f"add {tun.name} to the parameters")
                value = tun.default
            global_params[tun.name] = value
        model_params: dict[str, dict] = {}
        by_model = {s.model: s for s in sl.sources}
        for model, in_name in slot.inputs:
            src = by_model[model]
            scopes = (own.get(model), slice_params, self.module, self.top)
            params = {}
            for tun in method.params_for(model, base):
                value = resolve_parameter(tun.name, scopes, in_name, slot.t, _coercer(tun))
                if value is None:
                    if tun.required:
                        at = src.where
                        extra = ""
                        if at == "base_model":
                            extra = " (the base model is an input of this method but is not listed under models)"
                        raise ConfigError(
                            f"missing required parameter {tun.name!r} for model {model!r}{extra}",
                            where=f"{at}.parameters.{tun.name}" if at != "base_model" else "base_model",
                            fix=f"give {tun.name} in this model's parameters or in the top-level parameters")
                    value = tun.default
                params[tun.name] = value
            model_params[model] = params
        return model_params, global_params


def _coercer(tunable):
    """A value as the method reads it (mergekit's validation: numeric text is a float, 1.0 a true bool)."""
    if tunable.type == "float":
        def coerce(v):
            v = to_float(v)
            return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else v
        return coerce
    if tunable.type == "bool":
        from evomerge.engine.methods.base import truthy

        return lambda v: v if truthy(v) is None else truthy(v)
    return lambda v: v



__all__ = ["MergePlan", "TensorTask", "check_recipe", "plan", "tensor_seed"]
