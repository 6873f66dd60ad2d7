"""`evomerge search SPACE [flags]`: the flags checked, turned into run options, the run, its summary.

Why it exists: the search room (`evomerge.search`) takes a space and `RunOptions`; turning argparse's
namespace into them, and refusing flags that cannot work (a worker count below 1, a storage URL whose
database driver is missing) before anything is written, is the command line's job. cli.py dispatches
here.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from evomerge.errors import ConfigError


def run(args: argparse.Namespace) -> int:
    """Load the space, apply the flag overrides, check the flags, run, print the summary."""
    from evomerge.search.report import summary
    from evomerge.search.run import run_search
    from evomerge.search.spacefile import load_space

    space = load_space(args.space)
    flags = {k: getattr(args, k, None) for k in ("trials", "sampler", "seed", "pruner", "top_k", "limit", "batch")}
    space = space.with_overrides(**flags)
    out = Path(args.out) if getattr(args, "out", None) else Path("runs") / space.name
    check_flags(args)
    result = run_search(space, out, **run_options(args))
    print(summary(result))
    return 0


def check_flags(args: argparse.Namespace) -> None:
    """--workers, --trial-timeout and --threads-per-worker are in range; --storage can be opened."""
    if args.workers is not None and args.workers < 1:
        raise ConfigError("--workers must be at least 1", where="--workers", fix="use --workers 1 or more")
    if args.trial_timeout is not None and args.trial_timeout <= 0:
        raise ConfigError(f"--trial-timeout must be a positive number of seconds, got {args.trial_timeout:g}",
                          where="--trial-timeout", fix="omit it (no limit) or give e.g. --trial-timeout 600")
    if args.threads_per_worker is not None and args.threads_per_worker < 1:
        raise ConfigError(f"--threads-per-worker must be at least 1, got {args.threads_per_worker}",
                          where="--threads-per-worker", fix="omit it, or give 1 or more")
    if args.storage:
        check_storage_url(args.storage)


def run_options(args: argparse.Namespace) -> dict:
    """The `RunOptions` fields the flags set, as keywords of `run_search`."""
    return dict(
        storage=args.storage,
        workers=args.workers or 1,
        ray_address=args.ray_address,
        trial_timeout=args.trial_timeout,
        threads_per_worker=args.threads_per_worker,
        evaluator=getattr(args, "evaluator", None),
        progress=not args.no_progress,
        reopen_report=getattr(args, "reopen_report", False),
        trust_remote_code=getattr(args, "trust_remote_code", False),
        verbose=getattr(args, "verbose", False),
        allow_overlap=getattr(args, "allow_overlap", False),
        allow_public_benchmark=getattr(args, "allow_public_benchmark_contamination", False),
        evidence=not getattr(args, "no_evidence", False),
        device=getattr(args, "device", None) or "cpu",
    )


def check_storage_url(url: str) -> None:
    """A --storage URL that SQLAlchemy can open (its dialect is installed), before anything is written."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError, NoSuchModuleError

    fix = ("omit --storage (sqlite in the run folder), or give e.g. sqlite:///runs/x/study.db or "
           "postgresql://user@host/db with its driver installed")
    try:
        parsed = make_url(url)
        parsed.get_dialect().import_dbapi()  # the driver too (postgresql needs psycopg2, ...)
    except (ArgumentError, NoSuchModuleError, ValueError, ImportError) as exc:
        raise ConfigError(f"not a usable database URL ({str(exc).splitlines()[0]})", where=f"--storage {url}",
                          fix=fix) from None
    if parsed.get_backend_name() == "sqlite" and parsed.database not in (None, "", ":memory:"):
        from evomerge.engine.output import check_creatable

        check_creatable(Path(parsed.database).parent, f"--storage {url}", fix)
