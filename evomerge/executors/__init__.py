"""Where trials run: the `Executor` protocol and `make_executor(...)`, which picks one.

What it holds: `worker.py` (`Worker`, a plain class holding the sources and a resident model; merges a
recipe into it and scores it; imports no Ray), `local.py` (in this process) and `ray_pool.py` (Ray
actors wrapping `Worker`). Ray is imported in `ray_pool.py` and nowhere else.

What it may import: `evomerge.errors`, `engine`, `evaluation` and `moe`; nothing from `search` or
`toy` (tests/test_architecture.py). Public API: `make_executor`, `Executor`, and
`from evomerge.executors.worker import Worker, WorkerSpec, TrialJob, TrialOutcome`.

Why a protocol: the search loop (`search/loop.py`) does asynchronous ask/tell and must not care whether a
candidate is merged and scored in this process or on a Ray actor on another node. It only needs to
know how many jobs may be in flight (`slots`), to `submit` one, to `wait` for finished ones, and to
`close`. Executors never raise for a failed trial: a failure is a `TrialOutcome` with `error` set.

Contract (ARCHITECTURE.md, keep stable):
- `slots: int` - how many jobs may be in flight at once.
- `submit(job: TrialJob) -> None` - must only be called while fewer than `slots` jobs are in flight.
- `wait(timeout: float | None = None) -> list[TrialOutcome]` - finished outcomes, at least one unless
  the timeout passed or nothing is in flight.
- `close() -> None` - release workers; idempotent.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol, runtime_checkable

if TYPE_CHECKING:
    from evomerge.executors.worker import TrialJob, TrialOutcome, WorkerSpec


@runtime_checkable
class Executor(Protocol):
    slots: int

    def submit(self, job: "TrialJob") -> None: ...

    def wait(self, timeout: float | None = None) -> "list[TrialOutcome]": ...

    def close(self) -> None: ...


def make_executor(
    spec: "WorkerSpec",
    workers: int = 1,
    ray_address: str | None = None,
    timeout: float | None = None,
    *,
    threads_per_worker: int | None = None,
    **options,
) -> Executor:
    """In-process executor for one local worker; a Ray actor pool otherwise (imported lazily).

    timeout: seconds one trial may take before it counts as failed (None: no limit).
    threads_per_worker: torch threads per worker process; overrides `spec.threads` when given.
    options: passed through to `RayExecutor` (e.g. `resources`); `worker`: an already set-up `Worker`
      the in-process executor adopts (the search's pre-flight built one).
    """
    from dataclasses import replace

    from evomerge.errors import ConfigError

    if workers < 1:
        raise ConfigError(
            f"--workers must be at least 1, got {workers}", where="--workers", fix="use --workers 1 or more"
        )
    if threads_per_worker is not None:
        spec = replace(spec, threads=threads_per_worker)
    if workers == 1 and not ray_address:
        from evomerge.executors.local import InProcessExecutor

        return InProcessExecutor(spec, timeout=timeout, worker=options.get("worker"))
    try:
        from evomerge.executors.ray_pool import RayExecutor
    except ImportError as exc:  # ray missing, or the Ray executor not available in this install
        raise ConfigError(
            f"parallel workers need the Ray executor, which failed to import ({exc})",
            where="--workers/--ray-address",
            fix="install ray (pip install 'ray[default]') or run with --workers 1",
        ) from exc
    return RayExecutor(spec, workers, ray_address, timeout=timeout, **options)
