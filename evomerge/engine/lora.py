"""LoRA adapters (PEFT format) applied to their base model tensor by tensor, as the merge reads it.

Why it exists: a recipe may name `base+adapter`. mergekit loads the whole base with transformers,
applies the adapter with peft's `merge_and_unload`, and saves the result to a cache folder before it
merges. evomerge reads the base's tensors as usual and adds each adapted tensor's low-rank update as
it is read, so no merged copy is ever written and memory holds one tensor at a time. The arithmetic
is peft's (tests/test_lora.py checks it against `merge_and_unload`, bit for bit):

- a linear layer `M` with `M.lora_A.weight` (r x in) and `M.lora_B.weight` (out x r): its weight
  becomes `W + (B @ A) * scale`, with A and B in float32 (peft's adapter dtype), transposed first when
  `fan_in_fan_out`, the sum rounded to W's dtype; scale = alpha / r (alpha / sqrt(r) with
  `use_rslora`), r and alpha from `rank_pattern` / `alpha_pattern` where a pattern names the module;
- an embedding `M` with `M.lora_embedding_A` (r x rows) and `M.lora_embedding_B` (dim x r):
  `W + ((B @ A).T * scale)` with the update rounded to W's dtype first (peft does so);
- a full tensor in the adapter (`modules_to_save`, an embedding's saved `base_layer`) replaces the
  base's tensor before any update.
The adapter must fit its base: every adapted tensor exists there with matching shapes, otherwise it
was made for another model (an error naming the field). Only safetensors adapters are read; DoRA,
LoRA biases and other peft variants are refused by name.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from evomerge.errors import CheckpointError

if TYPE_CHECKING:  # pragma: no cover
    import torch

PREFIX = "base_model.model."
UNSUPPORTED = {"use_dora": "DoRA", "lora_bias": "LoRA biases", "layer_replication": "layer replication",
               "target_parameters": "adapters on parameters", "use_qalora": "QALoRA"}


@dataclass(frozen=True)
class Update:
    """The low-rank update of one base tensor."""

    a: str  # adapter tensor names
    b: str
    scale: float
    embedding: bool
    transpose: bool


@dataclass
class Adapter:
    """One opened adapter: which base tensors it changes, and how."""

    folder: Path
    updates: dict[str, Update]  # base tensor name -> its update
    replaced: dict[str, str]  # base tensor name -> the adapter tensor that replaces it
    _handle: Any = field(default=None, repr=False)

    def changes(self, name: str) -> bool:
        return name in self.updates or name in self.replaced

    def apply(self, name: str, base: "torch.Tensor") -> "torch.Tensor":
        """The base tensor `name` with the adapter applied (peft's merge_and_unload arithmetic)."""
        import torch

        if name in self.replaced:
            base = self._read(self.replaced[name]).to(base.dtype)
        update = self.updates.get(name)
        if update is None:
            return base
        compute = torch.float64 if base.dtype == torch.float64 else torch.float32
        a, b = self._read(update.a).to(compute), self._read(update.b).to(compute)
        if update.embedding:
            delta = (b @ a).T * update.scale
            return base + delta.to(base.dtype)
        delta = b @ a
        if update.transpose:
            delta = delta.T
        return torch.add(base, delta * update.scale).to(base.dtype)

    def _read(self, key: str) -> "torch.Tensor":
        if self._handle is None:
            from safetensors import safe_open

            self._handle = safe_open(str(self.folder / "adapter_model.safetensors"), framework="pt", device="cpu")
        return self._handle.get_tensor(key)


def open_adapter(folder: Path, base_tensors: dict[str, tuple[int, ...]], where: str) -> Adapter:
    """Read an adapter folder's config and tensor headers and check them against the base's tensors
    ({name: shape}). Errors name `where` (the YAML field of the `base+adapter` reference)."""
    config = _config(folder, where)
    shapes = _shapes(folder, where)
    updates: dict[str, Update] = {}
    replaced: dict[str, str] = {}
    pairs: dict[str, dict[str, str]] = {}
    for key in shapes:
        name = key.removeprefix(PREFIX)
        m = re.match(r"^(?P<module>.+)\.(?P<part>lora_A\.weight|lora_B\.weight|lora_embedding_A|lora_embedding_B)$",
                     name)
        if m:
            pairs.setdefault(m.group("module"), {})[m.group("part")] = key
        elif ".lora_" in name:
            raise CheckpointError(f"the adapter holds {name!r}, a kind of tensor evomerge does not apply", where=where,
                                  fix="use a plain LoRA adapter (no DoRA magnitudes, no LoRA biases)")
        else:
            replaced[name.replace(".base_layer.", ".")] = key
    for module, parts in sorted(pairs.items()):
        updates[f"{module}.weight"] = _update(module, parts, config, shapes, where)
    _check_fit(updates, replaced, shapes, base_tensors, where)
    return Adapter(folder=folder, updates=updates, replaced=replaced)


def _config(folder: Path, where: str) -> dict:
    path = folder / "adapter_config.json"
    if not path.is_file():
        raise CheckpointError(f"no adapter_config.json in {folder}", where=where,
                              fix="give a PEFT LoRA adapter folder (adapter_config.json + adapter_model.safetensors)")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"adapter_config.json in {folder} is not valid JSON ({exc})", where=where,
                              fix="repair or re-download the adapter") from None
    if str(config.get("peft_type", "LORA")).upper() != "LORA":
        raise CheckpointError(f"the adapter in {folder} is a {config.get('peft_type')} adapter, not LoRA", where=where,
                              fix="give a LoRA adapter, or merge this one with peft and give the merged model")
    for key, what in UNSUPPORTED.items():
        if config.get(key):
            raise CheckpointError(f"the adapter in {folder} uses {what} ({key}), which evomerge does not apply",
                                  where=where, fix="merge it with peft (merge_and_unload, save_pretrained) and give "
                                                   "the merged model's folder")
    return config


def _shapes(folder: Path, where: str) -> dict[str, tuple[int, ...]]:
    path = folder / "adapter_model.safetensors"
    if not path.is_file():
        pickled = sorted(p.name for p in folder.glob("adapter_model.*") if p.suffix in (".bin", ".pt", ".pth"))
        raise CheckpointError(
            f"no adapter_model.safetensors in {folder}" + (f", only {pickled[0]} (a pickle)" if pickled else ""),
            where=where, fix="evomerge reads safetensors only: load the adapter with peft and save_pretrained it "
                             "(safetensors is the default), then give that folder")
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except Exception as exc:  # safetensors' own error types for a damaged file
        raise CheckpointError(f"cannot read {path} ({exc})", where=where,
                              fix="the file is damaged or not safetensors; re-download or re-save it") from None


def _update(module: str, parts: dict[str, str], config: dict, shapes: dict, where: str) -> Update:
    embedding = "lora_embedding_A" in parts or "lora_embedding_B" in parts
    a_key = parts.get("lora_embedding_A" if embedding else "lora_A.weight")
    b_key = parts.get("lora_embedding_B" if embedding else "lora_B.weight")
    if a_key is None or b_key is None:
        raise CheckpointError(f"the adapter has only one half of the update of {module!r}", where=where,
                              fix="repair or re-download the adapter")
    r = _pattern(config.get("rank_pattern") or {}, module, config.get("r", 8))
    alpha = _pattern(config.get("alpha_pattern") or {}, module, config.get("lora_alpha", 8))
    if shapes[a_key][0] != r:
        raise CheckpointError(f"the adapter's rank for {module!r} is {shapes[a_key][0]}, its config says {r}",
                              where=where, fix="repair or re-download the adapter")
    scale = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
    return Update(a=a_key, b=b_key, scale=scale, embedding=embedding,
                  transpose=bool(config.get("fan_in_fan_out")) and not embedding)


def _pattern(patterns: dict, module: str, default):
    """peft's per-module rank or alpha: the first pattern key that matches the end of the module path."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def _check_fit(updates: dict[str, Update], replaced: dict[str, str], shapes: dict, base: dict, where: str) -> None:
    """Every tensor the adapter changes exists in the base with the shape the adapter expects."""
    for name in [*replaced, *updates]:
        if name not in base:
            raise CheckpointError(f"the adapter changes {name!r}, which the base model does not have: it was made "
                                  "for another model", where=where, fix="give the base model the adapter was trained on")
    for name, key in replaced.items():
        if shapes[key] != base[name]:
            raise CheckpointError(f"the adapter's {name} has shape {list(shapes[key])}, the base's "
                                  f"{list(base[name])}: it was made for another model", where=where,
                                  fix="give the base model the adapter was trained on")
    for name, u in updates.items():
        (r, cols), (rows, _) = shapes[u.a], shapes[u.b]
        want = (cols, rows) if u.embedding or u.transpose else (rows, cols)
        if tuple(base[name]) != want:
            raise CheckpointError(f"the adapter's update of {name} has shape {list(want)}, the base's tensor "
                                  f"{list(base[name])}: it was made for another model", where=where,
                                  fix="give the base model the adapter was trained on")


__all__ = ["Adapter", "Update", "open_adapter"]
