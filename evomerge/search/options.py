"""How one search runs: where its trials run, what it writes, and what its pre-flight may accept.

Why it exists: `run.run_search` and `preflight.preflight` share a dozen settings that are not part of
the search space (the space says what is searched; these say how this run goes: workers, Ray, device,
timeouts, writing the run folder, the evidence, permissions). One frozen object carries them; the CLI
(`evomerge.commands.search`) builds it from the flags, scripts pass the fields as keywords.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class RunOptions:
    """Settings of one search run; every field has the default of `evomerge search` without flags."""

    storage: str | None = None  # Optuna storage URL (default: sqlite:///OUT/study.db)
    workers: int = 1  # parallel workers (more than 1 uses Ray)
    ray_address: str | None = None  # join this Ray cluster instead of running in-process
    trial_timeout: float | None = None  # seconds a trial may take before it counts as failed
    threads_per_worker: int | None = None  # torch threads per worker
    evaluator: str | None = None  # "module:callable" plugged into the worker instead of lm-eval
    progress: bool = True  # the progress bar
    select: bool = True  # select on `select`, score on `report` after the trials
    write: bool = True  # write best.yaml, trials.csv, report.md, plots
    reopen_report: bool = False  # allow more trials after the report split was evaluated
    trust_remote_code: bool = False  # accept sources with their own code (config auto_map)
    verbose: bool = False  # let transformers, datasets and lm-eval show their own bars and warnings
    allow_overlap: bool = False  # search although the overlap audit found shared items
    allow_public_benchmark: bool = False  # search on a public benchmark's test set
    evidence: bool = True  # intervals, paired tests, naive merges, overlap and parent audits
    device: str = "cpu"  # where trials merge and score: cpu, cuda, cuda:N or auto

    @property
    def in_process(self) -> bool:
        """Trials run in this process (no Ray)."""
        return self.workers == 1 and not self.ray_address
