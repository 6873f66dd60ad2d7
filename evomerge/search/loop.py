"""The search loop: ask, suggest, build, submit, tell; then select on held-out data and report.

Why it exists: this is `evomerge search`. It owns the order of events of a run and nothing else:
- asynchronous ask/tell over an `Executor` (as many trials in flight as it has slots);
- a failed trial (the worker's error, a missing or NaN metric, a recipe the engine refuses) becomes a
  FAIL trial with its reason in the `fail_reason` user attribute, and the search goes on;
- the fitness (`search/fitness.py`): every item of the limit, item-count rungs whose values are
  reported as intermediate values so that the pruner may stop a trial after any rung but the last, or
  an estimate from anchor items chosen before the first trial;
- the budget counts finished trials in storage, so running the same command again resumes it;
- selection: the top-k candidates (and the baselines) are re-scored on the `select` split and the
  winner is chosen there; the winner, the parents and the baselines are scored once on the `report`
  split. Those scores are cached in the study, so a finished run re-run does not re-score.
The components (study, sampler, executor, worker) come from their own modules.
"""

from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from evomerge.errors import ConfigError, EvomergeError, OutputError
from evomerge.search.space import SearchSpace
from evomerge.executors.worker import TrialJob, TrialOutcome, WorkerSpec

SELECT_ATTR = "select_scores"  # study user attr: {trial number: {"score": float, "tasks": {...}}}
REPORT_ATTR = "report_scores"  # study user attr: {label: {"score": float, "tasks": {...}, "trial": n}}
WINNER_ATTR = "winner"
PARENT_AUDIT_ATTR = "parent_audit"  # study user attr: {label: {"lineage": ..., "membership": ...}}
NAIVE_ATTR = "naive_search_scores"  # study user attr: {label: {"score": ...}} of the naive lambda grid, search split


@dataclass
class Candidate:
    """A recipe scored outside the optimisation: a trial, a baseline or a parent model."""

    label: str  # "trial 12", "baseline:slerp", "parent:add"
    trial: int | None
    recipe: Any  # MergeRecipe
    scores: dict[str, dict] = field(default_factory=dict)  # split -> {"score": x, "tasks": {...}}


@dataclass
class SearchResult:
    study: Any
    space: SearchSpace
    out: Path
    winner: Candidate | None
    candidates: list[Candidate]
    seconds: float
    info: dict


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


def prepare_out(out: Path, storage_given: bool) -> None:
    """Create the run folder; refuse one that holds something other than an evomerge run."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise OutputError("exists and is not a folder", where=str(out), fix="choose another --out")
    if out.is_dir() and any(out.iterdir()) and not storage_given:
        if not (out / "study.db").exists():
            raise OutputError("folder exists, is not empty and holds no evomerge study (study.db)",
                              where=str(out), fix="choose another --out, or empty the folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        raise OutputError(f"cannot write here ({exc.strerror})", where=str(out),
                          fix="choose a writable --out") from None


class _Progress:
    """tqdm bar (done / total, best so far, elapsed, ETA), or nothing: the trials, then the candidates
    scored on select and report."""

    def __init__(self, enabled: bool, total: int, initial: int, *, desc: str = "search", unit: str = "trial"):
        self.bar = None
        if enabled:
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=initial, desc=desc, unit=unit, file=sys.stderr,
                            dynamic_ncols=True, smoothing=0.1)

    def update(self, best: float | None, failed: int) -> None:
        if self.bar is not None:
            post = {"best": "-" if best is None else f"{best:.4f}"}
            if failed:
                post["failed"] = failed
            self.bar.set_postfix(post, refresh=False)
            self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _best_value(study) -> float | None:
    from optuna.trial import TrialState

    values = [t.value for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
              if t.values is not None and len(t.values) == 1]
    return max(values) if values else None


def _short(error: str, limit: int = 2000) -> str:
    return error if len(error) <= limit else error[: limit - 3] + "..."


def optimize(study, space: SearchSpace, executor, *, progress: bool = True, log: Callable = print) -> dict:
    """Run trials until the budget (finished trials in storage) is reached. Returns counters."""
    from optuna.trial import TrialState

    from evomerge.search.score import ScoreError
    from evomerge.search.study import FAIL_REASON, INTERRUPTED, finished_count, grid_size
    from evomerge.search.suggest import build_recipe, suggest_params

    budget = space.budget
    split = "search"
    target = budget.trials
    if study.user_attrs.get("sampler") == "grid":
        target = min(target, grid_size(space))
    fit = _Fitness(space, study, executor, log)
    done = finished_count(study)
    bar = _Progress(progress, target, min(done, target))
    live: dict[int, Any] = {}  # trial number -> optuna Trial
    recipes: dict[int, dict] = {}  # trial number -> recipe dict (resubmitted after a low-fidelity score)
    stats = {"completed": 0, "failed": 0, "pruned": 0, "reused": 0, "invalid": 0}
    best = [_best_value(study)]
    scored = _scored_recipes(study, space)  # recipe key -> the COMPLETE trial that scored it

    def progressed(value=None) -> None:
        if isinstance(value, float) and (best[0] is None or value > best[0]):
            best[0] = value
        bar.update(best[0], stats["failed"])

    def fail(trial, reason: str) -> None:
        trial.set_user_attr(FAIL_REASON, _short(reason))
        study.tell(trial, state=TrialState.FAIL)
        stats["failed"] += 1

    try:
        while True:
            while len(live) < executor.slots and done + len(live) < target:
                trial = study.ask()
                params = suggest_params(trial, space)
                try:
                    recipe = build_recipe(space, params)
                except EvomergeError as exc:  # the sampler's choice is not a valid recipe (not a set-up error)
                    fail(trial, f"recipe: {exc}")
                    stats["invalid"] += 1
                    done += 1
                    progressed()
                    continue
                key = recipe_key(recipe.to_dict())
                trial.set_user_attr(RECIPE_KEY, key)
                twin = scored.get(key)
                if twin is not None:  # the same recipe was scored already: reuse, do not merge again
                    trial.set_user_attr(REUSED_FROM, twin["number"])
                    trial.set_user_attr("tasks", twin["tasks"])
                    values = twin["values"]
                    study.tell(trial, values if len(values) > 1 else values[0])
                    stats["completed"] += 1
                    stats["reused"] += 1
                    done += 1
                    progressed(values[0] if len(values) == 1 else None)
                    continue
                live[trial.number] = trial
                recipes[trial.number] = recipe.to_dict()
                executor.submit(fit.job(trial.number, recipes[trial.number], 0))
            if not live:
                if done < target and executor.slots < 1:
                    raise EvomergeError("no worker is left to run trials (all were retired after failures)",
                                        where="executor", fix="check the worker logs; rerun to resume")
                break
            for outcome in executor.wait(None):
                trial = live.get(outcome.number)
                if trial is None:  # not ours (cannot happen with our executors); ignore
                    continue
                finished, value = _handle(study, space, trial, recipes[outcome.number], outcome, fail, stats,
                                          executor, fit, ScoreError)
                if finished and value is not None:
                    scored.setdefault(trial.user_attrs.get(RECIPE_KEY), {
                        "number": trial.number, "values": list(value) if isinstance(value, tuple) else [value],
                        "tasks": trial.user_attrs.get("tasks", {})})
                if finished:
                    del live[outcome.number]
                    del recipes[outcome.number]
                    fit.forget(outcome.number)
                    done += 1
                    progressed(value)
                broken = stats["failed"] - stats["invalid"]
                if stats["completed"] == 0 and stats["pruned"] == 0 and broken >= min(3, target):
                    # Nothing has worked yet: a broken set-up (tasks, tokenizer, models), not a bad
                    # candidate. Stop instead of burning the budget on identical failures.
                    reason = (outcome.error or "no metrics").splitlines()[0]
                    raise EvomergeError(
                        f"the first {broken} trials all failed; the last with: {reason}",
                        where="search", fix="check the models, tasks and metric in the search space "
                        "(trials.csv / the study hold every reason)",
                    )
    except BaseException:
        # Ctrl-C or an abort: trials in flight did not finish. FAIL them now (a resume would do it
        # too) and enqueue their parameters so the next run redoes them.
        numbers = []
        for number, trial in live.items():
            try:
                study.tell(trial, state=TrialState.FAIL)
                study.enqueue_trial(trial.params, user_attrs={"role": trial.user_attrs.get("role", "retry"),
                                                              "retry_of": number})
                numbers.append(number)
            except Exception:  # noqa: BLE001 - best effort on the way out
                pass
        if numbers:
            study.set_user_attr(INTERRUPTED, list(study.user_attrs.get(INTERRUPTED, [])) + numbers)
        raise
    finally:
        bar.close()
    return stats


RECIPE_KEY = "recipe_key"  # trial user attribute: hash of the recipe it merged (identical candidates)
REUSED_FROM = "reused_from"  # trial user attribute: the trial whose score an identical recipe reused


def recipe_key(recipe: dict) -> str:
    """A stable hash of a recipe (after build_recipe's clipping and rounding): equal for equal merges."""
    import hashlib

    return hashlib.sha256(json.dumps(recipe, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _scored_recipes(study, space: SearchSpace) -> dict[str, dict]:
    """Recipe key -> {number, values, tasks} of the first COMPLETE trial that scored that recipe."""
    from optuna.trial import TrialState

    from evomerge.search.suggest import build_recipe

    out: dict[str, Any] = {}
    for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        key = t.user_attrs.get(RECIPE_KEY)
        if key is None:  # a study made before keys were recorded
            try:
                key = recipe_key(build_recipe(space, t.params).to_dict())
            except EvomergeError:
                continue
        out.setdefault(key, {"number": t.number, "values": list(t.values), "tasks": t.user_attrs.get("tasks", {})})
    return out


class _Fitness:
    """What a trial's jobs are and how their outcomes become its fitness (`search.fitness`)."""

    def __init__(self, space: SearchSpace, study, executor, log: Callable):
        from evomerge.search import fitness

        self.space, self.mode = space, space.budget.fitness_mode
        b = space.budget
        self.rungs = fitness.rungs(b.fidelity.limit, b.fidelity.factor, b.limit) if self.mode == "fidelity" else None
        self.plan = anchor_plan(study, space, executor, log) if self.mode == "anchors" else None
        self.scores: dict[int, Any] = {}  # trial number -> fitness.ItemScores (fidelity, anchors)

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
        from evomerge.search.fitness import ItemScores

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


def anchor_plan(study, space: SearchSpace, executor, log: Callable) -> dict:
    """The anchor items of this study (`fitness: anchors`): chosen on first use from the per-item
    search-split scores of the references (parents, baseline recipes, naive merges) and stored in the
    study, so that a resumed run scores the same items."""
    from evomerge.search import fitness
    from evomerge.search.score import objective_rows
    from evomerge.search.suggest import reference_recipes

    stored = study.user_attrs.get(fitness.ANCHORS_ATTR)
    if stored is not None:
        return stored
    b = space.budget
    refs = reference_recipes(space)
    t0 = time.perf_counter()
    jobs = [TrialJob(i, recipe, "search", b.limit, b.seed, tag="reference", per_item=True)
            for i, (_, recipe) in enumerate(refs)]
    references, items = {}, 0
    for outcome in _each_outcome(executor, jobs):
        label = refs[outcome.number][0]
        if not outcome.ok or not outcome.items:
            raise EvomergeError(f"the anchor reference {label} could not be scored: "
                                f"{(outcome.error or 'no per-item scores').splitlines()[0]}",
                                where="search.fitness: anchors", fix="check the models and tasks, or use fitness: full")
        references[label] = objective_rows(outcome.items, space.objective, "search")
        items += sum((outcome.samples or {}).values())
    plan = {"tasks": fitness.anchor_plan(references, b.anchor_items, b.seed), "references": [r[0] for r in refs],
            "reference_items": items, "seconds": round(time.perf_counter() - t0, 3)}
    study.set_user_attr(fitness.ANCHORS_ATTR, plan)
    n = sum(len(p["picks"]) for p in plan["tasks"].values())
    log(f"evomerge: fitness from {n} anchor items ({b.anchor_items} per task), chosen from {len(refs)} references "
        f"scored on {items} items")
    return plan


def _handle(study, space, trial, recipe: dict, outcome: TrialOutcome, fail, stats, executor, fit: _Fitness,
            ScoreError) -> tuple[bool, Any]:
    """Tell Optuna about one outcome. Returns (finished, value told or None)."""
    from optuna.trial import TrialState

    from evomerge.search.fitness import ITEMS_ATTR
    from evomerge.search.score import score, task_values
    from evomerge.search.study import ROLE

    split = "search"
    timings = dict(trial.user_attrs.get("timings") or {})
    for key, value in outcome.timings.items():  # summed over fidelity rungs
        timings[key] = round(timings.get(key, 0.0) + float(value), 4)
    timings["worker"] = f"{outcome.node}:{outcome.pid}"
    trial.set_user_attr("timings", timings)
    trial.set_user_attr(ITEMS_ATTR, int(trial.user_attrs.get(ITEMS_ATTR, 0)) + sum((outcome.samples or {}).values()))
    if outcome.error is not None or outcome.metrics is None:
        fail(trial, outcome.error or "no metrics returned")
        return True, None
    try:
        metrics = fit.metrics(trial.number, outcome)
        value = score(metrics, space.objective, split)
    except (ScoreError, ValueError) as exc:
        fail(trial, f"score: {exc}")
        return True, None
    values = value if isinstance(value, tuple) else (value,)
    if not all(math.isfinite(v) for v in values):
        fail(trial, f"score: non-finite value {value}")
        return True, None
    if not fit.last(outcome.tag):
        rung = int(outcome.tag.split(":")[1])
        trial.report(value, fit.rungs[rung][1])
        # a baseline is the reference the search must beat: always scored in full
        if not str(trial.user_attrs.get(ROLE, "")).startswith("baseline") and trial.should_prune():
            study.tell(trial, state=TrialState.PRUNED)
            stats["pruned"] += 1
            return True, None
        executor.submit(fit.job(trial.number, recipe, rung + 1))
        return False, None
    trial.set_user_attr("tasks", task_values(metrics, space.objective, split))
    study.tell(trial, list(values) if len(values) > 1 else values[0])
    stats["completed"] += 1
    return True, value


# --- selection and report ------------------------------------------------------------------------
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


def _each_outcome(executor, jobs: list[TrialJob]):
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


def _score_candidates(executor, space: SearchSpace, candidates: list[Candidate], split: str, cache: dict,
                      key: Callable[[Candidate], str], log: Callable, progress: bool = False,
                      tag: str | None = None, per_item: bool | None = None) -> None:
    """Score candidates (not already in `cache`) on `split`, full split, through the executor, with the
    same progress display as the trials."""
    from evomerge.search.score import ScoreError, mixture, task_items, task_values

    if per_item is None:
        per_item = split == "report"  # the report's intervals and paired tests need every item's score
    pending = [c for c in candidates if key(c) not in cache]
    if pending:
        log(f"evomerge: scoring {len(pending)} candidate(s) on the {split!r} split")
    bar = _Progress(progress and bool(pending), len(pending), 0, desc=split, unit="candidate")
    limit = space.budget.limit if split == "search" else None
    jobs = [TrialJob(i, c.recipe.to_dict(), split, limit, space.budget.seed, tag=tag or split, per_item=per_item)
            for i, c in enumerate(pending)]
    best = None
    try:
        for outcome in _each_outcome(executor, jobs):
            cand = pending[outcome.number]
            entry: dict[str, Any]
            if outcome.ok:
                try:
                    entry = {"score": mixture(outcome.metrics, space.objective, split),
                             "tasks": task_values(outcome.metrics, space.objective, split)}
                    if per_item and outcome.items:
                        entry["items"] = task_items(outcome.items, space.objective, split)
                    if per_item and outcome.truncated is not None:
                        entry["truncated"] = outcome.truncated
                except ScoreError as exc:
                    entry = {"score": None, "error": str(exc)}
            else:
                entry = {"score": None, "error": _short(outcome.error or "failed", 500)}
            if entry["score"] is None:
                log(f"evomerge: {cand.label} could not be scored on {split}: {entry['error'].splitlines()[0]}")
            elif best is None or entry["score"] > best:
                best = entry["score"]
            cache[key(cand)] = entry
            bar.update(best, 0)
    finally:
        bar.close()
    for cand in candidates:
        cand.scores[split] = cache[key(cand)]


def select_and_report(study, space: SearchSpace, executor, *, log: Callable = print,
                      progress: bool = False, evidence: bool = True) -> tuple[Candidate | None, list[Candidate]]:
    """Re-score the top-k and the baselines on `select`; the best there wins. Then score the winner,
    the parents and the baselines on `report`. Cached in study user attributes."""
    from optuna.trial import TrialState

    from evomerge.search.study import ROLE
    from evomerge.search.suggest import build_recipe, parent_recipes

    top = top_trials(study, space, space.budget.top_k)
    baselines = {}
    for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        role = t.user_attrs.get(ROLE, "")
        if role.startswith("baseline:") and role not in baselines:
            baselines[role] = t
    pool = {t.number: t for t in top}
    for t in baselines.values():
        pool.setdefault(t.number, t)
    if not pool:
        return None, []
    by_number = {}
    for n, t in pool.items():
        role = t.user_attrs.get(ROLE, "")
        label = role if role.startswith("baseline:") else f"trial {n}"
        by_number[n] = Candidate(label, n, build_recipe(space, t.params))
        by_number[n].scores["search"] = {"score": _search_mixture(t, space), "tasks": t.user_attrs.get("tasks", {})}

    select_cache = {int(k): v for k, v in study.user_attrs.get(SELECT_ATTR, {}).items()}
    cands = list(by_number.values())
    _score_candidates(executor, space, cands, "select", select_cache, lambda c: c.trial, log, progress)
    study.set_user_attr(SELECT_ATTR, {str(k): v for k, v in select_cache.items()})

    def rank(c: Candidate):
        s = c.scores["select"]["score"]
        return (s is not None, s if s is not None else -math.inf, c.scores["search"]["score"] or -math.inf)

    winner = max(cands, key=rank)
    if winner.scores["select"]["score"] is None:
        return None, cands
    study.set_user_attr(WINNER_ATTR, winner.trial)

    report_cache = dict(study.user_attrs.get(REPORT_ATTR, {}))
    if report_cache.get("_winner") != winner.trial:
        report_cache = {}  # a different winner: the report is redone once for the new set
    report = [winner] + [by_number[t.number] for t in baselines.values() if t.number != winner.trial]
    for label, recipe in parent_recipes(space):
        report.append(Candidate(label, None, recipe))
    if evidence:
        report += _naive_candidates(study, space, executor, report, log, progress)
    unscored = [c.label for c in report if c.label not in report_cache]
    if unscored:  # every touch of the report split is logged (it should happen once per run)
        from evomerge.search.record import note_report

        note_report(study, unscored)
    _score_candidates(executor, space, report, "report", report_cache, lambda c: c.label, log, progress,
                      per_item=evidence)
    report_cache["_winner"] = winner.trial
    study.set_user_attr(REPORT_ATTR, report_cache)
    if evidence and study.user_attrs.get(PARENT_AUDIT_ATTR, {}).get("_winner") != winner.trial:
        study.set_user_attr(PARENT_AUDIT_ATTR, parent_audit(space, executor, winner, log))
    ordered = [winner] + [c for c in cands if c is not winner] + [c for c in report if c.trial is None]
    return winner, ordered


def reference_texts(space: SearchSpace) -> tuple[list[str], str] | tuple[None, str]:
    """Texts of the objective's tasks that no model can have seen, for the membership audit, and where
    they come from: the user's `objective.reference_items` (JSONL: `text`, or `prompt` + `answer`), or
    for the toy family's tasks freshly drawn items of each skill that are in none of its data files."""
    obj = space.objective
    if obj.reference_items:
        out = []
        with open(obj.reference_items, encoding="utf-8") as fh:
            for line in fh:
                if line.strip():
                    row = json.loads(line)
                    out.append(row["text"] if "text" in row else f"{row.get('prompt', '')}{row.get('answer', '')}")
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


def parent_audit(space: SearchSpace, executor, winner: Candidate, log: Callable) -> dict:
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
    for outcome in _each_outcome(executor, runs):
        label = jobs[outcome.number][0]
        if outcome.ok:
            m = outcome.metrics["membership"]
            out[label]["membership"] = {"auroc": m["auroc"], "report_items": int(m["report_items"]),
                                        "reference_items": int(m["reference_items"]), "reference": source}
        else:
            out[label]["membership_error"] = _short(outcome.error or "failed", 300)
    return out


def _naive_candidates(study, space: SearchSpace, executor, taken: list[Candidate], log: Callable,
                      progress: bool) -> list[Candidate]:
    """The simple merges every result should be compared with (suggest.naive_recipes), not already among
    the report's candidates; task arithmetic's lambda is tuned on the search split first (cached)."""
    from evomerge.search.suggest import naive_recipes

    fixed, grid = naive_recipes(space)
    if grid:
        cache = dict(study.user_attrs.get(NAIVE_ATTR, {}))
        cands = [Candidate(label, None, recipe) for label, recipe in grid]
        _score_candidates(executor, space, cands, "search", cache, lambda c: c.label, log, progress, tag="naive")
        study.set_user_attr(NAIVE_ATTR, cache)
        scored = [c for c in cands if cache[c.label].get("score") is not None]
        if scored:
            best = max(scored, key=lambda c: cache[c.label]["score"])
            fixed.append(("naive:task_arithmetic (lambda tuned on search)", best.recipe))
    seen = {recipe_key(c.recipe.to_dict()) for c in taken}
    out = []
    for label, recipe in fixed:
        k = recipe_key(recipe.to_dict())
        if k not in seen:
            seen.add(k)
            out.append(Candidate(label, None, recipe))
    return out


def _search_mixture(trial, space: SearchSpace) -> float | None:
    if not space.objective.multi_objective:
        return trial.value
    from evomerge.search.score import combine

    tasks = trial.user_attrs.get("tasks")
    return combine(tasks, space.objective) if tasks else None


# --- entry points --------------------------------------------------------------------------------
def run_search(
    space: SearchSpace,
    out: str | Path,
    *,
    storage: str | None = None,
    executor=None,
    workers: int = 1,
    ray_address: str | None = None,
    trial_timeout: float | None = None,
    threads_per_worker: int | None = None,
    evaluator: str | None = None,
    progress: bool = True,
    select: bool = True,
    write: bool = True,
    log: Callable[[str], Any] = print,
    reopen_report: bool = False,
    trust_remote_code: bool = False,
    verbose: bool = False,
    allow_overlap: bool = False,
    allow_public_benchmark: bool = False,
    evidence: bool = True,
    device: str = "cpu",
) -> SearchResult:
    """Search (or resume) to the budget, select, report, and write the run folder.

    `executor` may be given (tests, embedding); otherwise one is made from workers/ray_address.
    `evaluator` is a "module:callable" plugged into the worker instead of lm-eval (see executors/worker.py).
    A resumed study keeps the budget settings it was made with except those set by `space.with_overrides`
    (the CLI's flags); `reopen_report` allows extending a study whose report split was already evaluated;
    `trust_remote_code` accepts sources with their own code (config `auto_map`), refused otherwise;
    `verbose` lets transformers, datasets and lm-eval show their own bars and warnings.
    """
    from evomerge.search.study import create_study, default_storage, resume_settings

    t0 = time.perf_counter()
    out = Path(out)
    own_executor = executor is None
    device = _search_device(device, workers, ray_address)
    worker, record = None, None
    if own_executor:
        worker, record = preflight(space, evaluator=evaluator, threads=threads_per_worker,  # before anything is on disk
                                   trust_remote_code=trust_remote_code, verbose=verbose, allow_overlap=allow_overlap,
                                   allow_public_benchmark=allow_public_benchmark, evidence=evidence,
                                   # Ray workers build their own; the driver's check model stays on the CPU
                                   device=device if workers == 1 and not ray_address else "cpu")
    prepare_out(out, storage_given=storage is not None)
    storage = storage or default_storage(out)
    space, notes = resume_settings(space, storage, reopen_report=reopen_report)
    for note in notes:
        log(note)
    study, info = create_study(space, storage, workers=max(workers, getattr(executor, "slots", 1)), record=record)
    if info["requeued"]:
        log(f"evomerge: resumed; trials {info['requeued']} were interrupted and will run again")
    elif info["resumed"]:
        log("evomerge: resumed the study in " + storage)
    if own_executor:
        from evomerge.executors import make_executor

        spec = worker_spec(space, evaluator=evaluator, trust_remote_code=trust_remote_code, verbose=verbose,
                           device=device)
        local = workers == 1 and not ray_address
        executor = make_executor(spec, workers, ray_address, trial_timeout, threads_per_worker=threads_per_worker,
                                 **({"worker": worker} if local else {}))
        worker = None  # the in-process executor adopted it; Ray workers build their own
    try:
        stats = optimize(study, space, executor, progress=progress, log=log)
        info.update(stats)
        winner, cands = (None, [])
        if select:
            winner, cands = select_and_report(study, space, executor, log=log, progress=progress, evidence=evidence)
    finally:
        if own_executor:
            executor.close()
    result = SearchResult(study, space, out, winner, cands, time.perf_counter() - t0, info)
    if write:
        from evomerge.search.report import write_run

        write_run(result, storage=storage, evidence=evidence)
    return result


def _search_device(device: str, workers: int, ray_address: str | None) -> str:
    """The device trials run on. In process: checked against this machine (`auto` resolved). With Ray,
    each actor takes one GPU of its node when the device is cuda (so cuda:N cannot be honoured), and the
    cluster's GPUs are checked when the actors are placed, not on this machine."""
    from evomerge.engine.execution import resolve_device

    if workers == 1 and not ray_address:
        return resolve_device(device)
    if device.startswith("cuda:"):
        raise ConfigError(f"--device {device} with Ray: each actor takes one GPU of its node", where="--device",
                          fix="use --device cuda (one GPU per worker) or run in process (--workers 1)")
    if device not in ("cpu", "cuda", "auto"):
        raise ConfigError(f"unknown device {device!r}", where="--device", fix="use cpu, cuda or auto")
    return device


def preflight(space: SearchSpace, *, evaluator: str | None = None, threads: int | None = None,
              trust_remote_code: bool = False, verbose: bool = False, allow_overlap: bool = False,
              allow_public_benchmark: bool = False, evidence: bool = True, device: str = "cpu"):
    """Every check that needs no search, before anything is written: the objective is not a public
    benchmark's test set (unless allowed), the sources agree, every method's baseline plans, every task
    resolves, every split is non-empty and large enough for the search limit, no item occurs in two
    splits or two tasks (the overlap audit, unless allowed), and every metric exists (a one-item dry run
    on the first model). Returns the set-up worker (its model and tasks are built; the in-process
    executor adopts it) and the protocol record (with the audit's findings)."""
    from evomerge.evaluation.benchmarks import public_benchmarks
    from evomerge.engine.checkpoints import Sources
    from evomerge.engine.plan import plan
    from evomerge.executors.worker import Worker
    from evomerge.moe.build import plan_moe
    from evomerge.moe.config import MoEConfig
    from evomerge.search.record import protocol_record
    from evomerge.search.score import ScoreError, task_values
    from evomerge.search.suggest import baseline_params, build_recipe

    src = space.path or "space"
    public = public_benchmarks([t.task for t in space.objective.tasks])
    if public and not allow_public_benchmark:
        i = next(i for i, t in enumerate(space.objective.tasks) if t.task == public[0][0])
        listing = ", ".join(f"{t} ({fam})" for t, fam in public)
        raise ConfigError(f"the objective searches on public benchmark test sets: {listing}; a recipe tuned on them "
                          "overfits them, and the parents may have seen their items", where=f"{src}: objective.tasks[{i}].task",
                          fix="search on held-out data of your own (any lm-eval task over your JSONL), or pass "
                              "--allow-public-benchmark-contamination (the report marks the run)")
    audit: dict = {"public_benchmarks": [list(p) for p in public], "overlap": None}
    fields: dict[str, str] = {}
    for i, m in enumerate(space.models):
        fields.setdefault(m.path, f"{src}: models[{i}]")
    if space.base is not None:
        fields.setdefault(space.base.path, f"{src}: base_model")
    sources = Sources.open(fields)
    try:
        sources.check_compatible()
        sources.check_custom_code(allowed=trust_remote_code, flag="--trust-remote-code")
        for label, params in baseline_params(space):
            recipe = build_recipe(space, params)
            if isinstance(recipe, MoEConfig):
                try:
                    plan_moe(recipe, sources, source=f"{src} ({label})")
                except ConfigError as exc:
                    raise ConfigError(exc.what, where=exc.where if exc.where and exc.where.startswith(src)
                                      else f"{src}: parameters.moe ({label}: {exc.where})", fix=exc.fix) from None
            else:
                plan(recipe, sources)
    finally:
        sources.close()
    worker = Worker(worker_spec(space, evaluator=evaluator, threads=threads, trust_remote_code=trust_remote_code,
                                verbose=verbose, device=device))
    try:
        worker.setup()
        ev = worker.evaluator
        if hasattr(ev, "sizes"):
            _check_sizes(space, ev, src)
        if hasattr(ev, "higher_is_better"):
            _check_directions(space, ev.higher_is_better("search"), src)
        from evomerge.search.fitness import check_tasks

        check_tasks(ev, space.objective, space.budget.fitness_mode, src)
        if evidence and hasattr(ev, "audit_items"):
            audit["overlap"] = _overlap_audit(ev.audit_items(), allow_overlap, src)
        result = ev.evaluate(worker.model, "search", limit=1, seed=space.budget.seed)
    except ConfigError as exc:
        raise _at_task(exc, space, src) from None
    try:
        task_values(result.metrics, space.objective, "search")
    except ScoreError as exc:
        i, task = next(((i, t) for i, t in enumerate(space.objective.tasks) if repr(t.task) in str(exc)),
                       (0, space.objective.tasks[0]))
        raise ConfigError(f"the one-item dry run found no usable metric: {exc}",
                          where=f"{src}: objective.tasks[{i}].metric",
                          fix=f"name a metric that task {task.task!r} reports (the list above)") from None
    record = protocol_record(space, worker.evaluator)
    record["audit"] = audit
    return worker, record


def _overlap_audit(items: list, allowed: bool, src: str) -> dict:
    """Duplicates and near-duplicates across splits and tasks: refused unless `allowed`."""
    from evomerge.evaluation import overlap

    found = overlap.find(items)
    if found and not allowed:
        raise ConfigError(f"{len(found)}{'+' if len(found) >= 100 else ''} item(s) occur in two splits or two tasks "
                          f"(same content, or a shared run of {overlap.NGRAM}+ words):\n{overlap.table(found)}\n",
                          where=f"{src}: objective",
                          fix="remove the duplicates from the task data (or carve un-split tasks), or pass "
                              "--allow-overlap (the report says so)")
    return {"items": len(items), "ngram": overlap.NGRAM, "found": [f.as_dict() for f in found[:20]],
            "n_found": len(found), "allowed": allowed}


def validate_space(path: str | Path, *, trust_remote_code: bool = False, allow_overlap: bool = False,
                   allow_public_benchmark: bool = False) -> str:
    """`evomerge validate SPACE`: the whole pre-flight, then the objective as text (tasks, metrics, split
    sizes, protocol). Writes nothing."""
    from evomerge.search.fitness import describe
    from evomerge.search.record import protocol_lines, splits_text
    from evomerge.search.space import load_space

    space = load_space(path)
    _, record = preflight(space, trust_remote_code=trust_remote_code, allow_overlap=allow_overlap,
                          allow_public_benchmark=allow_public_benchmark)
    obj = space.objective
    lines = [f"ok: {path}",
             f"  models      {', '.join(m.name for m in space.models)}; methods {', '.join(space.method_names)}",
             "  objective   " + ", ".join(f"{t.task}/{t.metric} x{t.weight:g}" for t in obj.tasks),
             f"  splits      {splits_text(space)}",
             f"  fitness     {describe(space.budget, len(obj.tasks))}"]
    lines += [f"  {line}" for line in protocol_lines(record)]
    return "\n".join(lines)


def _check_sizes(space: SearchSpace, ev, src: str) -> None:
    from evomerge.evaluation.splits import ROLES

    b = space.budget
    for role in ROLES:
        for task, n in ev.sizes(role).items():
            if n == 0:
                raise ConfigError(f"the {role} split of task {task!r} is empty", where=f"{src}: objective.splits",
                                  fix="give the task more items, or a larger share to that split")
            if role == "search" and b.limit is not None and n < b.limit:
                raise ConfigError(f"the search split of task {task!r} has {n} items, fewer than search.limit {b.limit}",
                                  where=f"{src}: search.limit",
                                  fix=f"use search.limit {n} or less, or give the search split a larger share")


def _check_directions(space: SearchSpace, hib: dict[str, dict[str, bool]], src: str) -> None:
    """A task's metric optimised the wrong way round (perplexity maximised) is a set-up mistake."""
    for i, t in enumerate(space.objective.tasks):
        leaf = hib.get(space.objective.splits.task_name(t.task, "search"), {})
        if t.metric in leaf and leaf[t.metric] != (t.direction == "maximize"):
            way = "higher" if leaf[t.metric] else "lower"
            want = "maximize" if leaf[t.metric] else "minimize"
            raise ConfigError(f"task {t.task!r} says {way} {t.metric} is better, but the objective would "
                              f"{t.direction} it", where=f"{src}: objective.tasks[{i}].direction",
                              fix=f"set direction: {want} (or leave it out for a metric where higher is better)")


def _at_task(exc: ConfigError, space: SearchSpace, src: str) -> ConfigError:
    """Point an evaluator's error about a task at the task's entry in the space file."""
    if exc.where and exc.where.startswith(f"{src}: "):  # already names its field in the space file
        return exc
    for i, t in enumerate(space.objective.tasks):
        if f"{t.task!r}" in exc.what or f"'{t.task}_" in exc.what:
            return ConfigError(exc.what, where=f"{src}: objective.tasks[{i}].task", fix=exc.fix)
    if exc.where.startswith("objective."):  # a field of the space file
        return ConfigError(exc.what, where=f"{src}: {exc.where}", fix=exc.fix)
    return exc


def check_storage_url(url: str) -> None:
    """A --storage URL that SQLAlchemy can open (its dialect is installed), before anything is written."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError, NoSuchModuleError

    try:
        make_url(url).get_dialect().import_dbapi()  # the driver too (postgresql needs psycopg2, ...)
    except (ArgumentError, NoSuchModuleError, ValueError, ImportError) as exc:
        raise ConfigError(f"not a usable database URL ({str(exc).splitlines()[0]})", where=f"--storage {url}",
                          fix="omit --storage (sqlite in the run folder), or give e.g. sqlite:///runs/x/study.db "
                              "or postgresql://user@host/db with its driver installed") from None


def run_search_cli(args) -> int:
    """`evomerge search SPACE [flags]`: load, apply flag overrides, run, print the summary."""
    from evomerge.search.space import load_space

    space = load_space(args.space)
    flags = {k: getattr(args, k, None) for k in ("trials", "sampler", "seed", "pruner", "top_k", "limit")}
    space = space.with_overrides(**flags)
    out = Path(args.out) if getattr(args, "out", None) else Path("runs") / space.name
    if args.workers is not None and args.workers < 1:
        raise ConfigError("--workers must be at least 1", where="--workers", fix="use --workers 1 or more")
    if args.trial_timeout is not None and args.trial_timeout <= 0:
        raise ConfigError(f"--trial-timeout must be a positive number of seconds, got {args.trial_timeout:g}",
                          where="--trial-timeout", fix="omit it (no limit) or give e.g. --trial-timeout 600")
    if args.threads_per_worker is not None and args.threads_per_worker < 1:
        raise ConfigError(f"--threads-per-worker must be at least 1, got {args.threads_per_worker}",
                          where="--threads-per-worker", fix="omit it, or give 1 or more")
    if args.storage:
        check_storage_url(args.storage)
    result = run_search(
        space,
        out,
        storage=args.storage,
        workers=args.workers or 1,
        ray_address=args.ray_address,
        trial_timeout=args.trial_timeout,
        threads_per_worker=args.threads_per_worker,
        evaluator=getattr(args, "evaluator", None),
        progress=not args.no_progress,
        reopen_report=getattr(args, "reopen_report", False),
        trust_remote_code=getattr(args, "trust_remote_code", False),
        verbose=getattr(args, "verbose", False),
        allow_overlap=getattr(args, "allow_overlap", False),
        allow_public_benchmark=getattr(args, "allow_public_benchmark_contamination", False),
        evidence=not getattr(args, "no_evidence", False),
        device=getattr(args, "device", None) or "cpu",
    )
    from evomerge.search.report import summary

    print(summary(result))
    return 0
