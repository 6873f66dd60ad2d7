"""The parent audit: where each parent model comes from, and whether it has seen the report items.

Why it exists: a merge can only be as clean as its parents. For every parent the report states its
declared lineage (config and model card) and, with reference texts that no model can have seen, the
Min-K%++ membership AUROC of every parent and of the winner on the report items against them (a value
well above 0.5 says a model saw those items). `selection.select_and_report` runs it once per winner;
`evidence.py` puts it in the report.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

from evomerge.errors import ConfigError
from evomerge.executors.worker import TrialJob
from evomerge.search.candidates import Candidate
from evomerge.search.jobs import each_outcome, short
from evomerge.search.progress import Progress
from evomerge.search.space import SearchSpace

PARENT_AUDIT_ATTR = "parent_audit"  # study user attr: {label: {"lineage": ..., "membership": ...}}


def read_reference_items(path: str, where: str) -> list[str]:
    """The texts of a reference-items JSONL (each line an object with `text`, or `prompt` and `answer`);
    a missing file, a malformed line or no item at all is a ConfigError naming the line. The pre-flight
    reads it, so a bad file fails before the search, not after it."""
    fix = 'one JSON object per line: {"text": ...} or {"prompt": ..., "answer": ...}'
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read {path} ({type(exc).__name__})", where=where, fix=fix) from None
    out = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as exc:
            raise ConfigError(f"line {n} of {path} is not JSON ({exc})", where=where, fix=fix) from None
        if not isinstance(row, dict) or not ("text" in row or "prompt" in row) or \
                not all(isinstance(v, str) for k, v in row.items() if k in ("text", "prompt", "answer")):
            raise ConfigError(f"line {n} of {path} has no text (or prompt) string", where=where, fix=fix)
        out.append(row["text"] if "text" in row else f"{row.get('prompt', '')}{row.get('answer', '')}")
    if not out:
        raise ConfigError(f"{path} holds no item", where=where, fix=fix)
    return out


def reference_texts(space: SearchSpace) -> tuple[list[str], str] | tuple[None, str]:
    """Texts of the objective's tasks that no model can have seen, for the membership audit, and where
    they come from: the user's `objective.reference_items` (JSONL: `text`, or `prompt` + `answer`), or
    for the toy family's tasks freshly drawn items of each skill that are in none of its data files."""
    obj = space.objective
    if obj.reference_items:
        out = read_reference_items(obj.reference_items, f"{space.path or 'space'}: objective.reference_items")
        return out, f"{obj.reference_items} ({len(out)} items)"
    from evomerge.toy.family import family

    fam = family()
    if obj.tasks_dir is None or Path(obj.tasks_dir).resolve() != Path(fam.tasks_dir).resolve():
        return None, "no reference items (give objective.reference_items: a JSONL of unseen items of the tasks)"
    import random

    from evomerge.toy.skills import drawer, normalize

    taken = set()
    for f in Path(fam.tasks_dir, "data").glob("*.jsonl"):
        for line in f.read_text(encoding="utf-8").splitlines():
            if line.strip():
                taken.add(normalize(json.loads(line)["prompt"]))
    out = []
    for t in obj.tasks:
        skill = t.task.removeprefix("toy_")
        if skill not in fam.skills:
            continue
        rng, fresh = random.Random(f"membership/{skill}"), []
        while len(fresh) < 300:
            prompt, answer = drawer(skill)(rng)
            if normalize(prompt) not in taken:
                taken.add(normalize(prompt))
                fresh.append(f"{prompt}{answer}")
        out += fresh
    return (out, "freshly drawn toy items (300 per skill, in no split and no training set)") if out else \
        (None, "no reference items")


def parent_audit(space: SearchSpace, executor, winner: Candidate, log: Callable, progress: bool = False) -> dict:
    """Lineage of every parent, and Min-K%++ membership AUROC of every parent and the winner on the
    report items against reference items (when there are any)."""
    from evomerge.evaluation.membership import lineage
    from evomerge.search.suggest import parent_recipes

    refs, source = reference_texts(space)
    models = {m.name: m.path for m in (*space.models, *([space.base] if space.base else []))}
    out: dict[str, Any] = {"_winner": winner.trial, "_reference": source}
    jobs = [(label, recipe) for label, recipe in parent_recipes(space)] + [(winner.label, winner.recipe)]
    for label, _ in jobs:
        name = label.removeprefix("parent:")
        out[label] = {"lineage": lineage(models[name]) if name in models else None}
    if not refs:
        return out
    log(f"evomerge: membership audit of {len(jobs)} model(s) (Min-K%++ on the report items vs {len(refs)} "
        "reference items)")
    runs = [TrialJob(i, recipe.to_dict(), "membership", None, space.budget.seed, tag="membership",
                     reference=tuple(refs)) for i, (_, recipe) in enumerate(jobs)]
    bar = Progress(progress, len(runs), 0, desc="membership", unit="model")
    try:
        for outcome in each_outcome(executor, runs):
            label = jobs[outcome.number][0]
            if outcome.ok:
                m = outcome.metrics["membership"]
                out[label]["membership"] = {"auroc": m["auroc"], "report_items": int(m["report_items"]),
                                            "reference_items": int(m["reference_items"]), "reference": source}
            else:
                out[label]["membership_error"] = short(outcome.error or "failed", 300)
            bar.step(label)
    finally:
        bar.close()
    return out
