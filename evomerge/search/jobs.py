"""Jobs on workers: the worker a space needs, and batches of jobs through an executor.

Why it exists: the trial loop, the anchor references, the select/report scoring and the membership
audit all hand `TrialJob`s to the same `Executor`. `worker_spec` is the picklable description of a
worker for a space (the pre-flight builds one, the executors many); `each_outcome` runs a batch
without exceeding the executor's slots; `short` trims an error to what a study stores.
"""

from __future__ import annotations

from evomerge.errors import EvomergeError
from evomerge.executors.worker import TrialJob, WorkerSpec
from evomerge.search.space import SearchSpace


def worker_spec(space: SearchSpace, *, threads: int | None = None, evaluator: str | None = None,
                trust_remote_code: bool = False, verbose: bool = False, device: str = "cpu") -> WorkerSpec:
    """The picklable description of a worker for this space."""
    paths = [m.path for m in space.models]
    if space.base is not None and space.base.path not in paths:
        paths.append(space.base.path)
    template = space.base.path if space.base is not None else space.models[0].path
    obj = space.objective
    return WorkerSpec(
        sources=tuple(paths),
        base=template,
        dtype=space.score_dtype,
        tokenizer=space.tokenizer or template,
        tasks=tuple(t.task for t in obj.tasks),
        include_path=obj.tasks_dir,
        device=device,
        threads=threads,
        batch_size=obj.protocol.batch_size,
        evaluator=evaluator,
        splits=obj.splits.model_dump(mode="json"),
        protocol=obj.protocol.model_dump(mode="json"),
        trust_remote_code=trust_remote_code,
        verbose=verbose,
    )


def each_outcome(executor, jobs: list[TrialJob]):
    """Run `jobs` (numbered 0..n-1) through the executor, never more than its slots at once; yield each
    outcome as it finishes."""
    queue, inflight = list(jobs), set()
    while queue or inflight:
        while queue and len(inflight) < executor.slots:
            job = queue.pop(0)
            executor.submit(job)
            inflight.add(job.number)
        if not inflight:
            raise EvomergeError("no worker is left to run the remaining jobs (all were retired after failures)",
                                where="executor", fix="check the worker logs; rerun to resume")
        for outcome in executor.wait(None):
            if outcome.number in inflight:
                inflight.discard(outcome.number)
                yield outcome


class CountingExecutor:
    """An executor that counts the jobs handed to it (`submitted`): whether an invocation did any work."""

    def __init__(self, inner):
        self.inner = inner
        self.submitted = 0

    @property
    def slots(self) -> int:
        return self.inner.slots

    def submit(self, job: TrialJob) -> None:
        self.submitted += 1
        self.inner.submit(job)

    def wait(self, timeout=None):
        return self.inner.wait(timeout)

    def close(self) -> None:
        self.inner.close()


def short(error: str, limit: int = 2000) -> str:
    """`error`, cut to `limit` characters (a trial's fail reason, a candidate's error)."""
    return error if len(error) <= limit else error[: limit - 3] + "..."
