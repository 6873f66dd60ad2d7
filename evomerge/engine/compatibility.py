"""Whether opened source checkpoints can be merged: one architecture, one tensor layout, one vocabulary,
and no model code that nobody agreed to run.

Why it exists: a merge of checkpoints that disagree fails deep inside the arithmetic or, worse,
succeeds with nonsense. These checks read only headers and configs (no tensor data) and name the YAML
field of the model that disagrees. `Sources.check_compatible` and `Sources.check_custom_code` call them
before any plan is made.
"""

from __future__ import annotations

from collections.abc import Mapping

from evomerge.errors import CheckpointError

# `Sources` and `Checkpoint` (engine/checkpoints.py) are named in annotations only: checkpoints.py calls
# this module, so importing it back would make a loop.


def check_compatible(sources: "Sources", names: list[str], where: Mapping[str, str], *, same_vocab: bool) -> None:
    """Architectures, per-layer tensor names/shapes and non-layer tensors agree between `names`; with
    `same_vocab`, so do the vocabulary sizes (config and tokenizer) and the embedding shapes. Without
    it (the recipe chooses an output vocabulary), matrices indexed by token may differ in rows."""
    if len(names) < 2:
        return
    ref = sources.checkpoint(names[0])
    for other_name in names[1:]:
        other = sources.checkpoint(other_name)
        fld = where.get(other_name, other_name)
        _same_layout(ref, other, fld)
        _same_non_layer(ref, other, fld, same_vocab)
        if same_vocab:
            _same_vocabulary(ref, other, fld)


def _same_layout(ref: "Checkpoint", other: "Checkpoint", fld: str) -> None:
    if _arch(ref.config) != _arch(other.config):
        raise CheckpointError(
            f"architectures disagree: {ref.name} is {_arch(ref.config)}, {other.name} is "
            f"{_arch(other.config)}", where=fld,
            fix="merge checkpoints of one architecture (fine-tunes of the same base)")
    if set(ref.layer_suffixes) != set(other.layer_suffixes):
        diff = sorted(set(ref.layer_suffixes) ^ set(other.layer_suffixes))
        raise CheckpointError(
            f"per-layer tensors disagree between {ref.name} and {other.name} (e.g. {diff[0]!r})",
            where=fld, fix="merge checkpoints of one architecture")
    for suffix in ref.layer_suffixes:
        a = ref.tensors[ref.layer_name(0, suffix)].shape
        b = other.tensors[other.layer_name(0, suffix)].shape
        if a != b:
            raise CheckpointError(
                f"tensor shapes disagree for {ref.layer_name(0, suffix)}: {ref.name} has "
                f"{list(a)}, {other.name} has {list(b)}", where=fld,
                fix="merge checkpoints of the same size (fine-tunes of the same base)")


def _same_non_layer(ref: "Checkpoint", other: "Checkpoint", fld: str, same_vocab: bool) -> None:
    for name in ref.non_layer:
        if name not in other.tensors:
            continue
        a, b = ref.tensors[name].shape, other.tensors[name].shape
        by_token = not same_vocab and len(a) == 2 and a[0] == ref.config.get("vocab_size") \
            and b[0] == other.config.get("vocab_size")
        if (a[1:] != b[1:]) if by_token else (a != b):
            raise CheckpointError(
                f"tensor shapes disagree for {name}: {ref.name} has {list(a)}, {other.name} has {list(b)}",
                where=fld, fix="merge checkpoints of the same size; embeddings must have the same vocabulary "
                               "(or choose one: tokenizer_source: union)")


def _same_vocabulary(ref: "Checkpoint", other: "Checkpoint", fld: str) -> None:
    rv, ov = ref.config.get("vocab_size"), other.config.get("vocab_size")
    if rv is not None and ov is not None and rv != ov:
        raise CheckpointError(
            f"vocab sizes disagree: {ref.name} has vocab_size {rv}, {other.name} has {ov}",
            where=fld, fix="merge models that share one tokenizer, or build one: tokenizer_source: union")
    if ref.vocab_size is not None and other.vocab_size is not None and ref.vocab_size != other.vocab_size:
        raise CheckpointError(
            f"tokenizer vocab sizes disagree: {ref.name} has {ref.vocab_size} tokens, "
            f"{other.name} has {other.vocab_size}", where=fld,
            fix="merge models that share one tokenizer, or build one: tokenizer_source: union")


def check_custom_code(sources: "Sources", models: list[str], *, allowed: bool, flag: str) -> None:
    """Refuse a source whose config names its own Python code (`auto_map`) unless `allowed`: loading
    it runs that code, and a merged config that keeps `auto_map` without the code loads nowhere.
    When allowed, the code files must be in the folder (a remote `repo--module.Class` is refused)."""
    for model in models:
        ck = sources.checkpoint(model)
        refs = auto_map_modules(ck.config)
        if not refs:
            continue
        fld = sources.where.get(model, model)
        if not allowed:
            raise CheckpointError(
                f"model {model!r} needs its own code (config.json auto_map: {', '.join(sorted(refs))}); "
                "evomerge neither runs nor copies a model's code unless told", where=fld,
                fix=f"pass {flag} if you trust the .py files in {ck.path}, or use a transformers-native "
                    "checkpoint")
        for ref in sorted(refs):
            if "--" in ref:
                raise CheckpointError(
                    f"model {model!r} points its auto_map at code in another repository ({ref!r})",
                    where=fld, fix="put that code into the model folder and name it as module.Class")
            if not (ck.path / code_file(ref)).is_file():
                raise CheckpointError(
                    f"model {model!r} names code file {code_file(ref)} in auto_map, which is not in {ck.path}",
                    where=fld, fix="copy the model's .py files into its folder")


def auto_map_modules(config: dict) -> set[str]:
    """The code modules a config's `auto_map` names ("modeling_x.XForCausalLM" -> "modeling_x")."""
    out = set()
    for value in (config.get("auto_map") or {}).values():
        for ref in (value if isinstance(value, (list, tuple)) else [value]):
            if isinstance(ref, str) and "." in ref:
                out.add(ref.rsplit(".", 1)[0])
    return out


def code_file(module: str) -> str:
    return module.split("--", 1)[-1].replace(".", "/") + ".py"


def _arch(config: dict) -> str:
    archs = config.get("architectures") or []
    return ",".join(archs) if archs else str(config.get("model_type"))


__all__ = ["auto_map_modules", "check_compatible", "check_custom_code", "code_file"]
