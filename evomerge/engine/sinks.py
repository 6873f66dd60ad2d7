"""Where merged tensors go: into a live model (search) or into safetensors shards (export).

One plan, two sinks: `evomerge.engine.execution.merge_into` computes each output tensor once and hands it to a
sink, so the model scored during a search and the model exported by `evomerge merge` are the same
tensors, bit for bit. A sink has three calls:

    sink.prepare(specs)   # optional: every output tensor's name, shape and dtype, before any data
    sink.write(name, t)   # once per output tensor
    sink.finish()         # after the last tensor

`ShardedSafetensorsSink` uses `prepare` to lay out every shard up front (the plan knows each tensor's
shape and dtype), writes each shard's header first and then streams each tensor's bytes to its final
offset, so memory holds one tensor at a time rather than a whole shard. Without `prepare` it falls
back to collecting a shard in memory and writing it when full (mergekit's behaviour).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from evomerge.errors import CheckpointError, ConfigError

if TYPE_CHECKING:  # pragma: no cover
    import torch

ST_CODES = {
    "float64": "F64", "float32": "F32", "float16": "F16", "bfloat16": "BF16",
    "int64": "I64", "int32": "I32", "int16": "I16", "int8": "I8", "uint8": "U8", "bool": "BOOL",
    "float8_e4m3fn": "F8_E4M3", "float8_e5m2": "F8_E5M2",
}
ITEM_SIZE = {
    "float64": 8, "float32": 4, "float16": 2, "bfloat16": 2, "int64": 8, "int32": 4, "int16": 2,
    "int8": 1, "uint8": 1, "bool": 1, "float8_e4m3fn": 1, "float8_e5m2": 1,
}


@dataclass(frozen=True)
class TensorSpec:
    """An output tensor announced before its data: name, shape, torch dtype name."""

    name: str
    shape: tuple[int, ...]
    dtype: str

    @property
    def nbytes(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n * ITEM_SIZE[self.dtype]


class Sink(Protocol):
    def prepare(self, specs: list[TensorSpec]) -> None: ...

    def write(self, name: str, tensor: "torch.Tensor") -> None: ...

    def finish(self) -> None: ...


def dtype_name(dtype: Any) -> str:
    """torch.bfloat16 -> 'bfloat16'."""
    return str(dtype).replace("torch.", "")


# --- in memory --------------------------------------------------------------------------------------
class ModelSink:
    """Write merged tensors into an existing `nn.Module`'s parameters and buffers, in place.

    Tied weights share storage: when the merge produces only `model.embed_tokens.weight` for a model
    that ties `lm_head.weight` to it, writing the embedding updates both. A merge that produces both
    names for a model that ties them is refused (the two values could differ).
    """

    def __init__(self, model: Any):
        self.model = model
        self._targets: dict[str, Any] = {}
        for name, p in model.named_parameters(remove_duplicate=False):
            self._targets[name] = p
        for name, b in model.named_buffers(remove_duplicate=False):
            self._targets.setdefault(name, b)
        self.written: set[str] = set()

    def prepare(self, specs: list[TensorSpec]) -> None:
        names = {s.name for s in specs}
        for spec in specs:
            target = self._targets.get(spec.name)
            if target is None:
                raise CheckpointError(f"the resident model has no tensor {spec.name!r}",
                                      where=type(self.model).__name__,
                                      fix="build the resident model from the base model's config")
            if tuple(target.shape) != tuple(spec.shape):
                raise CheckpointError(
                    f"shape mismatch for {spec.name}: the merge gives {list(spec.shape)}, the resident "
                    f"model has {list(target.shape)}", where=type(self.model).__name__,
                    fix="build the resident model from a config with the recipe's output layer count")
        # Every parameter must be produced (else it would keep a previous trial's values), and tied
        # parameters must be produced under one name only.
        by_storage: dict[int, list[str]] = {}
        for name, p in self.model.named_parameters(remove_duplicate=False):
            by_storage.setdefault(p.data_ptr(), []).append(name)
        for group in by_storage.values():
            produced = [n for n in group if n in names]
            if not produced:
                raise CheckpointError(f"the merge does not produce {group[0]!r} of the resident model",
                                      where=type(self.model).__name__,
                                      fix="build the resident model from the base model's config")
            if len(produced) > 1:
                raise CheckpointError(
                    f"the resident model ties {' and '.join(produced)}, but the merge produces each",
                    where=type(self.model).__name__,
                    fix="build the resident model with tie_word_embeddings matching the checkpoints")

    def write(self, name: str, tensor: "torch.Tensor") -> None:
        import torch

        target = self._targets.get(name)
        if target is None:
            raise CheckpointError(f"the resident model has no tensor {name!r}", where=type(self.model).__name__,
                                  fix="build the resident model from the base model's config")
        if tuple(target.shape) != tuple(tensor.shape):
            raise CheckpointError(f"shape mismatch for {name}: merge gives {list(tensor.shape)}, model has "
                                  f"{list(target.shape)}", where=type(self.model).__name__)
        with torch.no_grad():
            target.copy_(tensor)
        self.written.add(name)

    def finish(self) -> None:
        pass


# --- on disk ----------------------------------------------------------------------------------------
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]i?b?|b)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9,
          "t": 10**12, "tb": 10**12, "ki": 2**10, "kib": 2**10, "mi": 2**20, "mib": 2**20,
          "gi": 2**30, "gib": 2**30, "ti": 2**40, "tib": 2**40}


def parse_size(value: int | str, where: str = "--out-shard-size") -> int:
    """'5GB' -> 5_000_000_000, '500MiB' -> 524288000, 1000 -> 1000 (decimal units, as HF)."""
    if isinstance(value, int) and not isinstance(value, bool):
        size = value
    else:
        m = _SIZE_RE.match(str(value))
        if not m:
            raise ConfigError(f"cannot read size {value!r}", where=where, fix="write e.g. 500MB, 2GB or 5GB")
        size = int(float(m.group(1)) * _UNITS[(m.group(2) or "").lower()])
    if size <= 0:
        raise ConfigError(f"size must be positive, got {value!r}", where=where, fix="write e.g. 500MB or 5GB")
    return size


class ShardedSafetensorsSink:
    """Write tensors as Hugging Face safetensors shards (+ model.safetensors.index.json if >1 shard).

    Shard files are named like transformers and mergekit name them: `model.safetensors` for one
    shard, else `model-00001-of-0000N.safetensors`; a tensor starts a new shard when it would push
    the current one past `shard_size` bytes.
    """

    def __init__(self, out_dir: str | os.PathLike, shard_size: int | str = "5GB", *, background: bool = True):
        self.out_dir = Path(out_dir)
        # With `background`, prepared (streaming) writes happen on a helper thread, so writing one
        # tensor overlaps computing the next; at most two tensors wait in the queue.
        self.background = background
        self._queue = None
        self._thread = None
        self._error: BaseException | None = None
        self.shard_size = parse_size(shard_size)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self._layout: dict[str, tuple[int, int, int]] | None = None  # name -> (shard, begin, end)
        self._specs: dict[str, TensorSpec] = {}
        self._shard_files: list[str] = []
        self._data_start: list[int] = []
        self._handles: dict[int, Any] = {}
        self._written: set[str] = set()
        # fallback (no prepare): in-memory shard
        self._pending: dict[str, "torch.Tensor"] = {}
        self._pending_bytes = 0
        self._flushed: list[tuple[str, list[str]]] = []
        self.total_size = 0

    # --- streaming mode --------------------------------------------------------------------------
    def prepare(self, specs: list[TensorSpec]) -> None:
        shards: list[list[TensorSpec]] = [[]]
        size = 0
        for spec in specs:
            if spec.name in self._specs:
                raise AssertionError(f"tensor {spec.name} announced twice")
            self._specs[spec.name] = spec
            if shards[-1] and size + spec.nbytes > self.shard_size:
                shards.append([])
                size = 0
            shards[-1].append(spec)
            size += spec.nbytes
        n = len(shards)
        self._layout = {}
        for i, group in enumerate(shards):
            fname = "model.safetensors" if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
            offset = 0
            for spec in group:
                header[spec.name] = {"dtype": ST_CODES[spec.dtype], "shape": list(spec.shape),
                                     "data_offsets": [offset, offset + spec.nbytes]}
                self._layout[spec.name] = (i, offset, offset + spec.nbytes)
                offset += spec.nbytes
            raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
            raw += b" " * (-len(raw) % 8)
            path = self.out_dir / fname
            with open(path, "wb") as f:
                f.write(len(raw).to_bytes(8, "little"))
                f.write(raw)
                f.truncate(8 + len(raw) + offset)
            self._shard_files.append(fname)
            self._data_start.append(8 + len(raw))
            self.total_size += offset

    def write(self, name: str, tensor: "torch.Tensor") -> None:
        if self._layout is None:
            return self._write_buffered(name, tensor)
        if self._error is not None:
            raise self._error
        if not self.background:
            return self._write_now(name, tensor)
        if self._thread is None:
            import queue
            import threading

            self._queue = queue.Queue(maxsize=2)
            self._thread = threading.Thread(target=self._drain, name="evomerge-write", daemon=True)
            self._thread.start()
        self._queue.put((name, tensor))

    def _drain(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            if self._error is None:
                try:
                    self._write_now(*item)
                except BaseException as exc:  # re-raised on the caller's thread
                    self._error = exc

    def _stop_thread(self) -> None:
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join()
            self._thread = None

    def _write_now(self, name: str, tensor: "torch.Tensor") -> None:
        spec = self._specs.get(name)
        if spec is None:
            raise AssertionError(f"tensor {name} was not announced in prepare()")
        if name in self._written:
            raise AssertionError(f"tensor {name} written twice")
        if tuple(tensor.shape) != spec.shape:
            raise AssertionError(f"{name}: shape {tuple(tensor.shape)} != announced {spec.shape}")
        if dtype_name(tensor.dtype) != spec.dtype:
            import torch

            tensor = tensor.to(getattr(torch, spec.dtype))
        shard, begin, end = self._layout[name]
        data = _as_bytes(tensor)
        if len(data) != end - begin:
            raise AssertionError(f"{name}: {len(data)} bytes != announced {end - begin}")
        f = self._handles.get(shard)
        if f is None:
            # one shard open at a time: writes arrive in plan order
            for other in list(self._handles):
                self._handles.pop(other).close()
            f = open(self.out_dir / self._shard_files[shard], "r+b")
            self._handles[shard] = f
        f.seek(self._data_start[shard] + begin)
        f.write(data)
        self._written.add(name)

    def finish(self) -> None:
        self._stop_thread()
        for f in self._handles.values():
            f.close()
        self._handles.clear()
        if self._error is not None:
            raise self._error
        if self._layout is None:
            self._finish_buffered()
            return
        missing = [n for n in self._specs if n not in self._written]
        if missing:
            raise AssertionError(f"{len(missing)} announced tensors were never written, e.g. {missing[0]}")
        if len(self._shard_files) > 1:
            weight_map = {name: self._shard_files[s] for name, (s, _, _) in self._layout.items()}
            self._write_index(weight_map)

    def abort(self) -> None:
        """Stop the writer thread and close files after a failure (the caller removes the folder)."""
        self._error = self._error or RuntimeError("aborted")
        self._stop_thread()
        for f in self._handles.values():
            f.close()
        self._handles.clear()

    def _write_index(self, weight_map: dict[str, str]) -> None:
        index = {"metadata": {"total_size": self.total_size}, "weight_map": weight_map}
        (self.out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")

    # --- buffered mode (no prepare) --------------------------------------------------------------
    def _write_buffered(self, name: str, tensor: "torch.Tensor") -> None:
        nbytes = tensor.numel() * tensor.element_size()
        if self._pending and self._pending_bytes + nbytes > self.shard_size:
            self._flush()
        self._pending[name] = tensor.detach().to("cpu").contiguous()
        self._pending_bytes += nbytes

    def _flush(self) -> None:
        from safetensors.torch import save_file

        if not self._pending:
            return
        tmp = f"shard-{len(self._flushed) + 1}.tmp"
        save_file(self._pending, str(self.out_dir / tmp), metadata={"format": "pt"})
        self._flushed.append((tmp, list(self._pending)))
        self.total_size += self._pending_bytes
        self._pending = {}
        self._pending_bytes = 0

    def _finish_buffered(self) -> None:
        self._flush()
        n = len(self._flushed)
        weight_map = {}
        for i, (tmp, names) in enumerate(self._flushed):
            fname = "model.safetensors" if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            os.replace(self.out_dir / tmp, self.out_dir / fname)
            for name in names:
                weight_map[name] = fname
            self._shard_files.append(fname)
        if n > 1:
            self._write_index(weight_map)


def _as_bytes(tensor: "torch.Tensor") -> memoryview:
    import torch

    t = tensor.detach()
    if t.device.type != "cpu":
        t = t.to("cpu")
    t = t.contiguous()
    flat = t.reshape(-1)
    if flat.dtype == torch.bool:
        flat = flat.to(torch.uint8)
    return memoryview(flat.view(torch.uint8).numpy()).cast("B")
