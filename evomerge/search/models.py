"""A space's model entries: local Hugging Face folders, Hub ids, or `toy:<name>`; short names; dtype.

Why it exists: `models:`, `base_model:` and `tokenizer:` in a space file are folders relative to the
file, Hub ids (`org/name`, `org/name@revision`: resolved by the engine's references, from the cache or
downloaded, to a snapshot folder whose path holds the commit), or names in the embedded toy family; the
search needs absolute folders and short names for parameter names and reports.
`spacefile.space_from_dict` calls these while loading a space.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from evomerge.errors import ConfigError
from evomerge.search.space import ModelRef


def toy_family():
    """The embedded toy family (its models back `toy:<name>`, its tasks `tasks_dir: toy`)."""
    from evomerge.toy.family import family

    return family()


def model_path(text: str, root: Path, where: str, *, need_config: bool = True) -> str:
    """The absolute folder of a model entry: `toy:<name>`, or a folder (relative to `root`) holding a
    config.json (unless `need_config` is false: a tokenizer folder)."""
    if text.startswith("toy:"):
        fam = toy_family()
        key = text[4:]
        table = {**fam.experts, **fam.models}  # toy:rev, toy:expert_rev, toy:base
        if key not in table:
            import difflib

            close = difflib.get_close_matches(key, list(table), n=1)
            raise ConfigError(f"the toy family has no model {key!r}", where=where,
                              fix=(f"did you mean toy:{close[0]}? " if close else "")
                              + "available: " + ", ".join(f"toy:{k}" for k in table))
        return str(Path(table[key]).resolve())
    p = Path(text).expanduser()
    p = p if p.is_absolute() else (root / p)
    p = p.resolve()
    if not p.exists() and ("@" in text or "+" in text or is_hub_id(text)):
        return hub_folder(text, p, where, need_config=need_config)
    if not p.is_dir() or (need_config and not (p / "config.json").is_file()):
        raise ConfigError(f"model folder {text!r} not found or has no config.json ({p})", where=where,
                          fix="give a local Hugging Face model folder (relative paths start at the space file) "
                              "or a Hub id (org/name, org/name@revision)")
    return str(p)


def is_hub_id(text: str) -> bool:
    from evomerge.engine.references import is_hub_id as hub

    return hub(text)


def hub_folder(text: str, local: Path, where: str, *, need_config: bool) -> str:
    """The snapshot folder of a Hub reference in a space (one stderr line says its commit). A LoRA
    reference is refused: the search keeps resident models built from folders."""
    from evomerge.engine.references import locate, parse, stderr_line
    from evomerge.errors import CheckpointError

    model, adapter = parse(text, where)
    if adapter is not None:
        raise ConfigError(f"{text!r} is a LoRA reference (base+adapter), which a search cannot hold as a model",
                          where=where, fix="merge it once (a recipe `merge_method: passthrough` with `models: "
                                           f"[{{model: {text}}}]`, `evomerge merge` it) and list that folder")
    if not is_hub_id(model.path):
        raise ConfigError(f"model folder {text!r} not found ({local})", where=where,
                          fix="give a local Hugging Face model folder (relative paths start at the space file)")
    try:
        return str(locate(text, where, weights=need_config, log=stderr_line).folder.resolve())
    except CheckpointError as exc:
        raise ConfigError(f"no model folder {local}, and as a Hub id: {exc.what}", where=where,
                          fix="give a local Hugging Face model folder (relative paths start at the space file), or "
                              + (exc.fix or "a Hub id")) from None


def alias(text: str) -> str:
    """A short name for a model from its path (the folder name, the toy name, a Hub id's name@revision)."""
    stem = text[4:] if text.startswith("toy:") else Path(text.rstrip("/")).name
    return re.sub(r"[^A-Za-z0-9_-]+", "_", stem).strip("_") or "model"


def unique_alias(name: str, taken: list[str]) -> str:
    """`name`, or `name2`, `name3`... the first that is not taken."""
    out, i = name, 2
    while out in taken:
        out, i = f"{name}{i}", i + 1
    return out


def declared_dtype(model: ModelRef) -> str:
    """The dtype a model folder declares (config.json `dtype` / `torch_dtype`), else float32."""
    try:
        config = json.loads((Path(model.path) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return "float32"
    value = str(config.get("dtype") or config.get("torch_dtype") or "float32").removeprefix("torch.")
    return value if value in ("float32", "float16", "bfloat16", "float64") else "float32"
