"""Candidates: recipes scored outside the optimisation, and the scorer that scores them on a whole split.

Why it exists: after the trial loop, the top-k trials and the baselines are re-scored on the `select`
split, the winner, the parents, the baselines and the naive merges on `report`, and the naive task
arithmetic grid on `search`. Each is a `Candidate`; a `Scorer` runs them through the executor (the
same progress display as the trials), turns each outcome into a cached score entry, and records it on
the candidate. `selection.py` and `naive.py` use them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from evomerge.executors.worker import TrialJob, TrialOutcome
from evomerge.search.jobs import each_outcome, short
from evomerge.search.progress import Progress
from evomerge.search.space import SearchSpace


@dataclass
class Candidate:
    """A recipe scored outside the optimisation: a trial, a baseline or a parent model."""

    label: str  # "trial 12", "baseline:slerp", "parent:add"
    trial: int | None
    recipe: Any  # MergeRecipe
    scores: dict[str, dict] = field(default_factory=dict)  # split -> {"score": x, "tasks": {...}}


class Scorer:
    """Scores candidates on a whole split through the executor (the search split under its limit)."""

    def __init__(self, space: SearchSpace, executor, log: Callable = print, progress: bool = False):
        self.space, self.executor, self.log, self.progress = space, executor, log, progress

    def score(self, candidates: list[Candidate], split: str, cache: dict, key: Callable[[Candidate], Any], *,
              tag: str | None = None, per_item: bool | None = None, desc: str | None = None) -> None:
        """Score the candidates not already in `cache` (by `key`) on `split`, store each entry in the
        cache, and set every candidate's `scores[split]` from it."""
        if per_item is None:
            per_item = split == "report"  # the report's intervals and paired tests need every item's score
        pending = [c for c in candidates if key(c) not in cache]
        if pending:
            self.log(f"evomerge: scoring {len(pending)} candidate(s) on the {split!r} split")
        bar = Progress(self.progress and bool(pending), len(pending), 0, desc=desc or split, unit="candidate")
        b = self.space.budget
        limit = b.limit if split == "search" else None
        jobs = [TrialJob(i, c.recipe.to_dict(), split, limit, b.seed, tag=tag or split, per_item=per_item)
                for i, c in enumerate(pending)]
        best = None
        try:
            for outcome in each_outcome(self.executor, jobs):
                cand = pending[outcome.number]
                entry = self._entry(outcome, split, per_item)
                if entry["score"] is None:
                    self.log(f"evomerge: {cand.label} could not be scored on {split}: "
                             f"{entry['error'].splitlines()[0]}")
                elif best is None or entry["score"] > best:
                    best = entry["score"]
                cache[key(cand)] = entry
                bar.update(best, 0)
        finally:
            bar.close()
        for cand in candidates:
            cand.scores[split] = cache[key(cand)]

    def _entry(self, outcome: TrialOutcome, split: str, per_item: bool) -> dict[str, Any]:
        """{"score", "tasks"} (and per item: "items", "truncated"), or {"score": None, "error"}."""
        from evomerge.search.score import ScoreError, mixture, task_items, task_values

        if not outcome.ok:
            return {"score": None, "error": short(outcome.error or "failed", 500)}
        obj = self.space.objective
        try:
            entry = {"score": mixture(outcome.metrics, obj, split), "tasks": task_values(outcome.metrics, obj, split)}
            if per_item and outcome.items:
                entry["items"] = task_items(outcome.items, obj, split)
            if per_item and outcome.truncated is not None:
                entry["truncated"] = outcome.truncated
        except ScoreError as exc:
            entry = {"score": None, "error": str(exc)}
        return entry
