"""How a trial's search fitness is measured: every item, item-count rungs, or anchor items.

Why it exists: scoring is the search's cost (98% of a trial), and most of it is spent on candidates
that the first items already show to be weak, or on items that say the same about every candidate.
`search.fitness` picks one of three ways to spend fewer item evaluations per trial:

- `full`: every item of the seeded `limit` subset of each task, as always.
- `fidelity`: rungs of nested item sets. Rung 0 scores `fidelity.limit` items per task, each next rung
  `factor` times as many, up to `limit`; a rung scores only its new items (the prefix of a seeded order
  of the limit subset, `subsets.nested_order`), and the value after a rung is the mean over every
  item scored so far. The pruner (successive halving, Hyperband, median) may stop a trial after any
  rung but the last; the last rung's value is exactly the full-limit score (the same items).
- `anchors`: anchor points in the manner of tinyBenchmarks (Polo et al., 2024) and MERGE3 (ICML 2025).
  Before the first trial, reference models (the parents, the baseline recipes and the naive merges)
  are scored item by item on the search split; per task, the items are grouped by how the references
  answered them (one group per answer pattern, or k-means over the patterns when there are more than
  anchors), the anchors are shared out over the groups in proportion to their size and drawn at random
  within each, and each anchor weighs its group's share of the items. A trial then scores only the anchors; its fitness is the weighted mean. The anchors
  are stored in the study, so a resumed run scores the same ones. (MERGE3 also fits an IRT model to
  predict the other items; that step is not implemented.)

What each is worth is measured, not assumed: `benchmarks/fitness_cost.py` (table in benchmarks/README.md).
On the toy family, a random subset of the anchors' size found winners as good as `full` at 8x fewer
items, while `anchors` lost points and `fidelity` saved less than 2.5x; `full` stays the default.

Both estimates average per-item scores, so they need a task whose metric is a mean over its items
(accuracy, exact match): `check_tasks` refuses groups and other aggregations before the first trial.

The trial loop (`loop.py`) holds a `TrialFitness`: the jobs a trial runs (one, or one per rung) and
how their outcomes add up to the value told to Optuna; `study_anchors` chooses a study's anchors once.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable

from evomerge.errors import ConfigError, EvomergeError
from evomerge.executors.worker import TrialJob, TrialOutcome
from evomerge.search.jobs import each_outcome
from evomerge.search.space import SearchSpace

# study user attr: {"tasks": {task: {"picks": [...], "weights": [...]}}, "references": [labels],
#                   "reference_items": n, "seconds": s}
ANCHORS_ATTR = "anchors"
ITEMS_ATTR = "items"  # trial user attr: item evaluations spent on the trial (summed over its rungs)


def rungs(first: int, factor: int, limit: int) -> list[tuple[int, int]]:
    """(start, end) ranks of each rung: [0, first), [first, first*factor), ..., the last ending at `limit`."""
    out: list[tuple[int, int]] = []
    start, end = 0, first
    while end < limit:
        out.append((start, end))
        start, end = end, end * factor
    out.append((start, limit))
    return out


def describe(budget, n_tasks: int) -> str:
    """One line: how trials are scored and the items a trial spends at most."""
    limit = f"{budget.limit}" if budget.limit else "every"
    mode = budget.fitness_mode
    if mode == "fidelity":
        steps = rungs(budget.fidelity.limit, budget.fidelity.factor, budget.limit)
        return (f"fidelity: rungs of {', '.join(str(e) for _, e in steps)} items per task ({n_tasks} tasks), "
                f"pruner {budget.pruner}; a pruned trial stops after its rung")
    if mode == "anchors":
        return (f"anchors: {budget.anchor_items} items per task ({n_tasks} tasks) per trial, chosen before the "
                f"first trial from the references scored on {limit} items per task")
    return f"full: {limit} items per task ({n_tasks} tasks) per trial"


@dataclass
class ItemScores:
    """Per task and metric, the score of every item scored so far, by its position in the limit subset."""

    rows: dict[str, dict[str, dict[int, float]]] = field(default_factory=dict)

    def add(self, items: dict[str, dict[str, list[float]]], positions: dict[str, list[int]] | None) -> None:
        """Add one evaluation's per-item scores (`positions`: where each item sits; None: 0, 1, ...)."""
        for task, metrics in items.items():
            where = (positions or {}).get(task)
            for metric, values in metrics.items():
                row = self.rows.setdefault(task, {}).setdefault(metric, {})
                for k, v in enumerate(values):
                    row[where[k] if where is not None else k] = float(v)

    def means(self) -> dict[str, dict[str, float]]:
        """{task: {metric: mean over the items scored}}: what lm-eval reports for those items."""
        return {t: {m: sum(r[j] for j in sorted(r)) / len(r) for m, r in ms.items() if r} for t, ms in self.rows.items()}

    def weighted(self, plan: dict[str, dict[str, list]]) -> dict[str, dict[str, float]]:
        """{task: {metric: sum of weight * score over the task's anchors}} (the anchor estimate)."""
        out: dict[str, dict[str, float]] = {}
        for task, ms in self.rows.items():
            picks, weights = plan[task]["picks"], plan[task]["weights"]
            out[task] = {m: sum(w * r[j] for j, w in zip(picks, weights)) for m, r in ms.items()
                         if all(j in r for j in picks)}
        return out


def choose_anchors(matrix: list[list[float]], k: int, seed: int) -> tuple[list[int], list[float]]:
    """Anchor items of one task and their weights (summing to 1), from `matrix[item][reference]`, the
    references' per-item scores. Items with the same answer pattern form a group (k-means over the
    patterns into `k` groups when there are more than `k` patterns); the `k` anchors are shared out
    over the groups in proportion to their size (largest remainders; a group left without an anchor
    joins the group of the nearest pattern) and drawn at random within a group; an anchor weighs its group's share of items divided by its group's anchors."""
    import numpy as np

    x = np.asarray(matrix, dtype=float)
    n = len(x)
    if n == 0:
        raise ValueError("no items to choose anchors from")
    if k >= n:
        return list(range(n)), [1.0 / n] * n
    rng = np.random.default_rng(seed)
    patterns, groups = np.unique(x, axis=0, return_inverse=True)
    groups = groups.reshape(-1)
    if len(patterns) > k:
        import warnings

        from scipy.cluster.vq import kmeans2

        with warnings.catch_warnings():  # an empty cluster only means fewer groups
            warnings.simplefilter("ignore")
            _, labels = kmeans2(patterns, k, seed=int(seed), minit="++", missing="warn")
        groups = labels[groups]
    members = [m for m in (np.flatnonzero(groups == g) for g in np.unique(groups)) if len(m)]
    # proportional allocation (largest remainders); a group too small for an anchor of its own joins
    # the group whose answer pattern is nearest, so every item is represented by some anchor
    quota = np.array([len(m) for m in members], dtype=float) * k / n
    alloc = np.floor(quota).astype(int)
    for g in np.argsort(-(quota - alloc), kind="stable")[: k - int(alloc.sum())]:
        alloc[g] += 1
    centre = [x[m].mean(axis=0) for m in members]
    kept = [g for g in range(len(members)) if alloc[g] > 0]
    merged = {g: list(members[g]) for g in kept}
    for g in range(len(members)):
        if alloc[g] == 0:
            near = min(kept, key=lambda h: (float(((centre[g] - centre[h]) ** 2).sum()), h))
            merged[near] += list(members[g])
    members = [np.array(sorted(merged[g])) for g in kept]
    alloc = [int(alloc[g]) for g in kept]
    picks: list[int] = []
    weights: list[float] = []
    for m, a in zip(members, alloc):
        chosen = sorted(int(j) for j in rng.choice(m, size=a, replace=False))
        picks += chosen
        weights += [len(m) / (n * a)] * a
    order = sorted(range(len(picks)), key=picks.__getitem__)
    return [picks[i] for i in order], [weights[i] for i in order]


def anchor_plan(references: dict[str, dict[str, list[float]]], k: int, seed: int) -> dict[str, dict[str, list]]:
    """{task: {"picks", "weights"}} from `references[label][task]`, each reference's per-item scores of
    the task's objective metric over the whole limit subset (the same items, in the same order)."""
    labels = sorted(references)
    tasks = sorted({t for r in references.values() for t in r})
    plan = {}
    for i, task in enumerate(tasks):
        columns = [references[label][task] for label in labels]
        n = {len(c) for c in columns}
        if len(n) != 1:
            raise ValueError(f"references scored different numbers of items of task {task!r}: {sorted(n)}")
        matrix = [list(row) for row in zip(*columns)]
        picks, weights = choose_anchors(matrix, k, seed + i)
        plan[task] = {"picks": picks, "weights": weights}
    return plan


def check_tasks(evaluator: Any, objective, mode: str, src: str) -> None:
    """An item estimate (fidelity, anchors) needs each objective task to be one lm-eval task (not a
    group) whose objective metric is a mean over items."""
    if mode == "full":
        return
    if not hasattr(evaluator, "mean_metrics"):
        raise ConfigError(f"fitness: {mode} needs lm-eval's evaluator (it picks items by position)",
                          where=f"{src}: search.fitness", fix="use fitness: full with this evaluator")
    from evomerge.search.score import metric_key

    for i, (task, (name, means)) in enumerate(zip(objective.tasks, evaluator.mean_metrics("search").items())):
        if means is None:
            raise ConfigError(f"task {task.task!r} is a group: fitness: {mode} estimates one task's mean from "
                              "some of its items", where=f"{src}: objective.tasks[{i}].task",
                              fix="list the group's tasks in objective.tasks, or use fitness: full")
        key = metric_key(means, task.metric)
        if key is not None and not means[key]:
            raise ConfigError(f"metric {task.metric!r} of task {task.task!r} is not aggregated as a mean over items",
                              where=f"{src}: objective.tasks[{i}].metric",
                              fix="use fitness: full for this metric (an item subset cannot estimate it)")


class TrialFitness:
    """What a trial's jobs are and how their outcomes become its fitness (the trial loop holds one)."""

    def __init__(self, space: SearchSpace, study, executor, log: Callable):
        self.space, self.mode = space, space.budget.fitness_mode
        b = space.budget
        self.rungs = rungs(b.fidelity.limit, b.fidelity.factor, b.limit) if self.mode == "fidelity" else None
        self.plan = study_anchors(study, space, executor, log) if self.mode == "anchors" else None
        self.scores: dict[int, Any] = {}  # trial number -> ItemScores (fidelity, anchors)

    def job(self, number: int, recipe: dict, rung: int) -> TrialJob:
        b = self.space.budget
        if self.mode == "full":
            return TrialJob(number, recipe, "search", b.limit, b.seed, tag="full")
        if self.mode == "fidelity":
            return TrialJob(number, recipe, "search", b.limit, b.seed, tag=f"rung:{rung}", per_item=True,
                            ranks=self.rungs[rung])
        picks = {t: tuple(p["picks"]) for t, p in self.plan["tasks"].items()}
        return TrialJob(number, recipe, "search", b.limit, b.seed, tag="anchors", per_item=True, picks=picks)

    def metrics(self, number: int, outcome: TrialOutcome) -> dict:
        """The metrics the trial is scored on after this outcome (raises ValueError without items)."""
        if self.mode == "full":
            return outcome.metrics
        if not outcome.items:
            raise ValueError("the evaluator returned no per-item scores")
        acc = self.scores.setdefault(number, ItemScores())
        acc.add(outcome.items, outcome.positions)
        return acc.means() if self.mode == "fidelity" else acc.weighted(self.plan["tasks"])

    def last(self, tag: str) -> bool:
        return not tag.startswith("rung:") or int(tag.split(":")[1]) == len(self.rungs) - 1

    def forget(self, number: int) -> None:
        self.scores.pop(number, None)


def study_anchors(study, space: SearchSpace, executor, log: Callable) -> dict:
    """The anchor items of this study (`fitness: anchors`): chosen on first use from the per-item
    search-split scores of the references (parents, baseline recipes, naive merges) and stored in the
    study, so that a resumed run scores the same items."""
    from evomerge.search.score import objective_rows
    from evomerge.search.suggest import reference_recipes

    stored = study.user_attrs.get(ANCHORS_ATTR)
    if stored is not None:
        return stored
    b = space.budget
    refs = reference_recipes(space)
    t0 = time.perf_counter()
    jobs = [TrialJob(i, recipe, "search", b.limit, b.seed, tag="reference", per_item=True)
            for i, (_, recipe) in enumerate(refs)]
    references, items = {}, 0
    for outcome in each_outcome(executor, jobs):
        label = refs[outcome.number][0]
        if not outcome.ok or not outcome.items:
            raise EvomergeError(f"the anchor reference {label} could not be scored: "
                                f"{(outcome.error or 'no per-item scores').splitlines()[0]}",
                                where="search.fitness: anchors", fix="check the models and tasks, or use fitness: full")
        references[label] = objective_rows(outcome.items, space.objective, "search")
        items += sum((outcome.samples or {}).values())
    plan = {"tasks": anchor_plan(references, b.anchor_items, b.seed), "references": [r[0] for r in refs],
            "reference_items": items, "seconds": round(time.perf_counter() - t0, 3)}
    study.set_user_attr(ANCHORS_ATTR, plan)
    n = sum(len(p["picks"]) for p in plan["tasks"].values())
    log(f"evomerge: fitness from {n} anchor items ({b.anchor_items} per task), chosen from {len(refs)} references "
        f"scored on {items} items")
    return plan
