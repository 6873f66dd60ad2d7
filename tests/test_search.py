"""The search loop over a fake executor (fast, deterministic): budget, baselines first, FAIL trials,
seeded replay, resume after an abandoned RUNNING trial, pruning, multi-objective, parallel slots.

The fake scores a recipe with a known smooth function of its numbers, so the tests can assert what the
search must find. The real engine and toy family are exercised in tests/test_cli_search.py."""

from __future__ import annotations

import json
import math
import os
import textwrap

import optuna
import pytest

from evomerge.errors import ConfigError, EvomergeError
from evomerge.search.run import run_search
from evomerge.search.spacefile import load_space
from evomerge.search.study import INTERRUPTED, create_study, default_storage, load_run_study
from evomerge.executors.worker import TrialOutcome
from test_space import make_models


def numbers(recipe: dict) -> list[float]:
    """Every number in a recipe's parameters (gradients and filters flattened)."""
    out = []

    def walk(x):
        if isinstance(x, bool):
            return
        if isinstance(x, (int, float)):
            out.append(float(x))
        elif isinstance(x, list):
            for e in x:
                walk(e)
        elif isinstance(x, dict):
            for k, v in x.items():
                if k != "filter":
                    walk(v)

    walk(recipe.get("parameters") or {})
    for m in recipe.get("models") or []:
        walk(m.get("parameters") or {})
    return out


def fake_metrics(recipe: dict, split: str, limit) -> dict:
    """add peaks at mean value 0.2, rev at 0.6 (mixture optimum at 0.4, not the baseline's 0.5; a spread
    across layers helps a little); select/report are
    shifted a little so the splits disagree slightly, as real held-out data do."""
    xs = numbers(recipe)
    m = sum(xs) / len(xs)
    shift = {"search": 0.0, "select": 0.01, "report": -0.01}.get(split, 0.0)
    spread = sum((x - m) ** 2 for x in xs) / len(xs)
    add = 1 - (m - 0.2) ** 2 - 0.5 * spread + shift
    rev = 1 - (m - 0.6) ** 2 + 0.3 * spread + shift
    if limit is not None:
        add, rev = add - 0.001, rev - 0.001
    return {f"toy_add_{split}": {"exact_match,none": add}, f"toy_rev_{split}": {"exact_match,none": rev}}


class FakeExecutor:
    """Protocol-conforming executor; `slots` > 1 returns outcomes in reverse submission order."""

    def __init__(self, slots: int = 1, fail_when=None, nan_when=None):
        self.slots = slots
        self.queue = []
        self.jobs = []
        self.fail_when = fail_when
        self.nan_when = nan_when
        self.closed = False

    def submit(self, job):
        assert len(self.queue) < self.slots, "submitted more jobs than slots"
        self.queue.append(job)
        self.jobs.append(job)

    def wait(self, timeout=None):
        if not self.queue:
            return []
        batch = list(reversed(self.queue))
        self.queue = []
        out = []
        for job in batch:
            error, metrics = None, None
            if self.fail_when and self.fail_when(job.recipe):
                error = "merge: ConfigError: planted bad candidate"
            else:
                metrics = fake_metrics(job.recipe, job.split, job.limit)
                if self.nan_when and self.nan_when(job.recipe):
                    metrics[f"toy_add_{job.split}"]["exact_match,none"] = math.nan
            out.append(TrialOutcome(job.number, metrics, error, {"merge": 0.001, "eval": 0.002, "total": 0.003},
                                    "node", os.getpid(), tag=job.tag))
        return out

    def close(self):
        self.closed = True


SPACE = """
models: [models/add, models/rev]
base_model: models/base
method: slerp
parameters:
  slerp:
    t: {points: 2}
objective:
  tasks: [toy_add, toy_rev]
search: {trials: 16, seed: 0, top_k: 3}
"""


def make_space(tmp_path, text=SPACE, **overrides):
    make_models(tmp_path)
    p = tmp_path / "space.yaml"
    p.write_text(textwrap.dedent(text))
    return load_space(p).with_overrides(**overrides)


def completed(study):
    return [t for t in study.get_trials() if t.state == optuna.trial.TrialState.COMPLETE]


def test_search_runs_budget_and_writes_run_folder(tmp_path):
    space = make_space(tmp_path)
    ex = FakeExecutor()
    result = run_search(space, tmp_path / "run", executor=ex, progress=False)
    study = result.study
    assert len(study.trials) == 16 and len(completed(study)) == 16
    first = study.trials[0]
    assert first.user_attrs["role"] == "baseline:slerp"
    assert set(first.params.values()) == {0.5}
    # the winner was chosen on select among the top-k and the baseline, and is never worse there
    base = next(c for c in result.candidates if c.label == "baseline:slerp")
    assert result.winner.scores["select"]["score"] >= base.scores["select"]["score"]
    assert result.winner.scores["select"]["score"] == max(
        c.scores["select"]["score"] for c in result.candidates if "select" in c.scores)
    # report scored once, for the winner, the baseline, the three parents and the naive merges (uniform
    # linear, TIES, DARE-TIES and DELLA defaults, task arithmetic with lambda tuned on the search split;
    # slerp is the baseline)
    report_jobs = [j for j in ex.jobs if j.split == "report"]
    assert len(report_jobs) == 1 + 1 + 3 + 5
    assert {c.label for c in result.candidates if c.label.startswith("naive:")} == {
        "naive:linear (uniform)", "naive:ties (mergekit defaults, density 0.5)",
        "naive:dare_ties (mergekit defaults, density 0.5)",
        "naive:della (mergekit defaults, density 0.5, epsilon 0.15)",
        "naive:task_arithmetic (lambda tuned on search)"}
    dare = next(c for c in result.candidates if c.label.startswith("naive:dare_ties"))
    assert dare.recipe.random_seed == space.budget.seed  # a seeded draw: the report's model is reproducible
    assert len([j for j in ex.jobs if j.tag == "naive"]) == 6  # the lambda grid, on the search split
    assert {c.label for c in result.candidates if "report" in c.scores} >= {"parent:add", "parent:rev", "parent:base"}
    for name in ("best.yaml", "trials.csv", "report.md", "plots/history.png", "plots/winner_curves.png"):
        assert (tmp_path / "run" / name).is_file(), name
    best = (tmp_path / "run" / "best.yaml").read_text()
    assert f"trial: {result.winner.trial}" in best and "sha256" in best
    from evomerge.engine.recipe import MergeRecipe

    assert MergeRecipe.from_yaml(best) == result.winner.recipe
    assert ex.closed is False  # an injected executor belongs to the caller
    # a second identical invocation re-scores nothing (select/report cached in the study)
    ex2 = FakeExecutor()
    again = run_search(space, tmp_path / "run", executor=ex2, progress=False)
    assert ex2.jobs == [] and again.winner.trial == result.winner.trial


def test_failures_become_fail_trials_and_search_finishes(tmp_path):
    space = make_space(tmp_path, sampler="random")
    ex = FakeExecutor(fail_when=lambda r: numbers(r)[0] > 0.7, nan_when=lambda r: numbers(r)[0] < 0.15)
    result = run_search(space, tmp_path / "run", executor=ex, progress=False)
    states = [t.state for t in result.study.trials]
    fails = [t for t in result.study.trials if t.state == optuna.trial.TrialState.FAIL]
    assert len(states) == 16 and fails, "the planted candidates were drawn"
    reasons = {t.user_attrs["fail_reason"].split(":")[0] for t in fails}
    assert reasons <= {"merge", "score"}
    assert any("planted" in t.user_attrs["fail_reason"] for t in fails)
    assert all(t.user_attrs["fail_reason"].startswith("score") for t in fails if t.params["slerp.t.0"] < 0.15)
    assert result.winner is not None
    assert "planted bad candidate" in (tmp_path / "run" / "report.md").read_text()


def test_same_seed_replays_same_trials(tmp_path):
    runs = []
    for i in range(2):
        space = make_space(tmp_path, trials=8)
        r = run_search(space, tmp_path / f"run{i}", executor=FakeExecutor(), progress=False, select=False,
                       write=False)
        runs.append([t.params for t in r.study.trials])
    assert runs[0] == runs[1]
    other = run_search(make_space(tmp_path, trials=8, seed=1), tmp_path / "run-seed1", executor=FakeExecutor(),
                       progress=False, select=False, write=False)
    assert [t.params for t in other.study.trials][1:] != runs[0][1:]


def test_resume_fails_abandoned_running_trial_and_completes_budget(tmp_path):
    space = make_space(tmp_path, trials=6)
    out = tmp_path / "run"
    run_search(space, out, executor=FakeExecutor(), progress=False, select=False, write=False)
    # a killed process leaves a RUNNING trial behind
    study, _ = create_study(space.with_overrides(trials=10), default_storage(out))
    orphan = study.ask()
    orphan_params = {"slerp.t.0": orphan.suggest_float("slerp.t.0", 0, 1), "slerp.t.1": orphan.suggest_float("slerp.t.1", 0, 1)}
    logs = []
    result = run_search(space.with_overrides(trials=10), out, executor=FakeExecutor(), progress=False,
                        select=False, write=False, log=logs.append)
    trials = result.study.trials
    assert trials[orphan.number].state == optuna.trial.TrialState.FAIL
    assert result.study.user_attrs[INTERRUPTED] == [orphan.number]
    done = completed(result.study)
    assert len(done) == 10  # the interrupted trial does not eat the budget
    assert any(t.params == orphan_params for t in done)  # ...and it was redone
    assert len({json.dumps(t.params, sort_keys=True) for t in done}) == 10  # no duplicates
    assert any("interrupted" in line for line in logs)


def test_resume_refuses_a_different_space(tmp_path):
    out = tmp_path / "run"
    run_search(make_space(tmp_path, trials=2), out, executor=FakeExecutor(), progress=False, select=False,
               write=False)
    other = make_space(tmp_path, SPACE.replace("points: 2", "points: 3"), trials=2)
    with pytest.raises(ConfigError, match="different search space"):
        run_search(other, out, executor=FakeExecutor(), progress=False)


def test_multi_objective_pareto(tmp_path):
    text = SPACE.replace("tasks: [toy_add, toy_rev]", "tasks: [toy_add, toy_rev]\n  multi_objective: true")
    space = make_space(tmp_path, text, trials=12)
    result = run_search(space, tmp_path / "run", executor=FakeExecutor(), progress=False)
    assert result.study.user_attrs["sampler"] == "nsga2"
    assert len(result.study.directions) == 2
    assert result.winner is not None
    assert (tmp_path / "run" / "plots" / "pareto.png").is_file()


def test_gp_sampler_runs_after_its_random_start(tmp_path):
    """`sampler: gp` (Gaussian-process Bayesian optimisation): the baseline and the random start, then
    trials the GP proposes; the same seed proposes the same trials."""
    import optuna

    runs = []
    for name in ("a", "b"):
        space = make_space(tmp_path, trials=14, sampler="gp", seed=3)
        result = run_search(space, tmp_path / name, executor=FakeExecutor(), progress=False, select=False,
                            write=False)
        assert isinstance(result.study.sampler, optuna.samplers.GPSampler)
        assert result.study.user_attrs["sampler"] == "gp" and len(completed(result.study)) == 14
        runs.append([t.params for t in result.study.trials])
    assert runs[0] == runs[1]


class ShuffledExecutor(FakeExecutor):
    """Returns a seeded random part of what is in flight on each wait: workers finishing in any order."""

    def __init__(self, slots: int, order_seed: int):
        super().__init__(slots=slots)
        import random

        self.rng = random.Random(order_seed)

    def wait(self, timeout=None):
        if not self.queue:
            return []
        self.rng.shuffle(self.queue)
        keep = self.rng.randrange(len(self.queue))
        held, self.queue = self.queue[:keep], self.queue[keep:]
        out = super().wait(timeout)
        self.queue = held
        return out


def test_batch_mode_gives_the_same_trials_whatever_the_slots_and_the_order(tmp_path):
    """`search.batch`: rounds of B trials told in trial order; the same seed gives the same trials with 1, 2
    or 3 workers finishing in any order."""
    runs = []
    for i, (slots, order) in enumerate([(1, 0), (2, 1), (3, 2), (3, 7)]):
        (tmp_path / str(i)).mkdir()
        space = make_space(tmp_path / str(i), trials=12, sampler="tpe", seed=5, batch=3)
        result = run_search(space, tmp_path / f"run{i}", executor=ShuffledExecutor(slots, order), progress=False,
                            select=False, write=False)
        runs.append([(t.params, t.state, t.values) for t in result.study.trials])
    assert len(runs[0]) == 12 and all(r == runs[0] for r in runs)
    # the setting is the study's: a resume keeps it
    assert load_study_of(tmp_path / "run0").user_attrs["budget"]["batch"] == 3


def test_parallel_slots_out_of_order(tmp_path):
    space = make_space(tmp_path, trials=12, sampler="tpe")
    ex = FakeExecutor(slots=3)
    result = run_search(space, tmp_path / "run", executor=ex, progress=False, select=False, write=False)
    assert len(completed(result.study)) == 12
    assert len({j.number for j in ex.jobs}) == 12


def test_grid_caps_budget_at_grid_size(tmp_path):
    text = SPACE.replace("points: 2", "points: 1").replace("search: {", "search: {grid_points: 4, sampler: grid, ")
    space = make_space(tmp_path, text, trials=50)
    result = run_search(space, tmp_path / "run", executor=FakeExecutor(), progress=False, select=False, write=False)
    values = sorted(t.params["slerp.t"] for t in result.study.trials)
    assert values == pytest.approx([0, 1 / 3, 2 / 3, 1])


def test_a_broken_setup_stops_early(tmp_path):
    space = make_space(tmp_path, trials=16)
    ex = FakeExecutor(fail_when=lambda r: True)
    with pytest.raises(EvomergeError) as err:
        run_search(space, tmp_path / "run", executor=ex, progress=False)
    assert "first 3 trials all failed" in str(err.value) and "planted" in str(err.value)
    assert len(ex.jobs) == 3


def test_the_study_takes_the_spaces_name_and_a_legacy_study_still_resumes(tmp_path):
    space = make_space(tmp_path, trials=3)
    result = run_search(space, tmp_path / "new", executor=FakeExecutor(), progress=False, select=False, write=False)
    assert result.study.study_name == space.name == load_run_study(default_storage(tmp_path / "new")).study_name
    # a run made before studies took their space's name: its study is called "evomerge", and resumes
    old = tmp_path / "old"
    old.mkdir()
    create_study(space.with_overrides(trials=2), default_storage(old), study_name="evomerge")
    again = run_search(space, old, executor=FakeExecutor(), progress=False, select=False, write=False)
    assert again.study.study_name == "evomerge" and len(again.study.trials) == 3
    assert optuna.study.get_all_study_names(default_storage(old)) == ["evomerge"]


def test_resume_keeps_the_studys_settings_unless_a_flag_overrides(tmp_path):
    """Re-running without flags keeps the budget and sampler the study was made with (the space file
    says trials 16, sampler auto); an explicit flag wins and says so."""
    out = tmp_path / "run"
    run_search(make_space(tmp_path, trials=4, sampler="random"), out, executor=FakeExecutor(), progress=False,
               select=False, write=False)
    logs = []
    again = run_search(make_space(tmp_path), out, executor=FakeExecutor(), progress=False, select=False,
                       write=False, log=logs.append)
    assert len(again.study.trials) == 4 and again.space.budget.sampler == "random"
    assert again.study.user_attrs["sampler"] == "random"
    assert any("the study's trials 4 (the space file says 16; pass --trials 16" in line for line in logs), logs
    assert any("the study's sampler random (the space file says auto" in line for line in logs), logs
    logs.clear()
    more = run_search(make_space(tmp_path, trials=6), out, executor=FakeExecutor(), progress=False, select=False,
                      write=False, log=logs.append)
    assert len(completed(more.study)) == 6 and more.space.budget.sampler == "random"
    assert any("--trials 6 overrides the study's trials 4" in line for line in logs), logs
    # the override is remembered: the next plain re-run keeps 6, not the file's 16 nor the first 4
    again = run_search(make_space(tmp_path), out, executor=FakeExecutor(), progress=False, select=False,
                       write=False, log=logs.append)
    assert len(again.study.trials) == 6 and again.space.budget.trials == 6


def test_extending_a_reported_study_is_refused_unless_reopened(tmp_path):
    """Once the report split has been evaluated, more trials could crown another winner and look at the
    report items again: refused before any trial (nothing changes), allowed with reopen_report, and
    the report then says the report split was evaluated twice."""
    out = tmp_path / "run"
    first = run_search(make_space(tmp_path, trials=4), out, executor=FakeExecutor(), progress=False)
    assert len(first.study.user_attrs["report_evaluations"]) == 1
    with pytest.raises(ConfigError, match="report split of this run was already evaluated") as err:
        run_search(make_space(tmp_path, trials=8), out, executor=FakeExecutor(), progress=False)
    assert "--reopen-report" in err.value.fix and "4 more trial(s)" in str(err.value)
    assert len(load_study_of(out).trials) == 4
    with pytest.raises(ConfigError, match="top-k 1 instead of 3"):
        run_search(make_space(tmp_path, top_k=1), out, executor=FakeExecutor(), progress=False)
    ex = FakeExecutor()
    run_search(make_space(tmp_path), out, executor=ex, progress=False)  # same budget: nothing re-scored
    assert ex.jobs == []
    # a new winner is reported again, and the report says so
    reopened = run_search(make_space(tmp_path, trials=16), out, executor=FakeExecutor(), progress=False,
                          reopen_report=True)
    log = reopened.study.user_attrs["report_evaluations"]
    report = (out / "report.md").read_text()
    assert reopened.winner.trial != first.winner.trial  # seeded: trials 4-15 hold a better candidate
    assert len(log) == 2 and "looked at 2 times" in report


def load_study_of(out):
    return load_run_study(default_storage(out))


def test_identical_candidates_are_not_scored_twice(tmp_path):
    """A proposal whose recipe equals a finished trial's reuses its score (never reaching a worker),
    records the trial it came from, and says so in trials.csv, report.md and the summary."""
    from evomerge.search.loop import recipe_key
    from evomerge.search.report import summary
    from evomerge.search.suggest import build_recipe

    space = make_space(tmp_path, trials=3, sampler="random")
    out = tmp_path / "run"
    first = run_search(space, out, executor=FakeExecutor(), progress=False, select=False, write=False)
    done = completed(first.study)
    # the next proposal is pinned to a finished trial's parameters: it must not reach the executor
    twin = done[1]
    first.study.enqueue_trial(twin.params)
    ex = FakeExecutor()
    logs = []
    again = run_search(space.with_overrides(trials=4), out, executor=ex, progress=False, log=logs.append)
    assert [j for j in ex.jobs if j.split == "search" and j.tag != "naive"] == []  # (naive: the report's lambda grid)
    last = again.study.trials[-1]
    assert last.user_attrs["reused_from"] == twin.number and last.value == twin.value
    assert last.user_attrs["recipe_key"] == recipe_key(build_recipe(space, twin.params).to_dict())
    assert again.info["reused"] == 1
    assert "1 reused the score of an identical recipe" in summary(again)
    assert "1 reused the score of an identical, earlier recipe" in (out / "report.md").read_text()
    rows = (out / "trials.csv").read_text().splitlines()
    header = rows[0].split(",")
    assert rows[-1].split(",")[header.index("reused_from")] == str(twin.number)
