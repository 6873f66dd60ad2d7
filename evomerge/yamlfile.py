"""Reading the user's YAML files (recipes, search spaces, MoE configs) strictly.

Why it exists: `yaml.safe_load` quietly keeps the last of two equal keys, so a recipe with two
`parameters:` blocks merges with one of them dropped and nobody is told. Every YAML file a user writes
is read here: `yaml.safe_load` only (no Python objects), after a pass over the composed node tree
that refuses a duplicated key with both line numbers,
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


def _first_duplicate(node) -> tuple[Any, int, int] | None:
    """(key, first line, repeated line) of the first key given twice in any mapping of a composed
    YAML node tree, or None. Scalar keys are compared by their text."""
    import yaml

    todo = [node] if node is not None else []
    while todo:
        n = todo.pop()
        if isinstance(n, yaml.MappingNode):
            seen: dict[str, int] = {}
            for key, value in n.value:
                if isinstance(key, yaml.ScalarNode):
                    line = key.start_mark.line + 1
                    if key.value in seen:
                        return key.value, seen[key.value], line
                    seen[key.value] = line
                todo.append(value)
        elif isinstance(n, yaml.SequenceNode):
            todo.extend(n.value)
    return None


def parse(text: str, *, where: str) -> Any:
    """The YAML document in `text` (`where` names it in errors: a path)."""
    import yaml

    try:
        dup = _first_duplicate(yaml.compose(text, Loader=yaml.SafeLoader))
        if dup is not None:
            key, first, again = dup
            raise ConfigError(
                f"key {key!r} is given twice (lines {first} and {again}); YAML would keep only the last",
                where=f"{where}:{again}",
                fix=f"merge the two {key!r} entries into one",
            )
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        if mark is not None:
            where = f"{where}:{mark.line + 1}:{mark.column + 1}"
        raise ConfigError(f"not valid YAML ({getattr(exc, 'problem', exc)})", where=where,
                          fix="check indentation and quoting") from None


def comment_header(comments) -> str:
    """`# ...` lines for the top of a YAML file we write (best.yaml, configs); multi-line entries split."""
    return "".join(f"# {c}\n" if c else "#\n" for line in comments for c in str(line).splitlines() or [""])
