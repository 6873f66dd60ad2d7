"""Run trials one at a time in this process: the default executor, no set-up, no Ray.

Why: on a laptop or a 2-core machine a single resident model is the fastest option (no process
start, no serialisation). The worker (sources + model + evaluator) is built on the first job and reused.
A trial cannot be pre-empted in-process; one that ran longer than `timeout` is reported as failed.
"""

from __future__ import annotations

from collections import deque

from evomerge.executors.worker import TrialJob, TrialOutcome, Worker, WorkerSpec


class InProcessExecutor:
    """`Executor` with one slot; `wait` runs the oldest submitted job synchronously."""

    slots = 1

    def __init__(self, spec: WorkerSpec | None = None, *, timeout: float | None = None, worker=None):
        if worker is None and spec is None:
            raise ValueError("InProcessExecutor needs a WorkerSpec or a worker")
        self.spec = spec
        self.timeout = timeout
        self.worker = worker if worker is not None else Worker(spec)
        self._queue: deque[TrialJob] = deque()

    def submit(self, job: TrialJob) -> None:
        self._queue.append(job)

    def wait(self, timeout: float | None = None) -> list[TrialOutcome]:
        if not self._queue:
            return []
        job = self._queue.popleft()
        outcome = self.worker.run(job)
        total = outcome.timings.get("total", 0.0) - outcome.timings.get("setup", 0.0)
        if self.timeout is not None and outcome.error is None and total > self.timeout:
            from dataclasses import replace

            outcome = replace(
                outcome,
                metrics=None,
                error=f"timeout: trial took {total:.1f} s, more than --trial-timeout {self.timeout:g} s",
            )
        return [outcome]

    def close(self) -> None:
        self._queue.clear()
