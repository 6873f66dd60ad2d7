"""`--model-root`: a recipe's model folders looked up by name under one folder, and never outside it.

Why it exists: a best.yaml holds the absolute paths of the machine it was made on; elsewhere, the user
points `--model-root` at the folder holding the models, and each reference is looked up there by its
folder name (`/old/place/up` -> `ROOT/up`). A name such as `..` (from a reference like `/elsewhere/..`),
or a folder under ROOT that is a symlink to somewhere else, would lead outside ROOT: refused, after
`..` and symlinks are resolved. Merge recipes (`recipe.MergeRecipe.relocated`) and MoE configs
(`moe.config.MoEConfig.relocated`) both map their references through `under_root`.
"""

from __future__ import annotations

import os
from pathlib import Path

from evomerge.errors import ConfigError


def under_root(models: list[str], root: str | os.PathLike, *, fix: str) -> dict[str, str]:
    """{reference: ROOT/<its folder name>} for every model reference; two references with one folder
    name, a name that is not a folder name, or a folder that resolves outside ROOT is a ConfigError."""
    base = Path(root).expanduser().resolve()
    names: dict[str, str] = {}
    for model in models:
        name = Path(model.rstrip("/\\")).name
        if name in ("", ".", ".."):
            raise ConfigError(f"--model-root cannot look {model!r} up: it names no folder", where="--model-root",
                              fix="give the model as a path that ends in its folder name")
        if names.setdefault(name, model) != model:
            raise ConfigError(f"--model-root cannot tell {names[name]!r} and {model!r} apart: both folders "
                              f"are named {name!r}", where="--model-root", fix=fix)
    mapping = {}
    for name, model in names.items():
        target = base / name
        if not target.resolve().is_relative_to(base):
            raise ConfigError(f"{model!r} would be read from {target.resolve()}, outside --model-root {base} "
                              "(a symlink?)", where="--model-root",
                              fix="put the model folder itself under --model-root")
        mapping[model] = str(target)
    return mapping
