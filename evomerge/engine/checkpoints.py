"""Source checkpoints: open Hugging Face model folders once, read tensors lazily by name.

A merge reads every tensor of every source exactly once per merge, and the search merges hundreds of
times, so sources are opened once per process: config.json is parsed, the safetensors headers are read
(names, shapes, dtypes; no tensor data), and tensor bytes are memory-mapped and materialised only when
`tensor()` asks for one. Only safetensors are read (no pickle).

Each model is named by a reference as the recipe writes it (a folder, a Hub id, `base+adapter`);
`references.py` finds its folder first (a Hub id in the cache, or downloaded). A `base+adapter`
checkpoint reads the base's tensors and applies the LoRA adapter to each one it changes (`lora.py`).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from evomerge.errors import CheckpointError

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from evomerge.engine.lora import Adapter
    from evomerge.engine.references import Location

# 'model.layers.12.mlp.up_proj.weight' -> ('model.layers', 12, 'mlp.up_proj.weight')
LAYER_RE = re.compile(r"^(?P<prefix>(?:.+\.)?(?:layers|h|blocks))\.(?P<index>\d+)\.(?P<suffix>.+)$")

# Output weights that a checkpoint may omit because they are tied to another one (mergekit's
# `tied_names` for Llama-style architectures).
TIED_FALLBACK = {"lm_head.weight": "model.embed_tokens.weight"}

ST_DTYPES = {
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
    "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool",
    "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2",
}


def split_layer_name(name: str) -> tuple[str, int, str] | None:
    """('model.layers', 3, 'mlp.up_proj.weight') for a per-layer tensor name, else None."""
    m = LAYER_RE.match(name)
    if m is None:
        return None
    return m.group("prefix"), int(m.group("index")), m.group("suffix")


@dataclass(frozen=True)
class TensorInfo:
    """Header facts about one stored tensor (no data)."""

    file: str
    shape: tuple[int, ...]
    dtype: str  # torch dtype name, e.g. "bfloat16"
    start: int = 0  # absolute byte offset of the data in `file`
    nbytes: int = 0


@dataclass
class Checkpoint:
    """One opened source folder."""

    name: str  # as written in the recipe
    path: Path
    config: dict
    tensors: dict[str, TensorInfo]
    layer_prefix: str | None = None
    num_layers: int = 0
    layer_suffixes: list[str] = field(default_factory=list)  # in checkpoint order, from layer 0
    non_layer: list[str] = field(default_factory=list)  # in checkpoint order
    vocab_size: int | None = None  # the tokenizer's, when a tokenizer is present
    location: "Location | None" = None  # where the reference pointed (folder, Hub origin, adapter)
    adapter: "Adapter | None" = None  # a LoRA adapter applied to every tensor it changes, as read
    _handles: dict[str, Any] = field(default_factory=dict, repr=False)

    def layer_name(self, layer: int, suffix: str) -> str:
        return f"{self.layer_prefix}.{layer}.{suffix}"


class Sources:
    """The source checkpoints of a merge, opened once and read lazily."""

    def __init__(self, checkpoints: dict[str, Checkpoint], device: str = "cpu",
                 where: dict[str, str] | None = None, reads: str = "mmap"):
        if reads not in ("mmap", "copy"):
            raise ValueError(f"reads must be 'mmap' or 'copy', got {reads!r}")
        self._ckpts = checkpoints
        self.where = dict(where or {})  # model -> YAML field, for error messages
        self.device = device
        self.reads = reads
        self.cache: dict[Any, Any] = {}  # plan cache, owned by evomerge.engine.plan
        self.located: dict[str, "Location"] = {}  # every located reference, tokenizer-only ones included
        self._fds: dict[Path, int] = {}

    # --- opening ---------------------------------------------------------------------------------
    @classmethod
    def open(cls, model_paths: Iterable[str] | Mapping[str, str], *, device: str = "cpu",
             reads: str = "mmap", locations: Mapping[str, "Location"] | None = None) -> "Sources":
        """Open every model. `model_paths` is a list of references as written in the recipe (folders,
        Hub ids, `base+adapter`), or a mapping reference -> YAML field (used in error messages).
        `locations`: references already located (`references.locate_all`); the others are located here.

        `reads="mmap"` (default; the search): tensors are zero-copy views of the memory-mapped files,
        so repeated merges re-read nothing. `reads="copy"` (one-shot export): each tensor is read
        with one positioned read into fresh memory and nothing stays mapped, so the process holds
        only the tensors in flight (peak memory ~ one tensor's working set, not the models' size)."""
        if isinstance(model_paths, Mapping):
            where = dict(model_paths)
        else:
            where = {m: "models" for m in model_paths}
        ckpts = {name: _open_checkpoint(name, fld, (locations or {}).get(name)) for name, fld in where.items()}
        sources = cls(ckpts, device=device, where=where, reads=reads)
        sources.located = {**(locations or {}), **{n: ck.location for n, ck in ckpts.items()}}
        return sources

    # --- queries ---------------------------------------------------------------------------------
    @property
    def models(self) -> list[str]:
        return list(self._ckpts)

    def __contains__(self, model: str) -> bool:
        return model in self._ckpts

    def checkpoint(self, model: str) -> Checkpoint:
        try:
            return self._ckpts[model]
        except KeyError:
            raise CheckpointError(f"model {model!r} was not opened with these sources",
                                  where=model, fix="open Sources with every model the recipe names") from None

    def path(self, model: str) -> Path:
        return self.checkpoint(model).path

    def config(self, model: str) -> dict:
        return self.checkpoint(model).config

    def names(self, model: str) -> list[str]:
        return list(self.checkpoint(model).tensors)

    def info(self, model: str, name: str) -> TensorInfo:
        return self.checkpoint(model).tensors[name]

    def has(self, model: str, name: str) -> bool:
        return name in self.checkpoint(model).tensors

    def num_layers(self, model: str) -> int:
        return self.checkpoint(model).num_layers

    def tensor(self, model: str, name: str) -> "torch.Tensor":
        """The stored tensor (on CPU, its stored dtype), read from the memory-mapped file."""
        ck = self.checkpoint(model)
        try:
            info = ck.tensors[name]
        except KeyError:
            raise CheckpointError(f"tensor {name!r} not found", where=str(ck.path),
                                  fix="merge checkpoints of the same architecture") from None
        if self.reads == "copy":
            out = self._read_copy(ck, info)
        else:
            handle = ck._handles.get(info.file)
            if handle is None:
                from safetensors import safe_open

                handle = safe_open(str(ck.path / info.file), framework="pt", device="cpu")
                ck._handles[info.file] = handle
            out = handle.get_tensor(name)
        if ck.adapter is not None and ck.adapter.changes(name):
            out = ck.adapter.apply(name, out)
        return out

    def _read_copy(self, ck: Checkpoint, info: TensorInfo) -> "torch.Tensor":
        import torch

        path = ck.path / info.file
        fd = self._fds.get(path)
        if fd is None:
            fd = os.open(path, os.O_RDONLY)
            self._fds[path] = fd
        buf = torch.empty(info.nbytes, dtype=torch.uint8)
        view = memoryview(buf.numpy())
        done = 0
        while done < info.nbytes:  # preadv may return short reads for very large tensors
            got = os.preadv(fd, [view[done:]], info.start + done)
            if got <= 0:
                raise CheckpointError(f"{info.file} of {ck.name!r} is truncated", where=str(ck.path),
                                      fix="re-download the checkpoint")
            done += got
        dtype = getattr(torch, info.dtype)
        return buf.view(dtype).reshape(info.shape)

    def close(self) -> None:
        for ck in self._ckpts.values():
            ck._handles.clear()
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    # --- compatibility (engine/compatibility.py) ----------------------------------------------------
    def check_compatible(self, models: Iterable[str] | None = None, where: Mapping[str, str] | None = None,
                         *, same_vocab: bool = True) -> None:
        """Architectures, per-layer tensor names/shapes, non-layer tensors and (with `same_vocab`) vocab
        sizes agree; see `compatibility.check_compatible`."""
        from evomerge.engine.compatibility import check_compatible

        check_compatible(self, list(models) if models is not None else self.models, {**self.where, **(where or {})},
                         same_vocab=same_vocab)

    def check_custom_code(self, models: Iterable[str] | None = None, *, allowed: bool, flag: str) -> None:
        """Refuse a source whose config names its own Python code unless `allowed`; see
        `compatibility.check_custom_code`."""
        from evomerge.engine.compatibility import check_custom_code

        check_custom_code(self, list(models) if models is not None else self.models, allowed=allowed, flag=flag)

    def code_files(self, model: str) -> list[Path]:
        """The .py files a model's auto_map names (checked by `check_custom_code`)."""
        from evomerge.engine.compatibility import auto_map_modules, code_file

        ck = self.checkpoint(model)
        return [ck.path / code_file(r) for r in sorted(auto_map_modules(ck.config))]


def _open_checkpoint(name: str, where: str, location: "Location | None" = None) -> Checkpoint:
    """Open the checkpoint a reference names: its folder's config and safetensors headers, and its
    LoRA adapter's (checked against them)."""
    if location is None:  # not located before (an MoE config, a script): a Hub reference says its commit
        from evomerge.engine.references import locate, stderr_line

        location = locate(name, where, log=stderr_line)
    path = location.folder
    if not path.is_dir():
        raise CheckpointError(f"{name!r} is a file, not a model folder", where=where,
                              fix="give the folder that holds config.json and *.safetensors")
    config = _read_config(path, name, where)
    tensors = _read_headers(path, name, where)
    ck = Checkpoint(name=name, path=path, config=config, tensors=tensors, location=location)
    _index_layers(ck, where)
    ck.vocab_size = _tokenizer_vocab_size(path)
    if location.adapter is not None:
        from evomerge.engine.lora import open_adapter

        ck.adapter = open_adapter(location.adapter.folder, {k: i.shape for k, i in tensors.items()}, where)
    return ck


def _read_config(path: Path, name: str, where: str) -> dict:
    cfg_path = path / "config.json"
    if not cfg_path.is_file():
        raise CheckpointError(f"no config.json in {name!r}", where=where,
                              fix="give a Hugging Face model folder (config.json + *.safetensors)")
    try:
        return json.loads(cfg_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"config.json of {name!r} is not valid JSON ({exc})", where=where,
                              fix="repair or re-download the checkpoint") from None


def _read_headers(path: Path, name: str, where: str) -> dict[str, TensorInfo]:
    """Every tensor's header facts from the folder's safetensors files (no data)."""
    from safetensors import safe_open

    tensors: dict[str, TensorInfo] = {}
    for file, wanted in _weight_files(path, name, where).items():
        try:
            # safe_open validates the file (header, offsets, sizes); our own header read adds offsets.
            with safe_open(str(path / file), framework="pt", device="cpu") as f:
                offsets = _data_offsets(path / file)
                for key in f.keys():
                    if wanted is not None and key not in wanted:
                        continue
                    sl = f.get_slice(key)
                    dtype = ST_DTYPES.get(sl.get_dtype(), sl.get_dtype().lower())
                    start, nbytes = offsets[key]
                    tensors[key] = TensorInfo(file=file, shape=tuple(sl.get_shape()), dtype=dtype,
                                              start=start, nbytes=nbytes)
        except Exception as exc:  # safetensors raises its own error types for corrupt files
            raise CheckpointError(f"cannot read {file} in {name!r} ({exc})", where=where,
                                  fix="the file is damaged or not safetensors; re-download or re-save it") from None
        if wanted is not None:
            missing = sorted(set(wanted) - {k for k in tensors if tensors[k].file == file})
            if missing:
                raise CheckpointError(
                    f"the index of {name!r} lists {missing[0]!r} in {file}, but the file does not hold it",
                    where=where, fix="repair or re-download the checkpoint")
    if not tensors:
        raise CheckpointError(f"no tensors in the safetensors files of {name!r}", where=where,
                              fix="give a folder with model weights")
    return tensors


def _data_offsets(file: Path) -> dict[str, tuple[int, int]]:
    """name -> (absolute data offset, byte length), from the safetensors header."""
    with open(file, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
    base = 8 + n
    out = {}
    for key, meta in header.items():
        if key == "__metadata__":
            continue
        begin, end = meta["data_offsets"]
        out[key] = (base + begin, end - begin)
    return out


def _weight_files(path: Path, name: str, where: str) -> dict[str, set[str] | None]:
    """safetensors files to read -> the tensor names the index assigns them (None: all)."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise CheckpointError(f"model.safetensors.index.json of {name!r} is malformed ({exc})",
                                  where=where, fix="repair or re-download the checkpoint") from None
        files: dict[str, set[str] | None] = {}
        for key, file in weight_map.items():
            files.setdefault(file, set()).add(key)  # type: ignore[union-attr]
        for file in files:
            if not (path / file).is_file():
                raise CheckpointError(f"shard {file} listed in the index of {name!r} is missing",
                                      where=where, fix="re-download the complete checkpoint")
        return files
    single = path / "model.safetensors"
    if single.is_file():
        return {"model.safetensors": None}
    others = sorted(p.name for p in path.glob("*.safetensors"))
    if others:
        return {f: None for f in others}
    bins = sorted(p.name for p in path.glob("*.bin")) + sorted(p.name for p in path.glob("*.pt"))
    if bins:
        raise CheckpointError(
            f"{name!r} has only PyTorch pickle weights ({bins[0]}); evomerge reads safetensors only",
            where=where,
            fix="convert it once with transformers: load the folder with from_pretrained and "
                "save_pretrained it (safetensors is the default)")
    raise CheckpointError(f"no *.safetensors weights in {name!r}", where=where,
                          fix="give a Hugging Face model folder with model.safetensors "
                              "(or model-0000x-of-0000y.safetensors and its index)")


def _index_layers(ck: Checkpoint, where: str) -> None:
    layers: dict[int, list[str]] = {}
    prefixes = set()
    for name in ck.tensors:
        parts = split_layer_name(name)
        if parts is None:
            ck.non_layer.append(name)
            continue
        prefix, idx, suffix = parts
        prefixes.add(prefix)
        layers.setdefault(idx, []).append(suffix)
    if len(prefixes) > 1:
        raise CheckpointError(f"{ck.name!r} has several layer stacks ({', '.join(sorted(prefixes))})",
                              where=where, fix="evomerge merges single-stack decoder models")
    if not layers:
        return
    ck.layer_prefix = prefixes.pop()
    n = max(layers) + 1
    cfg_n = ck.config.get("num_hidden_layers", ck.config.get("n_layer"))
    if cfg_n is not None and cfg_n != n:
        raise CheckpointError(f"config.json of {ck.name!r} says {cfg_n} layers but the weights hold {n}",
                              where=where, fix="repair the checkpoint's config.json")
    ck.num_layers = n
    ck.layer_suffixes = list(layers.get(0, []))
    want = set(ck.layer_suffixes)
    for i in range(n):
        if set(layers.get(i, [])) != want:
            raise CheckpointError(f"layer {i} of {ck.name!r} holds different tensors than layer 0",
                                  where=where, fix="repair or re-download the checkpoint")


def _tokenizer_vocab_size(path: Path) -> int | None:
    """Token count of tokenizer.json (vocab + added tokens), or None without a tokenizer.json."""
    tj = path / "tokenizer.json"
    if not tj.is_file():
        return None
    try:
        data = json.loads(tj.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    vocab = (data.get("model") or {}).get("vocab")
    if isinstance(vocab, dict):
        ids = set(vocab.values())
    elif isinstance(vocab, list):  # unigram: [[piece, score], ...]
        ids = set(range(len(vocab)))
    else:
        return None
    for tok in data.get("added_tokens") or []:
        if isinstance(tok, dict) and "id" in tok:
            ids.add(tok["id"])
    return len(ids)
