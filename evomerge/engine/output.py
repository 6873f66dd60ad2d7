"""The output folder of a build: checked before work starts, filled in a hidden temp folder, renamed.

Why it exists: `evomerge merge` and `evomerge moe` both write a model folder, and both must never leave
a half-written one behind, never write into a source model, and refuse a non-empty folder unless
told. `staged(out)` gives a temp folder next to OUT (same filesystem, so the final rename is atomic)
that becomes OUT when the block succeeds and vanishes when it fails; `atomic_write` does the same for
one file. `copy_side_files` copies what
a model folder needs besides weights and config: generation config and tokenizer files.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

from evomerge.errors import OutputError

if TYPE_CHECKING:  # pragma: no cover
    from evomerge.engine.checkpoints import Sources

TOKENIZER_FILES = (
    "tokenizer_config.json", "special_tokens_map.json", "tokenizer.json", "tokenizer.model",
    "added_tokens.json", "merges.txt", "vocab.json", "chat_template.jinja", "chat_template.json",
)


def check_creatable(folder: Path, where: str, fix: str = "choose another location") -> None:
    """`folder` exists as a folder or can be made: its nearest existing ancestor is a writable folder,
    not a file. Checked before any work, so that nothing is scored or merged into a path that fails."""
    folder = Path(folder).expanduser().absolute()
    existing = next(p for p in (folder, *folder.parents) if p.exists() or p == p.parent)
    if not existing.is_dir():
        raise OutputError(f"{folder} cannot be made: {existing} is a file", where=where, fix=fix)
    if not os.access(existing, os.W_OK | os.X_OK):
        raise OutputError(f"{folder} cannot be made: {existing} is not writable", where=where, fix=fix)


def check_out(out: Path, overwrite: bool, sources: "Sources | None" = None) -> None:
    """OUT may be written: not a file, not below one, empty unless `overwrite`, and apart from every
    source folder."""
    check_creatable(out, str(out), "choose another output folder")
    if out.exists():
        if not out.is_dir():
            raise OutputError(f"{out} exists and is a file", where=str(out), fix="choose another output folder")
        if any(out.iterdir()) and not overwrite:
            raise OutputError(f"{out} exists and is not empty", where=str(out),
                              fix="choose a new folder, or pass --overwrite to replace it")
    if sources is not None:
        real = out.resolve()
        for m in sources.models:
            sp = sources.path(m).resolve()
            if real == sp or sp.is_relative_to(real) or real.is_relative_to(sp):
                raise OutputError(f"the output folder overlaps the source model {m!r}", where=str(out),
                                  fix="write the result to a separate folder")


@contextlib.contextmanager
def staged(out: Path) -> Iterator[Path]:
    """A fresh temp folder beside `out`; renamed to `out` (replacing it) when the block succeeds,
    removed when it raises."""
    parent = out.absolute().parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"cannot create {parent} ({exc.strerror})", where=str(out),
                          fix="choose a writable output location") from None
    tmp = parent / f".{out.name}.evomerge-tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    try:
        tmp.mkdir()
    except OSError as exc:
        raise OutputError(f"cannot write in {parent} ({exc.strerror})", where=str(out),
                          fix="choose a writable output location") from None
    try:
        yield tmp
        _move_into_place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def copy_side_files(folder: Path, *, config_from: Path, tokenizer_from: Path | None) -> None:
    """The generation config of `config_from` and the tokenizer files of `tokenizer_from` (if given)."""
    if (config_from / "generation_config.json").is_file():
        shutil.copyfile(config_from / "generation_config.json", folder / "generation_config.json")
    for name in TOKENIZER_FILES if tokenizer_from is not None else ():
        if (tokenizer_from / name).is_file():
            shutil.copyfile(tokenizer_from / name, folder / name)


def atomic_write(path: Path, data: str | bytes) -> None:
    """Write `data` to `path` through a temp file in the same folder and a rename."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data.encode("utf-8") if isinstance(data, str) else data)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def human_bytes(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n}"


def _move_into_place(tmp: Path, out: Path) -> None:
    if out.exists():
        trash = out.absolute().parent / f".{out.name}.evomerge-old-{os.getpid()}"
        os.replace(out, trash)
        os.replace(tmp, out)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(tmp, out)


__all__ = ["TOKENIZER_FILES", "check_creatable", "check_out", "staged", "copy_side_files", "human_bytes"]
