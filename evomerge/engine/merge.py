"""The merge engine: a recipe and its sources -> a plan -> merged tensors, written into a sink.

`plan(recipe, sources)` does every check and resolves, for each output tensor, which source tensors
feed it and the parameter values that apply to it (gradients and filters resolved exactly as mergekit
0.1.5 does; see evomerge.engine.recipe). `merge_into(sink, recipe, sources)` executes a plan, one tensor at a
time, into any sink (evomerge.engine.sinks): the resident model during a search, or safetensors shards for
`evomerge merge` (`merge_to_dir`). The same code computes both, so they agree bit for bit.

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
- The output config, generation config and (unless `tokenizer_source` says otherwise) tokenizer come
  from the base model, else the first model; with slices its layer count is the sum of the slices.
- `tokenizer_source` (`base` or a model folder) only chooses which tokenizer files are copied. The
  sources must share one vocabulary (checked), so embeddings are merged row for row. mergekit instead
  rebuilds embeddings for the chosen tokenizer's vocabulary; that is the same result when the
  tokenizers agree, except that it trims padded embedding rows beyond the tokenizer's size, which
  evomerge keeps. `union` is refused.

DARE randomness: each output tensor gets its own `torch.Generator` seeded from (the recipe's
`random_seed`, default 0, and the tensor name), so a recipe always gives the same tensors, in memory
or on disk, whatever order tensors are merged in. (mergekit draws from one global RNG instead, so its
DARE drops differ from ours for the same seed; only the distribution matches.)
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from evomerge.errors import CheckpointError, ConfigError, OutputError
from evomerge.engine.recipe import (
    MergeRecipe,
    layer_t,
    load_recipe,
    resolve_parameter,
    setting_scalars,
    to_float,
)
from evomerge.engine.modelcard import CardFacts, SourceFacts, hub_id, render_card
from evomerge.engine.output import check_out, copy_side_files, human_bytes, staged
from evomerge.engine.sinks import ITEM_SIZE, TensorSpec

if TYPE_CHECKING:  # pragma: no cover
    from evomerge.engine.checkpoints import Sources
    from evomerge.engine.methods import MergeMethod

FLOAT_DTYPES = ("float64", "float32", "bfloat16", "float16")
DEFAULT_SEED = 0
# torch's CPU reductions (slerp's norms, DARE's L1 rescale) split their work by thread count, so the
# same merge computed with 1 and with 2 threads can differ in the last bit. Every merge therefore runs
# with one fixed thread count (restored afterwards), so the in-memory merge scored by a search worker
# (whatever its own thread setting) and the export are identical. Override with EVOMERGE_MERGE_THREADS
# (or `evomerge merge --threads`); search and export must then use the same value.
DEFAULT_MERGE_THREADS = 2
DEFAULT_WORKERS = 2  # tensors merged at once (see `execute`)


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


@dataclass
class MergePlan:
    recipe: MergeRecipe
    method: "MergeMethod"
    tasks: list[TensorTask]
    donor: str  # model whose config/generation config (and default tokenizer) the output takes
    out_config: dict
    num_layers: int
    slices: list[NormSlice] = field(default_factory=list)

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
    if recipe.models:
        method.check_models([m.model for m in recipe.models], recipe.base_model, where="models",
                            append_base=True)
    else:
        for i, s in enumerate(recipe.slices or []):
            method.check_models([src.model for src in s.sources], s.base_model or recipe.base_model,
                                where=f"slices[{i}].sources", append_base=False)
    if recipe.tokenizer_source == "union":
        raise ConfigError("tokenizer_source: union (mergekit 0.1.5 builds a union vocabulary and new embedding rows) "
                          "is not supported by evomerge", where="tokenizer_source",
                          fix="merge models that share a tokenizer and use tokenizer_source: base or a model path, "
                              "or run this recipe with mergekit-yaml")
    if recipe.tokenizer is not None:
        raise ConfigError("the tokenizer: block (mergekit 0.1.5: a union or chosen vocabulary with per-token "
                          "embedding sources) is not supported by evomerge", where="tokenizer",
                          fix="merge models that share a tokenizer and use tokenizer_source: base or a model path, "
                              "or run this recipe with mergekit-yaml")
    if recipe.chat_template is not None:
        chat_template_text(recipe, None)  # a name we do not know, or text that is no template
    if recipe.tokenizer_source == "base" and not recipe.base_model:
        raise ConfigError("tokenizer_source: base needs a base_model", where="tokenizer_source",
                          fix="add base_model, or give a model path as tokenizer_source")
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
    slices, slots, donor, out_config, num_layers = cached
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
            seed=None if seed is None else tensor_seed(seed, slot.name)))
    return MergePlan(recipe=recipe, method=method, tasks=tasks, donor=donor, out_config=out_config,
                     num_layers=num_layers, slices=slices)


def tensor_seed(seed: int, name: str) -> int:
    """The per-tensor generator seed: a stable hash of (recipe seed, output tensor name)."""
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def _structure_key(recipe: MergeRecipe) -> str:
    shape = {
        "base": recipe.base_model, "dtype": recipe.dtype, "out_dtype": recipe.out_dtype,
        "models": [m.model for m in recipe.models or []],
        "slices": [[s.base_model, [(src.model, list(src.layer_range)) for src in s.sources]]
                   for s in recipe.slices or []],
        "method": recipe.merge_method,
    }
    return json.dumps(shape, sort_keys=True)


def _normalize(recipe: MergeRecipe, method: "MergeMethod", sources: "Sources") -> list[NormSlice]:
    if recipe.models:
        srcs = []
        for i, m in enumerate(recipe.models):
            srcs.append(SliceSource(m.model, 0, sources.num_layers(m.model), f"models[{i}]"))
        if recipe.base_model and recipe.base_model not in {m.model for m in recipe.models}:
            srcs.append(SliceSource(recipe.base_model, 0, sources.num_layers(recipe.base_model), "base_model"))
        counts = {s.end for s in srcs}
        if len(counts) > 1:
            detail = ", ".join(f"{s.model}: {s.end}" for s in srcs)
            raise CheckpointError(f"the models have different layer counts ({detail})", where="models",
                                  fix="use slices: with layer_range to pick matching layers")
        return [NormSlice(tuple(srcs), recipe.base_model, "models")]
    out = []
    for i, s in enumerate(recipe.slices or []):
        srcs = []
        for j, src in enumerate(s.sources):
            n = sources.num_layers(src.model)
            start, end = src.layer_range
            if end > n:
                raise ConfigError(
                    f"layer_range {list(src.layer_range)} is out of bounds: {src.model} has {n} layers",
                    where=f"slices[{i}].sources[{j}].layer_range",
                    fix=f"use a range within [0, {n}] (the end is exclusive)")
            srcs.append(SliceSource(src.model, start, end, f"slices[{i}].sources[{j}]"))
        out.append(NormSlice(tuple(srcs), s.base_model or recipe.base_model, f"slices[{i}]"))
    return out


def _structure(recipe: MergeRecipe, method: "MergeMethod", sources: "Sources"):
    where = recipe.model_fields_paths()
    referenced = [m for m in recipe.referenced_models() if m in sources]
    missing = [m for m in recipe.referenced_models() if m not in sources]
    if missing:
        raise CheckpointError(f"model {missing[0]!r} was not opened", where=where.get(missing[0]),
                              fix="open Sources with every model the recipe names")
    sources.check_compatible(referenced, where=where)
    slices = _normalize(recipe, method, sources)
    donor = recipe.base_model or slices[0].sources[0].model
    dck = sources.checkpoint(donor)
    slots: list[_Slot] = []

    def add(name: str, inputs: list[tuple[str, str]], slice_index: int, t: float) -> None:
        infos = [sources.info(m, n) for m, n in inputs]
        shapes = {i.shape for i in infos}
        if len(shapes) > 1:
            detail = ", ".join(f"{m}: {list(i.shape)}" for (m, _), i in zip(inputs, infos))
            raise CheckpointError(f"tensor shapes disagree for {name} ({detail})",
                                  where=slices[slice_index].where,
                                  fix="merge checkpoints of the same architecture and size")
        floating = [i.dtype in FLOAT_DTYPES for i in infos]
        load = recipe.dtype if all(floating) else None
        dts = [load or i.dtype for i in infos]
        if all(floating):
            out_dtype = recipe.out_dtype or _promote(dts)
        else:
            out_dtype = dts[0]
        slots.append(_Slot(name, tuple(inputs), slice_index, t, load, TensorSpec(name, infos[0].shape, out_dtype)))

    def non_layer(names_from: NormSlice, slice_index: int, pre: bool) -> None:
        models = [s.model for s in names_from.sources]
        ordered: list[str] = []
        for m in [donor, *models]:
            if m in sources:
                for n in sources.checkpoint(m).non_layer:
                    if n not in ordered and _is_pre(n) == pre:
                        ordered.append(n)
        from evomerge.engine.checkpoints import TIED_FALLBACK

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
                    raise CheckpointError(f"{m} has no tensor {name}", where=where.get(m),
                                          fix="merge checkpoints of the same architecture")
            add(name, inputs, slice_index, 0.0)

    non_layer(slices[0], 0, pre=True)
    out_layer = 0
    for si, sl in enumerate(slices):
        length = sl.sources[0].end - sl.sources[0].start
        for offset in range(length):
            t = layer_t(offset, length)
            for suffix in dck.layer_suffixes:
                inputs = []
                for src in sl.sources:
                    ck = sources.checkpoint(src.model)
                    inputs.append((src.model, ck.layer_name(src.start + offset, suffix)))
                add(dck.layer_name(out_layer, suffix), inputs, si, t)
            out_layer += 1
    non_layer(slices[-1], len(slices) - 1, pre=False)

    out_config = json.loads(json.dumps(dck.config))
    # a merged float model is not quantized: a donor's quantization_config (a GGUF or bitsandbytes
    # conversion leaves one) would make every later load try to dequantize it
    out_config.pop("quantization_config", None)
    if recipe.slices:
        out_config["num_hidden_layers"] = out_layer
        if "n_layer" in out_config:
            out_config["n_layer"] = out_layer
    dtype = recipe.out_dtype or recipe.dtype
    if dtype:
        if "torch_dtype" in out_config:
            out_config["torch_dtype"] = dtype
        out_config["dtype"] = dtype
    return slices, slots, donor, out_config, out_layer


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
        # per slice: (slice parameters, {model: that source's own parameters})
        self.scopes: list[tuple[dict | None, dict[str, dict | None]]] = []
        if recipe.models:
            own = {m.model: m.parameters for m in recipe.models}
            self.scopes.append((None, own))
        else:
            for sl in recipe.slices or []:
                self.scopes.append((sl.parameters, {src.model: src.parameters for src in sl.sources}))

    def resolve(self, slot: _Slot, base: str | None) -> tuple[dict[str, dict], dict]:
        sl = self.slices[slot.slice_index]
        slice_params, own = self.scopes[slot.slice_index]
        method = self.method
        shared_scopes = (slice_params, self.top)
        global_params = {}
        for tun in method.global_params:
            value = resolve_parameter(tun.name, shared_scopes, slot.name, slot.t, _coercer(tun))
            if value is None:
                if tun.required:
                    raise ConfigError(f"missing required parameter {tun.name!r} for {method.name}",
                                      where=f"{sl.where}.parameters" if self.recipe.slices else "parameters",
                                      fix=f"add {tun.name} to the parameters")
                value = tun.default
            global_params[tun.name] = value
        model_params: dict[str, dict] = {}
        by_model = {s.model: s for s in sl.sources}
        for model, in_name in slot.inputs:
            src = by_model[model]
            scopes = (own.get(model), slice_params, self.top)
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
    if tunable.type == "float":
        def coerce(v):
            v = to_float(v)
            return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else v
        return coerce
    return lambda v: v


# --- execution ------------------------------------------------------------------------------------------
def merge_threads(threads: int | None = None) -> int:
    """The torch thread count merges run with: `threads`, else $EVOMERGE_MERGE_THREADS, else 2."""
    if threads is not None:
        return int(threads)
    env = os.environ.get("EVOMERGE_MERGE_THREADS")
    if env:
        try:
            value = int(env)
        except ValueError:
            raise ConfigError(f"EVOMERGE_MERGE_THREADS must be a positive integer, got {env!r}",
                              where="EVOMERGE_MERGE_THREADS", fix="unset it or set e.g. 2") from None
        if value >= 1:
            return value
        raise ConfigError(f"EVOMERGE_MERGE_THREADS must be a positive integer, got {env!r}",
                          where="EVOMERGE_MERGE_THREADS", fix="unset it or set e.g. 2")
    return DEFAULT_MERGE_THREADS


def execute(p: MergePlan, sink: Any, sources: "Sources", *, progress: bool = False, device: str = "cpu",
            workers: int | None = None, threads: int | None = None) -> None:
    """Compute every planned tensor and write it into `sink`, in plan order.

    Tensors are read and merged on `workers` helper threads (default 2) while the caller writes the
    finished ones in order. Reads release the GIL and TIES' top-k (sort/select) is single-threaded in
    torch, so this overlaps I/O and keeps both cores busy; measured on this (loaded, 2-core) machine, the
    same torch ops issued from a helper thread also ran 5-30x faster than from the main thread with
    2 intra-op threads (cause not established; results are identical). Results do not depend on `workers`: each tensor is computed by the same ops,
    DARE from its own generator (tests compare workers=1 and 2 bit for bit). The arithmetic runs with
    `merge_threads(threads)` torch threads (see DEFAULT_MERGE_THREADS), restored afterwards.
    `workers=1` computes everything on the calling thread.
    """
    import torch

    n_threads = merge_threads(threads)
    if workers is None:
        workers = DEFAULT_WORKERS
    old_threads = torch.get_num_threads()
    if n_threads != old_threads:
        torch.set_num_threads(n_threads)
    try:
        _execute(p, sink, sources, progress=progress, device=device, workers=max(1, int(workers)))
    finally:
        if torch.get_num_threads() != old_threads:
            torch.set_num_threads(old_threads)


def _execute(p: MergePlan, sink: Any, sources: "Sources", *, progress: bool, device: str, workers: int) -> None:
    import torch

    prepare = getattr(sink, "prepare", None)
    if prepare is not None:
        prepare(p.specs)
    method = p.method
    tasks = p.tasks

    def compute(task: TensorTask) -> "torch.Tensor":
        tensors = {}
        for model, name in task.inputs:
            x = sources.tensor(model, name)
            if device != "cpu":
                x = x.to(device)
            if task.load_dtype is not None and x.dtype != getattr(torch, task.load_dtype):
                x = x.to(getattr(torch, task.load_dtype))
            tensors[model] = x
        generator = None
        if task.seed is not None:
            generator = torch.Generator(device=device).manual_seed(task.seed)
        out = method.merge(tensors, task.base, task.model_params, task.global_params, generator=generator)
        want = getattr(torch, task.spec.dtype)
        return out if out.dtype == want else out.to(want)

    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(tasks), desc="merging", unit="tensor", dynamic_ncols=True)
    pool = None
    try:
        if workers <= 1:
            for task in tasks:
                sink.write(task.name, compute(task))
                if bar is not None:
                    bar.update(1)
        else:
            from collections import deque
            from concurrent.futures import ThreadPoolExecutor

            pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="evomerge-merge")
            window: deque = deque()
            for task in tasks:
                window.append((task, pool.submit(compute, task)))
                if len(window) > workers:
                    done, future = window.popleft()
                    sink.write(done.name, future.result())
                    if bar is not None:
                        bar.update(1)
            while window:
                done, future = window.popleft()
                sink.write(done.name, future.result())
                if bar is not None:
                    bar.update(1)
    except BaseException:
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
            pool = None
        abort = getattr(sink, "abort", None)
        if abort is not None:
            abort()
        raise
    finally:
        if pool is not None:
            pool.shutdown(wait=True)
        if bar is not None:
            bar.close()
    sink.finish()


def merge_into(sink: Any, recipe: MergeRecipe, sources: "Sources", *, progress: bool = False,
               threads: int | None = None, workers: int | None = None) -> None:
    """Merge `recipe` from the opened `sources` into `sink` (ModelSink or ShardedSafetensorsSink).

    Cheap to call once per trial: the plan's structure is cached on `sources`; only parameter values
    are resolved again. `threads`/`workers`: see `execute`."""
    p = plan(recipe, sources)
    execute(p, sink, sources, progress=progress, device=sources.device, threads=threads, workers=workers)


# --- the CLI's merge and validate -------------------------------------------------------------------------
def _open_for(recipe: MergeRecipe, device: str = "cpu", reads: str = "mmap") -> "Sources":
    from evomerge.engine.checkpoints import Sources

    where = recipe.model_fields_paths()
    models = {m: where[m] for m in recipe.referenced_models()}
    return Sources.open(models, device=device, reads=reads)


def _tokenizer_dir(recipe: MergeRecipe, p: MergePlan, sources: "Sources") -> Path:
    from evomerge.engine.checkpoints import resolve_model_path

    ts = recipe.tokenizer_source
    if ts is None:
        return sources.path(p.donor)
    if ts == "base":
        return sources.path(recipe.base_model)
    path = resolve_model_path(ts)
    if not path.is_dir():
        raise CheckpointError(f"tokenizer_source folder {ts!r} not found (looked at {path.absolute()})",
                              where="tokenizer_source",
                              fix="give base, or the local folder of a model whose tokenizer to use")
    return path


def _check_tokenizer(tok_dir: Path, p: MergePlan, sources: "Sources", where: str) -> int | None:
    from evomerge.engine.checkpoints import _tokenizer_vocab_size

    n = _tokenizer_vocab_size(tok_dir)
    if n is None:
        return None
    emb = next((t.spec for t in p.tasks if "embed_tokens" in t.name), None)
    rows = emb.shape[0] if emb is not None and emb.shape else None
    if rows is not None and n > rows:
        raise CheckpointError(
            f"the tokenizer in {tok_dir} has {n} tokens but the merged embeddings have {rows} rows",
            where=where, fix="use the tokenizer of one of the merged models (tokenizer_source: base)")
    for m in sources.models:
        other = sources.checkpoint(m).vocab_size
        if other is not None and other != n:
            raise CheckpointError(
                f"tokenizer vocab sizes disagree: {tok_dir} has {n} tokens, {m} has {other}",
                where=where, fix="merge models that share one tokenizer")
    return n


def resolve_device(device: str) -> str:
    """`auto` -> cuda when this machine has a GPU, else cpu; cpu, cuda and cuda:N are checked against the
    machine (a ConfigError naming --device otherwise). Returns the device to use."""
    if device == "cpu":
        return device
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ConfigError(f"unknown device {device!r}", where="--device", fix="use cpu, cuda, cuda:N or auto") from None
    if dev.type not in ("cpu", "cuda"):
        raise ConfigError(f"device type {dev.type!r} is not supported", where="--device", fix="use cpu, cuda or cuda:N")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError("CUDA is not available on this machine", where="--device", fix="use --device cpu (or auto)")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ConfigError(f"there is no GPU {dev.index} (this machine has {torch.cuda.device_count()})",
                              where="--device", fix=f"use cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    return device


def merge_to_dir(config_path: str | os.PathLike, out: str | os.PathLike, *, overwrite: bool = False,
                 shard_size: int | str = "5GB", device: str = "cpu", progress: bool = True,
                 threads: int | None = None, trust_remote_code: bool = False,
                 model_root: str | os.PathLike | None = None) -> Path:
    """`evomerge merge`: merge the recipe at `config_path` into the folder `out` (HF layout).
    `trust_remote_code`: accept sources with their own code (config `auto_map`); the donor's code files
    are copied next to the merged config, so that the result loads. `model_root`: look every model
    folder up by its name there (a recipe from another machine); the output records the moved recipe."""
    from evomerge.engine.sinks import ShardedSafetensorsSink, parse_size

    out = Path(out)
    if threads is not None and threads < 1:
        raise ConfigError(f"--threads must be at least 1, got {threads}", where="--threads",
                          fix="omit it (default 2) or give a positive number")
    merge_threads(threads)
    recipe = load_recipe(config_path)
    recipe_text = Path(config_path).read_text(encoding="utf-8")
    if model_root is not None:
        recipe = recipe.relocated(model_root)
        recipe_text = recipe.to_yaml(comments=[f"{config_path}, model folders under {model_root}"])
    check_recipe(recipe)
    shard_bytes = parse_size(shard_size)
    check_out(out, overwrite)
    device = resolve_device(device)
    sources = _open_for(recipe, device, reads="copy")
    sources.check_custom_code(allowed=trust_remote_code, flag="--trust-remote-code")
    p = plan(recipe, sources)
    tok_dir = _tokenizer_dir(recipe, p, sources)
    _check_tokenizer(tok_dir, p, sources, "tokenizer_source" if recipe.tokenizer_source else
                     recipe.model_fields_paths().get(p.donor, "models"))
    check_out(out, overwrite, sources)

    try:
        with staged(out) as tmp:
            sink = ShardedSafetensorsSink(tmp, shard_bytes)
            execute(p, sink, sources, progress=progress, device=device, threads=threads)
            (tmp / "config.json").write_text(json.dumps(p.out_config, indent=2, sort_keys=True) + "\n",
                                             encoding="utf-8")
            donor_dir = sources.path(p.donor)
            for code in sources.code_files(p.donor):  # the config's auto_map points at these
                (tmp / code.relative_to(donor_dir)).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(code, tmp / code.relative_to(donor_dir))
            copy_side_files(tmp, config_from=donor_dir, tokenizer_from=tok_dir)
            if recipe.chat_template:
                _write_chat_template(tmp, chat_template_text(recipe, sources))
            (tmp / "mergekit_config.yml").write_text(recipe_text, encoding="utf-8")
            (tmp / "README.md").write_text(render_card(card_facts(recipe, recipe_text, p, sources, out.name)),
                                           encoding="utf-8")
    finally:
        sources.close()
    return out


def card_facts(recipe: MergeRecipe, recipe_text: str, p: MergePlan, sources: "Sources", name: str) -> CardFacts:
    """What the model card says about this merge, as plain data."""
    def nbytes(shape, dtype: str) -> int:
        n = 1
        for d in shape:
            n *= d
        return n * ITEM_SIZE.get(dtype, 4)

    listed = []
    for m in recipe.referenced_models():
        ck = sources.checkpoint(m)
        listed.append(SourceFacts(model=m, is_base=m == recipe.base_model, n_tensors=len(ck.tensors),
                                  nbytes=sum(nbytes(i.shape, i.dtype) for i in ck.tensors.values())))
    return CardFacts(name=name, method=recipe.merge_method, reference_url=p.method.reference_url,
                     base_model=hub_id(recipe.base_model, sources.config(recipe.base_model) if recipe.base_model
                                       else None),
                     recipe_text=recipe_text, sources=tuple(listed),
                     n_tensors=len(p.tasks), num_layers=p.num_layers, nbytes=p.nbytes, donor=p.donor)


def validate_config(config_path: str | os.PathLike, *, trust_remote_code: bool = False,
                    model_root: str | os.PathLike | None = None) -> str:
    """`evomerge validate`: every check `merge` makes, without merging; returns a short summary."""
    recipe = load_recipe(config_path)
    if model_root is not None:
        recipe = recipe.relocated(model_root)
    method = check_recipe(recipe)
    sources = _open_for(recipe)
    try:
        sources.check_custom_code(allowed=trust_remote_code, flag="--trust-remote-code")
        p = plan(recipe, sources)
        tok_dir = _tokenizer_dir(recipe, p, sources)
        n_tok = _check_tokenizer(tok_dir, p, sources, "tokenizer_source" if recipe.tokenizer_source else "models")
    finally:
        sources.close()
    n_models = len(recipe.referenced_models())
    dtypes = sorted({t.spec.dtype for t in p.tasks})
    lines = [
        f"ok: {config_path}",
        f"  method      {method.name} over {n_models} model(s)" + (f", base {recipe.base_model}" if recipe.base_model else ""),
        f"  output      {len(p.tasks)} tensors, {p.num_layers} layers, {', '.join(dtypes)}, {human_bytes(p.nbytes)}",
        f"  config from {p.donor}; tokenizer from {tok_dir}" + (f" ({n_tok} tokens)" if n_tok else ""),
    ]
    if method.uses_generator:
        seed = recipe.random_seed if recipe.random_seed is not None else DEFAULT_SEED
        lines.append(f"  random_seed {seed}" + ("" if recipe.random_seed is not None else " (default; add random_seed to pin it)"))
    return "\n".join(lines)


# Named chat templates, as mergekit names them. Only ChatML is built in (a public, fixed format); for
# another name, paste the template's Jinja text into `chat_template:`.
CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] "
          "+ '<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
          "{% endif %}")
NAMED_TEMPLATES = {"chatml": CHATML}


def chat_template_text(recipe: MergeRecipe, sources: "Sources | None") -> str:
    """The Jinja text a recipe's `chat_template:` asks for: literal Jinja, a name (chatml), or `auto`
    (the template most of the input models' tokenizers carry). With `sources` None, only checks."""
    value = recipe.chat_template
    if "{" in value or "\n" in value:
        if len(value) < 20:
            raise ConfigError(f"chat_template {value!r} is too short to be a Jinja template", where="chat_template",
                              fix="give a template's Jinja text, `chatml`, or `auto`")
        return value
    if value == "auto":
        if sources is None:
            return value
        from collections import Counter

        found = Counter()
        for model in recipe.referenced_models():
            cfg = sources.path(model) / "tokenizer_config.json"
            text = json.loads(cfg.read_text(encoding="utf-8")).get("chat_template") if cfg.is_file() else None
            if isinstance(text, str):
                found[text] += 1
        if not found:
            raise ConfigError("chat_template: auto, but none of the input models' tokenizers has a chat template",
                              where="chat_template", fix="give the template's Jinja text, or `chatml`")
        return found.most_common(1)[0][0]
    if value in NAMED_TEMPLATES:
        return NAMED_TEMPLATES[value]
    raise ConfigError(f"unknown chat template name {value!r}", where="chat_template",
                      fix="use chatml or auto, or paste the template's Jinja text (mergekit 0.1.5 also names "
                          "alpaca, exaone, llama3, mistral from its own data files)")


def _write_chat_template(folder: Path, template: str) -> None:
    """Put `template` into the merged tokenizer's config (where transformers reads it)."""
    cfg = folder / "tokenizer_config.json"
    data = json.loads(cfg.read_text(encoding="utf-8")) if cfg.is_file() else {}
    data["chat_template"] = template
    cfg.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    for stale in ("chat_template.jinja", "chat_template.json"):  # these would win over the config
        (folder / stale).unlink(missing_ok=True)


__all__ = ["MergePlan", "TensorTask", "plan", "merge_into", "merge_to_dir", "validate_config", "execute",
           "check_recipe", "tensor_seed"]
