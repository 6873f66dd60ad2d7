"""Honest statistics for scores on a task mixture: intervals, paired tests, and membership AUROC.

Why it exists: a merge's "+3 points" means nothing without its uncertainty, and two models scored on
the same items must be compared item by item (paired), not by their two intervals. Everything here
takes per-item scores per task (what `LMEvalEvaluator.evaluate(..., per_item=True)` returns) and the
mixture weights, and uses scipy:

- `mixture_ci`: the weighted mixture of task means with a stratified bootstrap 95% interval
  (`scipy.stats.bootstrap` resamples the items of each task independently; the weights are kept).
- `paired`: the mixture difference of two models on the same items, its paired bootstrap interval and
  two-sided p-value, and, when every score is 0/1 (accuracy, exact match), McNemar's exact test on the
  discordant items (`scipy.stats.binomtest`).
- `auroc`: the area under the ROC curve of a score that should separate two groups
  (`scipy.stats.mannwhitneyu`'s U / (n1 * n2)), for the membership audit.

Seeds are fixed, so a report is reproducible to the digit.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

BOOTSTRAP_RESAMPLES = 2000
SEED = 0


@dataclass(frozen=True)
class Interval:
    point: float
    low: float
    high: float

    def as_dict(self) -> dict:
        return {"point": self.point, "low": self.low, "high": self.high}


@dataclass(frozen=True)
class Paired:
    """a - b on the same items."""

    delta: Interval
    p_bootstrap: float
    p_mcnemar: float | None  # None unless every score is 0 or 1
    wins: int  # items a gets right and b wrong (binary scores), else items where a > b
    losses: int

    def as_dict(self) -> dict:
        return {"delta": self.delta.as_dict(), "p_bootstrap": self.p_bootstrap, "p_mcnemar": self.p_mcnemar,
                "wins": self.wins, "losses": self.losses}


def _arrays(items: Mapping[str, Sequence[float]], weights: Mapping[str, float]):
    import numpy as np

    tasks = [t for t in weights if weights[t] > 0]
    missing = [t for t in tasks if t not in items or len(items[t]) == 0]
    if missing:
        raise ValueError(f"no item scores for task(s) {', '.join(missing)}")
    w = np.asarray([weights[t] for t in tasks], dtype=float)
    return tasks, [np.asarray(items[t], dtype=float) for t in tasks], w / w.sum()


def mixture(items: Mapping[str, Sequence[float]], weights: Mapping[str, float]) -> float:
    tasks, data, w = _arrays(items, weights)
    return float(sum(wi * d.mean() for wi, d in zip(w, data)))


def _bootstrap(data: list, w, seed: int):
    """scipy's bootstrap of the weighted mixture of means, each task resampled on its own."""
    import numpy as np
    from scipy.stats import bootstrap

    def statistic(*samples, axis=-1):
        return sum(wi * np.mean(s, axis=axis) for wi, s in zip(w, samples))

    if all(len(d) < 2 for d in data) or all(np.all(d == d[0]) for d in data):  # no spread: a point
        value = float(statistic(*data))
        return value, value, np.full(1, value)
    res = bootstrap(tuple(data), statistic, n_resamples=BOOTSTRAP_RESAMPLES, confidence_level=0.95,
                    method="percentile", vectorized=True, paired=False, random_state=np.random.default_rng(seed))
    return float(res.confidence_interval.low), float(res.confidence_interval.high), res.bootstrap_distribution


def mixture_ci(items: Mapping[str, Sequence[float]], weights: Mapping[str, float], *, seed: int = SEED) -> Interval:
    """The mixture score with its stratified bootstrap 95% interval."""
    tasks, data, w = _arrays(items, weights)
    low, high, _ = _bootstrap(data, w, seed)
    return Interval(mixture(items, weights), low, high)


def paired(a: Mapping[str, Sequence[float]], b: Mapping[str, Sequence[float]], weights: Mapping[str, float], *,
           seed: int = SEED) -> Paired:
    """a - b on the same items: paired bootstrap interval and p-value, and McNemar for 0/1 scores."""
    import numpy as np
    from scipy.stats import binomtest

    tasks, xa, w = _arrays(a, weights)
    _, xb, _ = _arrays(b, weights)
    for t, u, v in zip(tasks, xa, xb):
        if len(u) != len(v):
            raise ValueError(f"task {t}: {len(u)} and {len(v)} items; a paired test needs the same items")
    diffs = [u - v for u, v in zip(xa, xb)]
    point = float(sum(wi * d.mean() for wi, d in zip(w, diffs)))
    low, high, dist = _bootstrap(diffs, w, seed)
    dist = np.asarray(dist)
    p_boot = float(min(1.0, 2 * min((dist <= 0).mean(), (dist >= 0).mean()))) if dist.size > 1 else \
        (1.0 if point == 0 else 0.0)
    flat_a, flat_b = np.concatenate(xa), np.concatenate(xb)
    wins, losses = int((flat_a > flat_b).sum()), int((flat_a < flat_b).sum())
    p_mc = None
    if np.isin(flat_a, (0.0, 1.0)).all() and np.isin(flat_b, (0.0, 1.0)).all():
        p_mc = 1.0 if wins + losses == 0 else float(binomtest(wins, wins + losses, 0.5).pvalue)
    return Paired(Interval(point, low, high), p_boot, p_mc, wins, losses)


def auroc(members: Sequence[float], others: Sequence[float]) -> float:
    """P(a member's score > another's score), ties counted half (Mann-Whitney U / (n1 n2))."""
    from scipy.stats import mannwhitneyu

    if not len(members) or not len(others):
        raise ValueError("auroc needs scores in both groups")
    u = mannwhitneyu(members, others, alternative="two-sided").statistic
    return float(u) / (len(members) * len(others))


__all__ = ["Interval", "Paired", "mixture", "mixture_ci", "paired", "auroc", "BOOTSTRAP_RESAMPLES"]
