"""Model references as mergekit reads them, and the local folders they point to.

Why it exists: a recipe names a model as a local folder, `org/name`, `org/name@revision`, or
`base+adapter` (a LoRA adapter applied to a base, each side any of the other forms, e.g.
`org/name@rev+org/lora`). `parse` splits the text by mergekit's rules (one `+` at most, one `@` per
side); `locate` turns it into a `Location`: the model folder, the adapter folder, and for Hub ids the
repository, revision and resolved commit (`hub.py`), so that everything after it reads folders only.

A path that exists on disk is a local folder, as in mergekit (relative to the current folder), even if
it holds `@` or `+`; otherwise text that reads as a Hub id (`name` or `org/name`) is looked up on the
Hub or in its cache; anything else is a folder that is missing. A revision on a local folder has no
effect (a warning). Commands resolve every reference first (`locate_all`), before any heavy work,
and say which commit each Hub reference resolved to.
"""

from __future__ import annotations

import os
import re
import sys
import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from evomerge.errors import CheckpointError, ConfigError, ConfigWarning
from evomerge.engine.hub import Origin, snapshot

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")


@dataclass(frozen=True)
class Reference:
    """One side of a reference: a path or Hub id, and the revision after its `@`."""

    path: str
    revision: str | None = None

    @property
    def text(self) -> str:
        return f"{self.path}@{self.revision}" if self.revision else self.path


@dataclass(frozen=True)
class Location:
    """Where a reference points: the model folder (the base's, for `base+adapter`), its Hub origin,
    and the LoRA adapter's own location."""

    reference: str  # as written
    folder: Path
    origin: Origin | None = None
    adapter: "Location | None" = None

    def origins(self) -> list[tuple[str, Origin]]:
        """(role, origin) of every Hub part: ("model", ...), ("adapter", ...)."""
        out = [("model", self.origin)] if self.origin else []
        if self.adapter is not None and self.adapter.origin is not None:
            out.append(("adapter", self.adapter.origin))
        return out


def parse(text: str, where: str) -> tuple[Reference, Reference | None]:
    """(model, adapter or None) of a reference, by mergekit's rules; a local path is taken whole."""
    if os.path.exists(local_path(text)):  # os.path: a name too long for the disk is simply not there
        return Reference(text), None
    parts = text.split("+")
    if len(parts) > 2:
        raise ConfigError(f"cannot read model reference {text!r}: more than one '+'", where=where,
                          fix="write MODEL or MODEL+LORA_ADAPTER (each may end in @REVISION)")
    sides = [_side(p, text, where) for p in parts]
    return sides[0], sides[1] if len(sides) > 1 else None


def _side(part: str, text: str, where: str) -> Reference:
    if not part:
        raise ConfigError(f"cannot read model reference {text!r}: an empty part", where=where,
                          fix="write MODEL or MODEL+LORA_ADAPTER (each may end in @REVISION)")
    if os.path.exists(local_path(part)) or part.count("@") == 0:
        return Reference(part)
    if part.count("@") > 1:
        raise ConfigError(f"cannot read model reference {text!r}: more than one '@' in {part!r}", where=where,
                          fix="write ORG/NAME@REVISION (a branch, tag or commit hash)")
    path, revision = part.split("@")
    if not path or not revision:
        raise ConfigError(f"cannot read model reference {text!r}: an empty name or revision", where=where,
                          fix="write ORG/NAME@REVISION (a branch, tag or commit hash)")
    return Reference(path, revision)


def local_path(path: str) -> Path:
    """A reference's path as a local path: as written, relative to the current folder (mergekit)."""
    return Path(os.path.expanduser(path))


def is_hub_id(path: str) -> bool:
    """Text that reads as a Hub repository id (`name` or `org/name`) and not as a local path."""
    return bool(_HUB_ID.match(path)) and ".." not in path and not path.endswith((".", "-"))


def locate(text: str, where: str, *, weights: bool = True, log: Callable[[str], None] | None = None) -> Location:
    """The folders `text` points to. `weights`: the model's weights are needed (a tokenizer source
    needs only its configs and tokenizer); `log` gets one line per Hub reference (its commit)."""
    model, adapter = parse(text, where)
    folder, origin = _folder(model, where, weights=weights, adapter=False, log=log)
    if adapter is None:
        return Location(text, folder, origin)
    afolder, aorigin = _folder(adapter, f"{where} (the adapter after '+')", weights=True, adapter=True, log=log)
    return Location(text, folder, origin, Location(adapter.text, afolder, aorigin))


def _folder(ref: Reference, where: str, *, weights: bool, adapter: bool,
            log: Callable[[str], None] | None) -> tuple[Path, Origin | None]:
    path = local_path(ref.path)
    if os.path.exists(path):
        if ref.revision:
            warnings.warn(ConfigWarning(f"{where}: revision {ref.revision!r} has no effect: {ref.path!r} is a local "
                                        "folder"), stacklevel=4)
        return path, None
    if not is_hub_id(ref.path):
        what = "adapter folder" if adapter else "model folder"
        raise CheckpointError(f"{what} {ref.path!r} not found (looked at {path.absolute()})", where=where,
                              fix="check the path (relative paths are resolved from the current folder, as in "
                                  "mergekit), or name a Hub model as ORG/NAME")
    return snapshot(ref.path, ref.revision, where=where, weights=weights, adapter=adapter, log=log)


def locate_all(models: Mapping[str, str] | Iterable[str], *, log: Callable[[str], None] | None = None,
               weights: Mapping[str, bool] | None = None) -> dict[str, Location]:
    """Every reference located, first to last (`models`: reference -> YAML field, or references);
    `weights[ref]` False for a reference that only gives a tokenizer."""
    fields = dict(models) if isinstance(models, Mapping) else {m: "models" for m in models}
    return {ref: locate(ref, at, weights=(weights or {}).get(ref, True), log=log) for ref, at in fields.items()}


def stderr_line(text: str) -> None:
    """A `log` for `locate`: one line on stderr."""
    print(f"evomerge: {text}", file=sys.stderr)


__all__ = ["Location", "Reference", "is_hub_id", "local_path", "locate", "locate_all", "parse", "stderr_line"]
