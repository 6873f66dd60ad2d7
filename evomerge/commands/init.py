"""`evomerge init MODEL... --tasks TASK...`: write a commented starter search space for these models.

Why it exists: the shortest way from "I have these models" to a running search. The flags are checked
here (two models at least, tasks given, the output not overwritten unless asked); model folders given
within the current folder are written relative to the space file (a space's paths start there; the
project moves as one), others as absolute paths, and Hub ids as they are; `search/starter.py` writes the text. Nothing is loaded or downloaded:
`evomerge validate` on the written file does every check. cli.py dispatches here.
"""

from __future__ import annotations

import argparse
import os
import re
from pathlib import Path

from evomerge.errors import ConfigError


def run(args: argparse.Namespace) -> int:
    """Write the starter space and say how to go on."""
    from evomerge.search.report import atomic_write
    from evomerge.search.starter import Starter, starter_text

    out = Path(args.out)
    _check(args, out)
    folder = out.absolute().parent
    models = tuple(_relative(m, folder) for m in args.models if m != args.base)
    base = _relative(args.base, folder) if args.base else None
    tasks_dir = _relative(args.tasks_dir, folder) if args.tasks_dir else None
    name = args.name or re.sub(r"[^A-Za-z0-9_-]+", "_", out.stem if out.stem != "space" else "search")
    text = starter_text(Starter(models=models, tasks=tuple(args.tasks), base=base, tasks_dir=tasks_dir, name=name,
                                trials=args.trials, file=str(out)))
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write(out, text)
    kind = "a slerp gradient" if "method: slerp" in text else "task arithmetic (TIES/DARE as commented alternatives)"
    print(f"wrote {out}: {kind} over {len(models) + bool(base)} models, objective {', '.join(args.tasks)}\n"
          f"next: evomerge validate {out}   then   evomerge search {out}")
    return 0


def _check(args: argparse.Namespace, out: Path) -> None:
    if len(args.models) + (1 if args.base and args.base not in args.models else 0) < 2:
        raise ConfigError("a merge needs at least two models", where="MODEL",
                          fix="name two models (a slerp between them), or a base and experts: "
                              "evomerge init BASE EXPERT1 EXPERT2 --tasks ...")
    if len(set(args.models)) != len(args.models):
        raise ConfigError("a model is named twice", where="MODEL", fix="name each model once")
    if out.exists() and not args.overwrite:
        raise ConfigError(f"{out} exists", where="--out", fix="choose another file with --out, or pass --overwrite")
    if args.tasks_dir and not Path(args.tasks_dir).is_dir():
        raise ConfigError(f"task folder {args.tasks_dir!r} not found", where="--tasks-dir",
                          fix="give the folder of your lm-eval task YAML files")
    if args.name is not None and not re.match(r"^[A-Za-z0-9_-]+$", args.name):
        raise ConfigError(f"--name {args.name!r} may only hold letters, digits, '_' and '-'", where="--name",
                          fix="it names the run folder: e.g. --name my_merge")
    if args.trials is not None and args.trials < 1:
        raise ConfigError("--trials must be at least 1", where="--trials", fix="omit it (30 or 60) or give a count")


def _relative(reference: str, folder: Path) -> str:
    """A model folder or task folder as the space file in `folder` names it; Hub ids unchanged."""
    path = Path(reference).expanduser()
    if not path.exists():
        return reference  # a Hub id (or a typo that `evomerge validate` reports with its field)
    path, here = path.absolute(), Path.cwd()
    inside = path.is_relative_to(here) and folder.is_relative_to(here)  # the user's project moves as one
    return Path(os.path.relpath(path, folder)).as_posix() if inside else path.as_posix()
