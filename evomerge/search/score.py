"""Objective: raw per-task metrics -> the number (or numbers) Optuna optimises.

Why it exists: the evaluator reports raw lm-eval metrics per task; the search space says which metric
of which task counts, with what weight and direction. One rule lives here: a single objective is the
weighted mean of the task metrics, each signed by its direction (so it is always maximised); a
multi-objective run gets one value per task in the task's own direction (a Pareto front). A missing or
non-finite metric raises `ScoreError`, which the search records as a FAIL trial.
"""

from __future__ import annotations

import math

from evomerge.search.space import Objective


class ScoreError(ValueError):
    """The evaluation result cannot be scored (missing task or metric, NaN)."""


def find_metric(metrics: dict[str, dict[str, float]], task: str, metric: str, split: str | None = None) -> float:
    """Look up `metric` of `task`, accepting lm-eval's spellings: the task as `T` or `T_<split>`, the
    metric as `m` or `m,<filter>` (`,none` preferred)."""
    candidates = [task] + ([f"{task}_{split}"] if split else [])
    row = next((metrics[c] for c in candidates if c in metrics), None)
    if row is None:
        prefix = f"{task}_"
        found = [k for k in metrics if k.startswith(prefix)]
        if len(found) == 1:
            row = metrics[found[0]]
    if row is None:
        raise ScoreError(f"no result for task {task!r} (got {', '.join(sorted(metrics)) or 'nothing'})")
    key = metric_key(row, metric)
    if key is None:
        raise ScoreError(f"task {task!r} has no metric {metric!r} (got {', '.join(sorted(row))})")
    value = float(row[key])
    if not math.isfinite(value):
        raise ScoreError(f"{task}/{key} is {value}")
    return value


def metric_key(row: dict, metric: str) -> str | None:
    """The key under which `row` holds `metric`: `m`, else `m,none`, else the first `m,<filter>`."""
    keys = [metric, f"{metric},none"] + sorted(k for k in row if k.startswith(f"{metric},"))
    return next((k for k in keys if k in row), None)


def task_values(metrics: dict, objective: Objective, split: str | None = None) -> dict[str, float]:
    """{task: metric value} for every task of the objective (raises ScoreError)."""
    if split and objective.splits.mode == "named" and split in objective.splits.names:
        split = objective.splits.names[split]  # the role's lm-eval suffix: T_<name>
    return {t.task: find_metric(metrics, t.task, t.metric, split) for t in objective.tasks}


def task_items(items: dict[str, dict[str, list[float]]], objective: Objective,
               split: str | None = None) -> dict[str, list[float]]:
    """{task: per-item scores of its metric}, signed by direction (higher is better), for the paired
    statistics. A group task's leaves are concatenated. Raises ScoreError when a task has no items."""
    out = {}
    for t in objective.tasks:
        names = leaf_names(items, t.task, objective, split)
        values: list[float] = []
        for name in names:
            row = items[name]
            key = metric_key(row, t.metric)
            if key is not None:
                values += [float(v) if t.direction == "maximize" else -float(v) for v in row[key]]
        if not values:
            raise ScoreError(f"no per-item {t.metric!r} scores for task {t.task!r}")
        out[t.task] = values
    return out


def objective_rows(items: dict[str, dict[str, list[float]]], objective: Objective,
                   split: str | None = None) -> dict[str, list[float]]:
    """{lm-eval task name: per-item scores of the objective metric}, one task per objective task (its
    first leaf), unsigned: the item matrix the anchor choice reads."""
    out = {}
    for t in objective.tasks:
        name = leaf_names(items, t.task, objective, split)[0]
        out[name] = [float(v) for v in items[name][metric_key(items[name], t.metric)]]
    return out


def leaf_names(items: dict, task: str, objective: Objective, split: str | None = None) -> list[str]:
    """The lm-eval task names in `items` that hold objective task `task` on `split`: `T`, `T_<split>`,
    else every `T_*` (a group's leaves)."""
    if split and objective.splits.mode == "named" and split in objective.splits.names:
        split = objective.splits.names[split]
    names = [n for n in (task, f"{task}_{split}" if split else None) if n and n in items]
    return names or sorted(k for k in items if k.startswith(f"{task}_"))


def weights(objective: Objective) -> dict[str, float]:
    """The mixture weights per task (equal when they sum to zero, as in `combine`)."""
    total = sum(t.weight for t in objective.tasks)
    return {t.task: (t.weight if total > 0 else 1.0) for t in objective.tasks}


def combine(values: dict[str, float], objective: Objective) -> float:
    """Weighted mean of task values, each signed by its direction (higher is better)."""
    w = weights(objective)
    return sum(w[t.task] * (values[t.task] if t.direction == "maximize" else -values[t.task])
               for t in objective.tasks) / sum(w.values())


def score(metrics_or_result, objective: Objective, split: str | None = None) -> float | tuple[float, ...]:
    """The value(s) Optuna optimises: `combine` of the task values, or one value per task in its own
    direction when the objective is multi-objective. Accepts an EvalResult or its `metrics`."""
    values = task_values(getattr(metrics_or_result, "metrics", metrics_or_result), objective, split)
    if objective.multi_objective:
        return tuple(values[t.task] for t in objective.tasks)
    return combine(values, objective)


def mixture(metrics_or_result, objective: Objective, split: str | None = None) -> float:
    """The single weighted number even for a multi-objective run (used to pick one winner)."""
    return combine(task_values(getattr(metrics_or_result, "metrics", metrics_or_result), objective, split), objective)


def directions(objective: Objective) -> list[str]:
    """Optuna study directions for this objective."""
    if objective.multi_objective:
        return [t.direction for t in objective.tasks]
    return ["maximize"]
