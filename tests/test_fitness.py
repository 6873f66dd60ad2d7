"""Fitness from fewer items (`search.fitness`): rungs, anchors, their settings and their searches.

- the rung and anchor arithmetic against hand-computed values;
- lm-eval scores of some items (ranks, picks) are exactly those items' scores in a full-limit call;
- `fitness: fidelity`: a trial that reaches the last rung has exactly its full-limit value, pruned trials
  spent fewer items, a baseline is never pruned;
- `fitness: anchors`: the anchors are chosen once, stored in the study, reused on resume, and a trial
  spends only them;
- mistakes (a group task, a pruner with anchors, a missing rung) are refused before anything is written.
"""

from __future__ import annotations

import textwrap

import optuna
import pytest

from evomerge.errors import ConfigError
from evomerge.search.fitness import ANCHORS_ATTR, ITEMS_ATTR, ItemScores, anchor_plan, choose_anchors, rungs


# --- arithmetic ---------------------------------------------------------------------------------
def test_rungs_double_up_to_the_limit():
    assert rungs(8, 2, 64) == [(0, 8), (8, 16), (16, 32), (32, 64)]
    assert rungs(5, 3, 64) == [(0, 5), (5, 15), (15, 45), (45, 64)]
    assert rungs(8, 2, 9) == [(0, 8), (8, 9)]


def test_anchor_weights_are_group_shares_and_estimate_a_homogeneous_reference_exactly():
    # 4 answer patterns over 3 references: items 0-29, 30-49, 50-59 and 60-63
    matrix = [[1, 0, 0]] * 30 + [[0, 0, 0]] * 20 + [[1, 1, 0]] * 10 + [[0, 1, 1]] * 4
    picks, weights = choose_anchors(matrix, 8, seed=0)
    assert len(picks) == 8 and picks == sorted(picks) and abs(sum(weights) - 1) < 1e-12
    # shares of 8 anchors: 3.75, 2.5, 1.25, 0.5 -> floors 3, 2, 1, 0; the two left go to the largest
    # remainders (.75 of the 30, then .5 of the 20 before the .5 of the 4: groups in pattern order).
    # The 4 items with no anchor join the nearest pattern: (0,0,0) and (1,1,0) are both at distance 2,
    # the first in pattern order wins, so that group holds 24 items.
    group = lambda j: "a" if j < 30 else ("c" if 50 <= j < 60 else "b")  # noqa: E731
    got: dict[str, list[float]] = {}
    for j, w in zip(picks, weights):
        got.setdefault(group(j), []).append(w)
    assert got == {"a": [pytest.approx(30 / 64 / 4)] * 4, "b": [pytest.approx(24 / 64 / 3)] * 3,
                   "c": [pytest.approx(10 / 64)]}
    # reference 0 answers alike within every group (merged one included): its mean is estimated exactly;
    # reference 2 does not (the merged group mixes its 0s and 1s)
    estimate = lambda col: sum(w * matrix[j][col] for j, w in zip(picks, weights))  # noqa: E731
    assert estimate(0) == pytest.approx(40 / 64)


def test_anchors_with_at_most_k_patterns_are_exact_for_each_reference():
    matrix = [[1, 0]] * 16 + [[0, 1]] * 16 + [[1, 1]] * 8 + [[0, 0]] * 24
    picks, weights = choose_anchors(matrix, 8, seed=3)
    for col in (0, 1):
        exact = sum(row[col] for row in matrix) / len(matrix)
        assert sum(w * matrix[j][col] for j, w in zip(picks, weights)) == pytest.approx(exact)
    assert choose_anchors(matrix, 64, seed=0) == (list(range(64)), [1 / 64] * 64)


def test_anchor_plan_uses_kmeans_when_patterns_outnumber_anchors():
    import random

    rng = random.Random(0)
    refs = {f"r{i}": {"t": [float(rng.random() < 0.5) for _ in range(64)]} for i in range(6)}
    plan = anchor_plan(refs, 4, seed=0)
    assert len(plan["t"]["picks"]) == 4 and sum(plan["t"]["weights"]) == pytest.approx(1.0)
    assert plan == anchor_plan(refs, 4, seed=0)  # seeded
    with pytest.raises(ValueError, match="different numbers"):
        anchor_plan({"a": {"t": [1.0]}, "b": {"t": [1.0, 0.0]}}, 1, 0)


def test_item_scores_means_and_weighted():
    acc = ItemScores()
    acc.add({"t": {"m": [1.0, 0.0]}}, {"t": [4, 1]})
    acc.add({"t": {"m": [1.0]}}, {"t": [7]})
    assert sorted(acc.rows["t"]["m"]) == [1, 4, 7]
    assert acc.means() == {"t": {"m": pytest.approx(2 / 3)}}
    assert acc.weighted({"t": {"picks": [1, 7], "weights": [0.25, 0.75]}}) == {"t": {"m": 0.75}}


# --- lm-eval on some items ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def toy_worker():
    from evomerge.executors.worker import Worker
    from evomerge.search.jobs import worker_spec
    from evomerge.search.spacefile import load_space
    from pathlib import Path

    space = load_space(Path(__file__).resolve().parents[1] / "search_spaces" / "toy_task_arithmetic.yaml")
    w = Worker(worker_spec(space))
    w.setup()
    return space, w


def test_rungs_and_picks_score_exactly_the_full_limit_items(toy_worker):
    space, w = toy_worker
    ev, model = w.evaluator, w.model
    full = ev.evaluate(model, "search", limit=40, seed=3, per_item=True)
    acc = ItemScores()
    for r in rungs(5, 2, 40):
        part = ev.evaluate(model, "search", limit=40, seed=3, per_item=True, ranks=r)
        assert all(len(p) == r[1] - r[0] for p in part.positions.values())
        acc.add(part.items, part.positions)
    assert {t: len(r["exact_match"]) for t, r in acc.rows.items()} == full.samples  # every item, once
    for task, row in full.items.items():
        assert [acc.rows[task]["exact_match"][j] for j in range(40)] == row["exact_match"]  # same items, same scores
    assert acc.means() == {t: {"exact_match": m["exact_match"]} for t, m in full.metrics.items()}
    picks = {t: [0, 9, 39] for t in full.items}
    part = ev.evaluate(model, "search", limit=40, seed=3, per_item=True, picks=picks)
    for task, row in part.items.items():
        assert row["exact_match"] == [full.items[task]["exact_match"][j] for j in (0, 9, 39)]
    with pytest.raises(ConfigError, match="outside"):
        ev.evaluate(model, "search", limit=40, seed=3, picks={t: [40] for t in full.items})


def test_worker_does_not_merge_the_recipe_it_holds_again(toy_worker, monkeypatch):
    import torch

    import evomerge.engine.execution as engine_execution
    from evomerge.search.suggest import baseline_params, build_recipe, parent_recipes

    space, w = toy_worker
    a = build_recipe(space, baseline_params(space)[0][1]).to_dict()
    b = parent_recipes(space)[1][1].to_dict()
    calls = []
    real = engine_execution.merge_into
    monkeypatch.setattr(engine_execution, "merge_into", lambda *x, **k: (calls.append(1), real(*x, **k))[1])
    w.merge(a)
    held = {k: v.clone() for k, v in w.model.state_dict().items()}
    w.merge(a)  # the next rung of the same trial: nothing to write
    assert len(calls) == 1
    w.merge(b)
    w.merge(a)  # another recipe in between: merged again, to the same tensors
    assert len(calls) == 3
    assert all(torch.equal(held[k], v) for k, v in w.model.state_dict().items())


# --- searches -----------------------------------------------------------------------------------
SPACE = """
name: fit
models: [toy:up, toy:next, toy:rev, toy:sort]
base_model: toy:base
method: task_arithmetic
parameters:
  task_arithmetic:
    weight: {low: 0.0, high: 1.0}
    lambda: {low: 0.5, high: 1.5}
objective:
  tasks_dir: toy
  tasks: [toy_up, toy_next, toy_rev, toy_sort]
search: {trials: 14, sampler: random, seed: 0, limit: 32, top_k: 2, SETTINGS}
"""


def _space(tmp_path, settings: str):
    from evomerge.search.spacefile import load_space

    p = tmp_path / "space.yaml"
    p.write_text(textwrap.dedent(SPACE.replace("SETTINGS", settings)))
    return load_space(p)


def _full_value(worker, space, params) -> float:
    from evomerge.executors.worker import TrialJob
    from evomerge.search.score import score
    from evomerge.search.suggest import build_recipe

    out = worker.run(TrialJob(0, build_recipe(space, params).to_dict(), "search", space.budget.limit,
                              space.budget.seed))
    return score(out.metrics, space.objective, "search")


def test_fidelity_search_prunes_and_its_finished_trials_have_the_full_value(tmp_path, toy_worker):
    from evomerge.search.run import run_search
    from evomerge.search.study import ROLE

    space = _space(tmp_path, "fitness: fidelity, fidelity: {limit: 4}, pruner: successive_halving")
    result = run_search(space, tmp_path / "run", progress=False, select=False, write=False, evidence=False,
                        log=lambda *_: None)
    trials = result.study.trials
    done = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    pruned = [t for t in trials if t.state == optuna.trial.TrialState.PRUNED]
    assert pruned and done and len(done) + len(pruned) == 14
    _, worker = toy_worker
    for t in done[:4]:
        assert t.value == _full_value(worker, space, t.params)  # identical: the same items, the same mean
        assert t.user_attrs[ITEMS_ATTR] == 4 * 32
    for t in pruned:
        assert t.user_attrs[ITEMS_ATTR] == 4 * max(t.intermediate_values) < 4 * 32
    baseline = next(t for t in trials if str(t.user_attrs.get(ROLE, "")).startswith("baseline"))
    assert baseline.state == optuna.trial.TrialState.COMPLETE


def test_anchor_search_scores_only_anchors_and_reuses_them_on_resume(tmp_path):
    from evomerge.search.run import run_search

    space = _space(tmp_path, "fitness: anchors, anchors: {items: 3}")
    logs: list[str] = []
    result = run_search(space, tmp_path / "run", progress=False, select=False, write=False, evidence=False,
                        log=logs.append)
    plan = result.study.user_attrs[ANCHORS_ATTR]
    assert sorted(plan["references"]) == sorted(["parent:base", "parent:up", "parent:next", "parent:rev",
                                                 "parent:sort", "baseline:task_arithmetic",
                                                 "naive:linear (uniform)",
                                                 "naive:ties (mergekit defaults, density 0.5)"])
    assert plan["reference_items"] == 8 * 4 * 32
    assert all(len(p["picks"]) == 3 for p in plan["tasks"].values())
    assert any("3 per task" in line for line in logs)
    finished = [t for t in result.study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert all(t.user_attrs[ITEMS_ATTR] in (0, 12) for t in finished)  # 0: an identical recipe reused
    logs.clear()
    again = run_search(space.with_overrides(trials=16), tmp_path / "run", progress=False, write=False,
                       evidence=False, log=logs.append)
    assert again.study.user_attrs[ANCHORS_ATTR] == plan
    assert not any("anchor items" in line for line in logs)  # not chosen again
    assert again.winner is not None and again.winner.scores["report"]["score"] is not None


@pytest.mark.parametrize("settings, where, message", [
    ("fitness: fidelity, pruner: successive_halving", "search.fidelity", "first rung"),
    ("fitness: fidelity, fidelity: {limit: 4}", "search.pruner", "without a pruner"),
    ("fitness: anchors, pruner: median", "search.pruner", "no intermediate"),
    ("fitness: anchors, fidelity: {limit: 4}", "search.fidelity", "only used by fitness: fidelity"),
    ("fitness: full, anchors: {items: 4}", "search.anchors", "only used by fitness: anchors"),
    ("fitness: anchors, anchors: {items: 40}", "search.anchors.items", "more than search.limit"),
    ("fitness: anchors, anchors: {itmes: 4}", "search.anchors", "did you mean 'items'"),
    ("fitness: cheap", "search.fitness", "full"),
])
def test_fitness_mistakes_are_refused_with_the_field(tmp_path, settings, where, message):
    with pytest.raises(ConfigError) as err:
        _space(tmp_path, settings)
    text = str(err.value)
    assert where in text and message in text, text


def test_a_group_task_is_refused_before_anything_is_written(tmp_path):
    from evomerge.search.run import run_search

    body = SPACE.replace("tasks: [toy_up, toy_next, toy_rev, toy_sort]", "tasks: [toy]")
    p = tmp_path / "space.yaml"
    p.write_text(textwrap.dedent(body.replace("SETTINGS", "fitness: anchors")))
    from evomerge.search.spacefile import load_space

    with pytest.raises(ConfigError, match="is a group") as err:
        run_search(load_space(p), tmp_path / "run", progress=False, log=lambda *_: None)
    assert "objective.tasks[0].task" in str(err.value)
    assert not (tmp_path / "run").exists()


def _carved_space(tmp_path, tasks: str, settings: str):
    from localtasks import write_tasks

    from evomerge.search.spacefile import load_space

    d = write_tasks(tmp_path / "tasks")
    text = (d / "my_up.yaml").read_text()
    (d / "my_up_median.yaml").write_text(text.replace("task: my_up", "task: my_up_median")
                                         .replace("aggregation: mean", "aggregation: median"))
    p = tmp_path / "space.yaml"
    p.write_text("name: carved\nmodels: [toy:up, toy:rev]\nmethod: slerp\n"
                 "parameters: {slerp: {t: {low: 0.0, high: 1.0}}}\n"
                 f"objective:\n  tasks_dir: {d}\n  tasks: {tasks}\n"
                 f"search: {{trials: 6, sampler: random, seed: 0, limit: 16, top_k: 2, {settings}}}\n")
    return load_space(p)


def test_a_metric_that_is_not_a_mean_is_refused(tmp_path):
    from evomerge.search.run import run_search

    space = _carved_space(tmp_path, "[my_up_median]", "fitness: anchors, anchors: {items: 4}")
    with pytest.raises(ConfigError, match="not aggregated as a mean") as err:
        run_search(space, tmp_path / "run", progress=False, log=lambda *_: None)
    assert "objective.tasks[0].metric" in str(err.value)
    assert not (tmp_path / "run").exists()


def test_fidelity_on_carved_generation_and_multiple_choice_tasks(tmp_path):
    from evomerge.search.run import run_search

    space = _carved_space(tmp_path, "[{task: my_up, metric: exact_match}, {task: mc_easy, metric: acc_norm}]",
                          "fitness: fidelity, fidelity: {limit: 4}, pruner: median")
    result = run_search(space, tmp_path / "run", progress=False, select=False, write=False, evidence=False,
                        log=lambda *_: None)
    done = [t for t in result.study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert done and all(t.user_attrs[ITEMS_ATTR] == 2 * 16 for t in done)
    # the last rung's value is the full-limit value: score the first finished trial's recipe in full
    from evomerge.executors.worker import Worker
    from evomerge.search.jobs import worker_spec

    w = Worker(worker_spec(space))
    w.setup()
    assert done[0].value == _full_value(w, space, done[0].params)
