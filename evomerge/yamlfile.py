"""Reading the user's YAML files (recipes, search spaces, MoE configs) strictly.

Why it exists: `yaml.safe_load` quietly keeps the last of two equal keys, so a recipe with two
`parameters:` blocks merges with one of them dropped and nobody is told. Every YAML file a user writes
is read here: `yaml.safe_load` only (no Python objects), after one pass over the composed node tree
(linear in the file: an alias is visited once) that refuses a duplicated key with both line numbers and
a file whose aliases expand past `MAX_EXPANDED_NODES` (a "billion laughs" bomb), and a syntax error
reported with its line and column, all as `ConfigError`s that name the file.
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


# A user's recipe or space is a few hundred nodes; aliases may repeat a block, but a file whose aliases
# expand past this many nodes is a "billion laughs" bomb, refused before anything walks the expansion.
MAX_EXPANDED_NODES = 100_000


def _children(node) -> list:
    import yaml

    if isinstance(node, yaml.MappingNode):
        return [c for pair in node.value for c in pair]
    return list(node.value) if isinstance(node, yaml.SequenceNode) else []


def _walk(node):
    """(first duplicated key or None, the node count with every alias expanded, or None for an alias
    that contains itself), in time linear in the file: an alias is the same node object, so each node
    is visited once (post-order, sizes memoised)."""
    sizes: dict[int, int] = {}
    open_: set[int] = set()  # nodes whose children are being sized
    duplicate = None
    stack = [(node, False)] if node is not None else []
    while stack:
        n, children_sized = stack.pop()
        if children_sized:
            open_.discard(id(n))
            sizes[id(n)] = min(1 + sum(sizes[id(c)] for c in _children(n)), MAX_EXPANDED_NODES + 1)
        elif id(n) in open_:
            return duplicate, None
        elif id(n) not in sizes:
            duplicate = duplicate or _duplicate_key(n)
            open_.add(id(n))
            stack.append((n, True))
            stack += [(c, False) for c in _children(n)]
    return duplicate, sizes.get(id(node), 0)


def _duplicate_key(node) -> tuple[str, int, int] | None:
    """(key, first line, repeated line) of a key given twice in a mapping node, or None."""
    import yaml

    if not isinstance(node, yaml.MappingNode):
        return None
    lines: dict[str, int] = {}
    for key, _ in node.value:
        if isinstance(key, yaml.ScalarNode):
            line = key.start_mark.line + 1
            if key.value in lines:
                return key.value, lines[key.value], line
            lines[key.value] = line
    return None


def parse(text: str, *, where: str) -> Any:
    """The YAML document in `text` (`where` names it in errors: a path)."""
    import yaml

    try:
        dup, expanded = _walk(yaml.compose(text, Loader=yaml.SafeLoader))
        if expanded is None:
            raise ConfigError("an alias (*name) refers to a block that contains it", where=where,
                              fix="write the block out without referring to itself")
        if expanded > MAX_EXPANDED_NODES:
            raise ConfigError(f"its aliases (*name) expand to more than {MAX_EXPANDED_NODES:,} values, far beyond any "
                              "recipe or space (an alias bomb?)", where=where,
                              fix="write the repeated blocks out, or use fewer nested aliases")
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
