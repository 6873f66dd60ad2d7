"""Which items of a split one evaluation scores: a seeded limit subset, and the part of it a call takes.

Why it exists: trials are compared on the same items, so a `limit` is a seeded random subset of a
split (never the first N); item-count rungs (`fitness: fidelity`) take prefixes of a seeded order of
that subset, and anchors (`fitness: anchors`) take listed positions. `evaluate.LMEvalEvaluator`
applies them per task on every call.
"""

from __future__ import annotations

import random

from evomerge.errors import ConfigError


def subset(size: int, limit: int | None, seed: int, task: str) -> list[int] | None:
    """Seeded random indices (sorted) of `limit` items out of `size`; None means all of them."""
    if limit is None or limit >= size:
        return None
    if limit <= 0:
        raise ConfigError(f"limit must be positive, got {limit}", where="evaluate", fix="use limit >= 1 or None")
    rng = random.Random(f"{seed}/{task}")
    return sorted(rng.sample(range(size), limit))


def nested_order(size: int, seed: int, task: str) -> list[int]:
    """A seeded order of the `size` items of a limit subset (positions 0..size-1): fidelity rungs take
    its prefixes, so each rung holds the items of the one before and the last is the whole subset."""
    order = list(range(size))
    random.Random(f"{seed}/{task}/rungs").shuffle(order)
    return order


def chosen_positions(size: int, task: str, seed: int, ranks: tuple[int, int | None] | None,
                     picks: dict[str, list[int]] | None) -> list[int] | None:
    """Which positions of a task's limit subset (of `size` items) to score: `ranks` (a, b) takes
    `nested_order(...)[a:b]`, `picks` the listed positions; None (neither): all of them."""
    if ranks is not None:
        a, b = ranks
        return sorted(nested_order(size, seed, task)[a:b])
    if picks is not None:
        if task not in picks:
            raise ConfigError(f"no items picked for task {task!r}", where="evaluate", fix="pick items of every task")
        bad = [j for j in picks[task] if not 0 <= int(j) < size]
        if bad:
            raise ConfigError(f"picked item {bad[0]} of task {task!r} is outside its {size} items",
                              where="evaluate", fix="pick positions of the limit subset")
        return sorted({int(j) for j in picks[task]})
    return None
