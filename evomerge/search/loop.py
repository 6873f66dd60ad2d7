"""The trial loop: ask, suggest, build, submit, tell, until the budget of finished trials is reached.

Why it exists: this is the heart of `evomerge search` (`run.run_search` calls `optimize`). It owns the
order of events of the optimisation and nothing else:
- asynchronous ask/tell over an `Executor` (as many trials in flight as it has slots), or with
  `search.batch: B` synchronous rounds: B trials asked, every job of the round scored (on however many
  workers), and the outcomes told in trial order, so the same seed gives the same trials whatever the
  worker count and timing (a fidelity rung's next jobs form the next round);
- a failed trial (the worker's error, a missing or NaN metric, a recipe the engine refuses) becomes a
  FAIL trial with its reason in the `fail_reason` user attribute, and the search goes on;
- the fitness (`fitness.TrialFitness`): every item of the limit, item-count rungs whose values are
  reported as intermediate values so that the pruner may stop a trial after any rung but the last, or
  an estimate from anchor items chosen before the first trial;
- a recipe scored before (the same merge) is not merged again: its score is reused;
- the budget counts finished trials in storage, so running the same command again resumes it; an
  interrupted run FAILs its trials in flight and enqueues them again.
Selection on held-out data comes after the loop (`selection.py`).
"""

from __future__ import annotations

import json
import math
from typing import Any, Callable

from evomerge.errors import EvomergeError
from evomerge.executors.worker import TrialOutcome
from evomerge.search.fitness import TrialFitness
from evomerge.search.jobs import short
from evomerge.search.progress import Progress
from evomerge.search.space import SearchSpace

RECIPE_KEY = "recipe_key"  # trial user attribute: hash of the recipe it merged (identical candidates)
REUSED_FROM = "reused_from"  # trial user attribute: the trial whose score an identical recipe reused


def optimize(study, space: SearchSpace, executor, *, progress: bool = True, log: Callable = print) -> dict:
    """Run trials until the budget (finished trials in storage) is reached. Returns counters."""
    return TrialLoop(study, space, executor, progress=progress, log=log).run()


class TrialLoop:
    """One run of the loop: the study, the space and the executor, the trials in flight and the counters."""

    def __init__(self, study, space: SearchSpace, executor, *, progress: bool = True, log: Callable = print):
        from evomerge.search.study import finished_count, grid_size

        self.study, self.space, self.executor = study, space, executor
        self.target = space.budget.trials
        if study.user_attrs.get("sampler") == "grid":
            self.target = min(self.target, grid_size(space))
        self.fit = TrialFitness(space, study, executor, log)
        self.done = finished_count(study)
        self.bar = Progress(progress, self.target, min(self.done, self.target))
        self.live: dict[int, Any] = {}  # trial number -> optuna Trial
        self.recipes: dict[int, dict] = {}  # trial number -> recipe dict (resubmitted after a low-fidelity score)
        self.stats = {"completed": 0, "failed": 0, "pruned": 0, "reused": 0, "invalid": 0}
        self.best = best_value(study)
        self.scored = scored_recipes(study, space)  # recipe key -> the COMPLETE trial that scored it
        self.batch = space.budget.batch  # None: asynchronous
        self.pending: list = []  # batch mode: the jobs of the next round

    def run(self) -> dict:
        try:
            while True:
                self._ask()
                if not self.live:
                    if self.done < self.target and self.executor.slots < 1:
                        raise EvomergeError("no worker is left to run trials (all were retired after failures)",
                                            where="executor", fix="check the worker logs; rerun to resume")
                    break
                for outcome in self._outcomes():
                    trial = self.live.get(outcome.number)
                    if trial is not None:  # None: not ours (cannot happen with our executors); ignore
                        self._receive(trial, outcome)
        except BaseException:
            self._requeue_live()
            raise
        finally:
            self.bar.close()
        return self.stats

    def _ask(self) -> None:
        """New trials: up to the executor's free slots (asynchronous), or a round of `batch` trials
        once the last round has finished (a trial told at once, reused or invalid, counts in its round)."""
        if self.batch is None:
            while len(self.live) < self.executor.slots and self.done + len(self.live) < self.target:
                self._start(self.study.ask())
        elif not self.live:
            for _ in range(min(self.batch, self.target - self.done)):
                self._start(self.study.ask())

    def _outcomes(self) -> list[TrialOutcome]:
        """The next outcomes to tell: whatever finished (asynchronous), or every job of the round, in
        trial order."""
        if self.batch is None:
            return self.executor.wait(None)
        from evomerge.search.jobs import each_outcome

        jobs, self.pending = self.pending, []
        return sorted(each_outcome(self.executor, jobs), key=lambda o: o.number)

    def _submit(self, job) -> None:
        if self.batch is None:
            self.executor.submit(job)
        else:
            self.pending.append(job)

    # -- a new trial ------------------------------------------------------------------------------
    def _start(self, trial) -> None:
        """Build the trial's recipe and submit its first job, or reuse the score of the same recipe."""
        from evomerge.search.suggest import build_recipe, suggest_params

        params = suggest_params(trial, self.space)
        try:
            recipe = build_recipe(self.space, params)
        except EvomergeError as exc:  # the sampler's choice is not a valid recipe (not a set-up error)
            self._fail(trial, f"recipe: {exc}")
            self.stats["invalid"] += 1
            self._finished()
            return
        key = recipe_key(recipe.to_dict())
        trial.set_user_attr(RECIPE_KEY, key)
        twin = self.scored.get(key)
        if twin is not None:  # the same recipe was scored already: reuse, do not merge again
            trial.set_user_attr(REUSED_FROM, twin["number"])
            trial.set_user_attr("tasks", twin["tasks"])
            values = twin["values"]
            self.study.tell(trial, values if len(values) > 1 else values[0])
            self.stats["completed"] += 1
            self.stats["reused"] += 1
            self._finished(values[0] if len(values) == 1 else None)
            return
        self.live[trial.number] = trial
        self.recipes[trial.number] = recipe.to_dict()
        self._submit(self.fit.job(trial.number, self.recipes[trial.number], 0))

    # -- an outcome -------------------------------------------------------------------------------
    def _receive(self, trial, outcome: TrialOutcome) -> None:
        finished, value = self._tell(trial, outcome)
        if finished and value is not None:
            self.scored.setdefault(trial.user_attrs.get(RECIPE_KEY), {
                "number": trial.number, "values": list(value) if isinstance(value, tuple) else [value],
                "tasks": trial.user_attrs.get("tasks", {})})
        if finished:
            del self.live[outcome.number]
            del self.recipes[outcome.number]
            self.fit.forget(outcome.number)
            self._finished(value)
        broken = self.stats["failed"] - self.stats["invalid"]
        if self.stats["completed"] == 0 and self.stats["pruned"] == 0 and broken >= min(3, self.target):
            # Nothing has worked yet: a broken set-up (tasks, tokenizer, models), not a bad
            # candidate. Stop instead of burning the budget on identical failures.
            reason = (outcome.error or "no metrics").splitlines()[0]
            raise EvomergeError(
                f"the first {broken} trials all failed; the last with: {reason}",
                where="search", fix="check the models, tasks and metric in the search space "
                "(trials.csv / the study hold every reason)",
            )

    def _tell(self, trial, outcome: TrialOutcome) -> tuple[bool, Any]:
        """Tell Optuna about one outcome (or submit the trial's next rung). Returns (finished, value told
        or None)."""
        from optuna.trial import TrialState

        from evomerge.search.score import ScoreError, score, task_values
        from evomerge.search.study import ROLE

        _add_costs(trial, outcome)
        if outcome.error is not None or outcome.metrics is None:
            self._fail(trial, outcome.error or "no metrics returned")
            return True, None
        try:
            metrics = self.fit.metrics(trial.number, outcome)
            value = score(metrics, self.space.objective, "search")
        except (ScoreError, ValueError) as exc:
            self._fail(trial, f"score: {exc}")
            return True, None
        values = value if isinstance(value, tuple) else (value,)
        if not all(math.isfinite(v) for v in values):
            self._fail(trial, f"score: non-finite value {value}")
            return True, None
        if not self.fit.last(outcome.tag):
            rung = int(outcome.tag.split(":")[1])
            trial.report(value, self.fit.rungs[rung][1])
            # a baseline is the reference the search must beat: always scored in full
            if not str(trial.user_attrs.get(ROLE, "")).startswith("baseline") and trial.should_prune():
                self.study.tell(trial, state=TrialState.PRUNED)
                self.stats["pruned"] += 1
                return True, None
            self._submit(self.fit.job(trial.number, self.recipes[trial.number], rung + 1))
            return False, None
        trial.set_user_attr("tasks", task_values(metrics, self.space.objective, "search"))
        self.study.tell(trial, list(values) if len(values) > 1 else values[0])
        self.stats["completed"] += 1
        return True, value

    # -- bookkeeping ------------------------------------------------------------------------------
    def _fail(self, trial, reason: str) -> None:
        from optuna.trial import TrialState

        from evomerge.search.study import FAIL_REASON

        trial.set_user_attr(FAIL_REASON, short(reason))
        self.study.tell(trial, state=TrialState.FAIL)
        self.stats["failed"] += 1

    def _finished(self, value=None) -> None:
        """One more finished trial: count it, and move the bar (with the best value so far)."""
        self.done += 1
        if isinstance(value, float) and (self.best is None or value > self.best):
            self.best = value
        self.bar.update(self.best, self.stats["failed"])

    def _requeue_live(self) -> None:
        """Ctrl-C or an abort: trials in flight did not finish. FAIL them now (a resume would do it
        too) and enqueue their parameters so the next run redoes them."""
        from optuna.trial import TrialState

        from evomerge.search.study import INTERRUPTED

        numbers = []
        for number, trial in self.live.items():
            try:
                self.study.tell(trial, state=TrialState.FAIL)
                self.study.enqueue_trial(trial.params, user_attrs={"role": trial.user_attrs.get("role", "retry"),
                                                                   "retry_of": number})
                numbers.append(number)
            except Exception:  # noqa: BLE001 - best effort on the way out
                pass
        if numbers:
            self.study.set_user_attr(INTERRUPTED, list(self.study.user_attrs.get(INTERRUPTED, [])) + numbers)


def _add_costs(trial, outcome: TrialOutcome) -> None:
    """Add an outcome's timings and item count to the trial's (summed over fidelity rungs)."""
    from evomerge.search.fitness import ITEMS_ATTR

    timings = dict(trial.user_attrs.get("timings") or {})
    for key, value in outcome.timings.items():
        timings[key] = round(timings.get(key, 0.0) + float(value), 4)
    timings["worker"] = f"{outcome.node}:{outcome.pid}"
    trial.set_user_attr("timings", timings)
    trial.set_user_attr(ITEMS_ATTR, int(trial.user_attrs.get(ITEMS_ATTR, 0)) + sum((outcome.samples or {}).values()))


def best_value(study) -> float | None:
    """The best single-objective value among the study's COMPLETE trials (None: none yet)."""
    from optuna.trial import TrialState

    values = [t.value for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
              if t.values is not None and len(t.values) == 1]
    return max(values) if values else None


def recipe_key(recipe: dict) -> str:
    """A stable hash of a recipe (after build_recipe's clipping and rounding): equal for equal merges."""
    import hashlib

    return hashlib.sha256(json.dumps(recipe, sort_keys=True, default=str).encode()).hexdigest()[:16]


def scored_recipes(study, space: SearchSpace) -> dict[str, dict]:
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
