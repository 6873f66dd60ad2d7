"""A commented starter `space.yaml` for the models a user has: what `evomerge init` writes.

Why it exists: going from "I have these models and these tasks" to a running search should not need
docs/search.md. The starter is a complete, valid space with its choices explained in comments:
- two models: SLERP between them, with `t` a 3-point gradient over the layers, separately for the
  attention and the MLP tensors (the LazyMergekit recipe, searched instead of hand-set);
- a base and experts: task arithmetic (each expert's weight and the scale `lambda` searched), with
  TIES and DARE-TIES densities written out as commented alternatives;
- the objective: the named tasks, equally weighted, each carved once by content hash into search,
  select and report items (the report split is scored once, at the end).
Ranges come from each method's own declaration (`engine/methods`), never repeated here.
`commands/init.py` writes the text; `evomerge validate` checks it like any space.
"""

from __future__ import annotations

from dataclasses import dataclass

from evomerge.search.models import alias, unique_alias


@dataclass(frozen=True)
class Starter:
    """What a starter space is made from: model references as the space file will name them (`models`,
    and the `base` when the user named one), the tasks (`task` or `task:metric`), the task folder, the
    run name and the trial budget. Two models in all: slerp (from the base, else the first). More: task
    arithmetic over the base (else the first model) and the others as experts."""

    models: tuple[str, ...]
    tasks: tuple[str, ...]
    base: str | None = None
    tasks_dir: str | None = None
    name: str = "search"
    trials: int | None = None
    file: str = "space.yaml"  # where it is written (named in the comments' commands)


def starter_text(s: Starter) -> str:
    """The space file's text: a slerp gradient for two models, task arithmetic over a base and experts."""
    everyone = ([s.base] if s.base else []) + list(s.models)
    head = [f"# A search space written by `evomerge init` for {', '.join(everyone)}.",
            f"# Check it (models, tasks, split sizes, a one-item dry run):  evomerge validate {s.file}",
            f"# Then search (resumable; results in runs/{s.name}/):  evomerge search {s.file}",
            "# Every key is explained in docs/search.md; the comments below say what to change first.",
            f"name: {s.name}"]
    two = len(everyone) == 2
    body = _slerp(everyone[0], everyone[1]) if two else _task_arithmetic(everyone[0], everyone[1:])
    return "\n".join(head + body + _objective(s) + _budget(s, two)) + "\n"


def _model_lines(models: list[str]) -> list[str]:
    names: list[str] = []
    out = ["models:"]
    for m in models:
        name = unique_alias(alias(m), names)
        names.append(name)
        out.append(f"  - {_quote(m)}" if name == alias(m) else f"  - {{name: {name}, path: {_quote(m)}}}")
    return out


def _slerp(a: str, b: str) -> list[str]:
    return [*_model_lines([a, b]),
            f"base_model: {_quote(a)}           # slerp walks from this model (t = 0) to the other (t = 1)",
            "method: slerp",
            "parameters:",
            "  slerp:",
            "    # t per layer: a gradient through 3 control points (first layer, middle, last), searched",
            "    # separately for attention (self_attn), MLP (mlp) and every other tensor (rest)",
            "    t: {points: 3, filters: [self_attn, mlp]}"]


def _task_arithmetic(base: str, experts: list[str]) -> list[str]:
    out = [*_model_lines(experts),
           f"base_model: {_quote(base)}           # the experts' common ancestor: task vectors are expert - base",
           "method: task_arithmetic",
           "# Alternatives that also prune each task vector (drop its small entries) before adding them:",
           "#   method: [task_arithmetic, ties, dare_ties]   searches the method too (TPE picks among them)",
           "parameters:",
           "  task_arithmetic:",
           "    weight: {low: 0.0, high: 1.0}    # each expert's weight, searched per expert",
           "    lambda: {low: 0.5, high: 1.5}    # a scale on the summed task vectors",
           "#  ties:                              # TIES: keep the largest `density` of each task vector, elect signs",
           "#    weight: {low: 0.0, high: 1.0}",
           "#    density: {low: 0.1, high: 1.0}",
           "#  dare_ties:                         # DARE: drop entries at random (seeded), rescale, elect signs",
           "#    weight: {low: 0.0, high: 1.0}",
           "#    density: {low: 0.2, high: 1.0, points: 2}   # a 2-point gradient: early vs late layers"]
    return out


def _objective(s: Starter) -> list[str]:
    out = ["objective:"]
    if s.tasks_dir:
        out.append(f"  tasks_dir: {_quote(s.tasks_dir)}   # your lm-eval task YAML (relative to this file)")
    out.append("  tasks:                             # the score is the weighted mean of their metrics")
    weight = round(1 / len(s.tasks), 4)
    for task in s.tasks:
        name, _, metric = task.partition(":")
        out.append(f"    - {{task: {name}, weight: {weight:g}, metric: {metric or 'exact_match'}}}")
    out += ["  splits:                            # each task's items carved once by content hash:",
            "    carve: {search: 0.6, select: 0.2, report: 0.2}   # trials / top-k re-scored / scored once at the end",
            "    seed: 0"]
    return out


def _budget(s: Starter, two: bool) -> list[str]:
    trials = s.trials or (30 if two else 60)
    return ["search:",
            f"  trials: {trials}                        # more trials for more searched numbers",
            "  sampler: auto                     # CMA-ES for numbers only, TPE with choices",
            "  seed: 0",
            "  top_k: 5                          # the best trials re-scored on the select split",
            "  # limit: 64                       # items per trial (a seeded subset): cheaper trials, noisier scores"]


def _quote(text: str) -> str:
    """A YAML scalar for a path or Hub id (quoted when YAML would read it otherwise)."""
    import json

    plain = text and text[0] not in "!&*?|>'\"%@`{[#-~ " and not any(c in text for c in ": #,[]{}")
    return text if plain else json.dumps(text)


__all__ = ["Starter", "starter_text"]
