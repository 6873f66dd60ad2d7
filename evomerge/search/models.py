"""A space's model entries: local Hugging Face folders or `toy:<name>`, their short names, their dtype.

Why it exists: `models:`, `base_model:` and `tokenizer:` in a space file are paths relative to the file
(or names in the embedded toy family); the search needs absolute folders and short names for parameter
names and reports. `spacefile.space_from_dict` calls these while loading a space.
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
    if not p.is_dir() or (need_config and not (p / "config.json").is_file()):
        raise ConfigError(f"model folder {text!r} not found or has no config.json ({p})", where=where,
                          fix="give a local Hugging Face model folder (relative paths start at the space file)")
    return str(p)


def alias(text: str) -> str:
    """A short name for a model from its path (the folder name, or the toy name)."""
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
