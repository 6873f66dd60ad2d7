"""Reading the user's YAML files (recipes, search spaces, MoE configs) strictly.

Why it exists: `yaml.safe_load` quietly keeps the last of two equal keys, so a recipe with two
`parameters:` blocks merges with one of them dropped and nobody is told. Every YAML file a user writes
is read here: safe loading only (no Python objects), a duplicated key refused with both line numbers,
and a syntax error reported with its line and column, all as `ConfigError`s that name the file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from evomerge.errors import ConfigError


def read_text(path, *, what: str, missing_fix: str) -> str:
    """Read a UTF-8 YAML file the user named; a missing or unreadable file is a ConfigError naming it.

    `what` names the file in the message ("recipe file", "search space file")."""
    try:
        return Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{what} not found", where=str(path), fix=missing_fix) from None
    except (IsADirectoryError, PermissionError, UnicodeDecodeError) as exc:
        raise ConfigError(
            f"cannot read the {what} ({type(exc).__name__})",
            where=str(path),
            fix="pass a readable UTF-8 YAML file",
        ) from None


def _loader():
    import yaml

    class StrictLoader(yaml.SafeLoader):
        """SafeLoader that refuses a key given twice in one mapping."""

    def construct_mapping(loader, node, deep=False):
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = loader.construct_object(key_node, deep=True)
            try:
                hash(key)
            except TypeError:
                continue  # an unhashable key: the base constructor reports it
            line = key_node.start_mark.line + 1
            if key in seen:
                raise _Duplicate(key, seen[key], line)
            seen[key] = line
        return yaml.SafeLoader.construct_mapping(loader, node, deep=deep)

    StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, construct_mapping)
    return StrictLoader


class _Duplicate(Exception):
    def __init__(self, key: Any, first: int, again: int):
        self.key, self.first, self.again = key, first, again


def parse(text: str, *, where: str) -> Any:
    """The YAML document in `text` (`where` names it in errors: a path)."""
    import yaml

    try:
        return yaml.load(text, Loader=_loader())  # noqa: S506 - a SafeLoader subclass
    except _Duplicate as dup:
        raise ConfigError(
            f"key {dup.key!r} is given twice (lines {dup.first} and {dup.again}); YAML would keep only the last",
            where=f"{where}:{dup.again}",
            fix=f"merge the two {dup.key!r} entries into one",
        ) from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        if mark is not None:
            where = f"{where}:{mark.line + 1}:{mark.column + 1}"
        raise ConfigError(f"not valid YAML ({getattr(exc, 'problem', exc)})", where=where,
                          fix="check indentation and quoting") from None
