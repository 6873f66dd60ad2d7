"""Selection and report: the winner is chosen on held-out data, then scored once on the report split.

Why it exists: the search split's best trial is biased upwards (it was chosen on those items). So the
top-k trials (one per distinct recipe) and the baselines are re-scored on the `select` split and the
best there wins; then the winner, the baselines, the parents and (with evidence on) the naive merges
are scored once on the `report` split, and the parent audit is run. Every score is cached in the study
(a finished run re-run does not re-score) and every touch of the report split is logged
(`record.note_report`). `run.run_search` calls `select_and_report` after the trial loop.
"""

from __future__ import annotations

import json
import math
from typing import Callable

from evomerge.search.candidates import Candidate, Scorer
from evomerge.search.loop import RECIPE_KEY
from evomerge.search.space import SearchSpace

SELECT_ATTR = "select_scores"  # study user attr: {trial number: {"score": float, "tasks": {...}}}
REPORT_ATTR = "report_scores"  # study user attr: {label: {"score": float, "tasks": {...}, "trial": n}}
WINNER_ATTR = "winner"


def top_trials(study, space: SearchSpace, k: int) -> list:
    """The k best COMPLETE trials by search score (for several objectives: the Pareto front ranked by
    the weighted mixture), one per distinct recipe (trials that reused another's score are the same)."""
    from optuna.trial import TrialState

    trials = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if space.objective.multi_objective:
        front = {t.number for t in study.best_trials}
        weights = [t.weight for t in space.objective.tasks]
        total = sum(weights) or len(weights)
        signs = [1 if t.direction == "maximize" else -1 for t in space.objective.tasks]

        def key(t):
            return (t.number in front, sum(w * s * v for w, s, v in zip(weights, signs, t.values)) / total)
    else:
        def key(t):
            return (True, t.value)
    ranked = sorted(trials, key=key, reverse=True)
    seen, out = set(), []
    for t in ranked:
        sig = t.user_attrs.get(RECIPE_KEY) or json.dumps(t.params, sort_keys=True, default=str)
        if sig in seen:
            continue
        seen.add(sig)
        out.append(t)
        if len(out) == k:
            break
    return out


def select_and_report(study, space: SearchSpace, executor, *, log: Callable = print,
                      progress: bool = False, evidence: bool = True) -> tuple[Candidate | None, list[Candidate]]:
    """Re-score the top-k and the baselines on `select`; the best there wins. Then score the winner,
    the parents and the baselines on `report`. Cached in study user attributes."""
    scorer = Scorer(space, executor, log, progress)
    winner, cands, baselines = _choose(study, scorer)
    if winner is None:
        return None, cands
    report = [winner] + [c for c in baselines if c is not winner]
    report = _report(study, scorer, winner, report, evidence)
    ordered = [winner] + [c for c in cands if c is not winner] + [c for c in report if c.trial is None]
    return winner, ordered


def select_winner(study, space: SearchSpace, executor, *, log: Callable = print,
                  progress: bool = False) -> tuple[Candidate | None, list[Candidate]]:
    """Only the selection: the top-k and the baselines re-scored on `select` (cached), and the winner
    (None when none could be scored). The report split is not touched (benchmarks that score the winner
    their own way use this)."""
    winner, cands, _ = _choose(study, Scorer(space, executor, log, progress))
    return winner, cands


def _choose(study, scorer: Scorer) -> tuple[Candidate | None, list[Candidate], list[Candidate]]:
    """(winner or None, the select split's candidates, the baseline candidates among them)."""
    by_number, baselines = _pool(study, scorer.space)
    if not by_number:
        return None, [], []
    cands = list(by_number.values())
    return _select(study, scorer, cands), cands, [by_number[t.number] for t in baselines]


def _pool(study, space: SearchSpace) -> tuple[dict[int, Candidate], list]:
    """The candidates of the select split by trial number (the top-k, then each method's baseline
    trial), with their search scores; and the baseline trials."""
    from optuna.trial import TrialState

    from evomerge.search.study import ROLE
    from evomerge.search.suggest import build_recipe

    top = top_trials(study, space, space.budget.top_k)
    baselines = {}
    for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        role = t.user_attrs.get(ROLE, "")
        if role.startswith("baseline:") and role not in baselines:
            baselines[role] = t
    pool = {t.number: t for t in top}
    for t in baselines.values():
        pool.setdefault(t.number, t)
    by_number = {}
    for n, t in pool.items():
        role = t.user_attrs.get(ROLE, "")
        label = role if role.startswith("baseline:") else f"trial {n}"
        by_number[n] = Candidate(label, n, build_recipe(space, t.params))
        by_number[n].scores["search"] = {"score": _search_mixture(t, space), "tasks": t.user_attrs.get("tasks", {})}
    return by_number, list(baselines.values())


def _select(study, scorer: Scorer, cands: list[Candidate]) -> Candidate | None:
    """Score the candidates on `select` (cached); the best there (ties: the better search score) wins.
    None when none could be scored."""
    select_cache = {int(k): v for k, v in study.user_attrs.get(SELECT_ATTR, {}).items()}
    scorer.score(cands, "select", select_cache, lambda c: c.trial)
    study.set_user_attr(SELECT_ATTR, {str(k): v for k, v in select_cache.items()})

    def rank(c: Candidate):
        s = c.scores["select"]["score"]
        return (s is not None, s if s is not None else -math.inf, c.scores["search"]["score"] or -math.inf)

    winner = max(cands, key=rank)
    if winner.scores["select"]["score"] is None:
        return None
    study.set_user_attr(WINNER_ATTR, winner.trial)
    return winner


def _report(study, scorer: Scorer, winner: Candidate, report: list[Candidate], evidence: bool) -> list[Candidate]:
    """Score the winner and the baselines (`report`), the parents and the naive merges on `report`, once
    per winner (cached, logged); then the parent audit. Returns every candidate scored there."""
    from evomerge.search.naive import naive_candidates
    from evomerge.search.parents import PARENT_AUDIT_ATTR, parent_audit
    from evomerge.search.suggest import parent_recipes

    report_cache = dict(study.user_attrs.get(REPORT_ATTR, {}))
    if report_cache.get("_winner") != winner.trial:
        report_cache = {}  # a different winner: the report is redone once for the new set
    for label, recipe in parent_recipes(scorer.space):
        report.append(Candidate(label, None, recipe))
    if evidence:
        report += naive_candidates(study, scorer, report)
    unscored = [c.label for c in report if c.label not in report_cache]
    if unscored:  # every touch of the report split is logged (it should happen once per run)
        from evomerge.search.record import note_report

        note_report(study, unscored)
    scorer.score(report, "report", report_cache, lambda c: c.label, per_item=evidence)
    report_cache["_winner"] = winner.trial
    study.set_user_attr(REPORT_ATTR, report_cache)
    if evidence and study.user_attrs.get(PARENT_AUDIT_ATTR, {}).get("_winner") != winner.trial:
        study.set_user_attr(PARENT_AUDIT_ATTR, parent_audit(scorer.space, scorer.executor, winner, scorer.log,
                                                            scorer.progress))
    return report


def _search_mixture(trial, space: SearchSpace) -> float | None:
    """A trial's search score: its value, or for several objectives the weighted mixture of its tasks."""
    if not space.objective.multi_objective:
        return trial.value
    from evomerge.search.score import combine

    tasks = trial.user_attrs.get("tasks")
    return combine(tasks, space.objective) if tasks else None
