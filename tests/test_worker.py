"""The worker and the in-process executor on tiny random checkpoints with the real merge engine.

The evaluator is plugged in through `WorkerSpec.evaluator` (a "module:callable"), so these tests check
the worker's own contract fast: the resident model is loaded once and updated in place, every stage is
timed, and nothing a trial does (a bad recipe, an evaluator error, a NaN) raises out of `run`."""

from __future__ import annotations

import pickle

import pytest

from evomerge.evaluation.evaluate import EvalResult
from evomerge.executors import Executor, make_executor
from evomerge.executors.worker import TrialJob, Worker, WorkerSpec


class NormEvaluator:
    """Scores a model by a function of its first weight, so a merge visibly changes the score."""

    calls = 0

    def __init__(self, spec):
        self.spec = spec

    def evaluate(self, model, split, *, limit=None, seed=0):
        NormEvaluator.calls += 1
        if split == "boom":
            raise RuntimeError("evaluator exploded")
        w = next(model.parameters())
        value = float("nan") if split == "nan" else float(w.detach().double().abs().mean())
        return EvalResult(metrics={f"probe_{split}": {"exact_match": value, "alias": "x"}}, samples={}, seconds=0.0)


def make_evaluator(spec):
    return NormEvaluator(spec)


@pytest.fixture
def spec(tiny_llama):
    fam = tiny_llama()
    paths = tuple(str(p) for p in fam.all)
    return WorkerSpec(sources=paths, base=paths[0], tasks=("probe",), evaluator="test_worker:make_evaluator",
                      threads=1), fam


def linear(fam, w0: float, w1: float) -> dict:
    return {"merge_method": "linear", "models": [
        {"model": str(fam.experts[0]), "parameters": {"weight": w0}},
        {"model": str(fam.experts[1]), "parameters": {"weight": w1}}], "dtype": "float32"}


def test_worker_merges_in_place_and_times_stages(spec):
    spec, fam = spec
    assert pickle.loads(pickle.dumps(spec)) == spec
    worker = Worker(spec)
    a = worker.run(TrialJob(0, linear(fam, 1.0, 0.0), "search"))
    model = worker.model
    b = worker.run(TrialJob(1, linear(fam, 0.0, 1.0), "search"))
    assert a.ok and b.ok and worker.model is model  # the resident model is reused
    assert a.metrics["probe_search"]["exact_match"] != b.metrics["probe_search"]["exact_match"]
    assert "alias" not in a.metrics["probe_search"]  # non-numeric entries are dropped
    assert {"setup", "merge", "eval", "total"} <= set(a.timings) and "setup" not in b.timings
    assert b.number == 1 and b.pid > 0 and b.node


@pytest.mark.parametrize("recipe_patch, split, stage", [
    ({"merge_method": "lineer"}, "search", "merge"),
    ({"models": [{"model": "/nonexistent", "parameters": {"weight": 1.0}}]}, "search", "merge"),
    ({}, "boom", "evaluate"),
    ({}, "nan", "evaluate"),
])
def test_worker_never_raises(spec, recipe_patch, split, stage):
    spec, fam = spec
    worker = Worker(spec)
    out = worker.run(TrialJob(3, {**linear(fam, 0.5, 0.5), **recipe_patch}, split))
    assert not out.ok and out.metrics is None and out.error.startswith(stage), out.error
    assert worker.run(TrialJob(4, linear(fam, 0.5, 0.5), "search")).ok  # and it keeps working


def test_make_executor_in_process(spec):
    spec, fam = spec
    ex = make_executor(spec, workers=1, timeout=None, threads_per_worker=1)
    assert isinstance(ex, Executor) and ex.slots == 1
    assert ex.wait(0) == []
    ex.submit(TrialJob(7, linear(fam, 1.0, 1.0), "search"))
    (out,) = ex.wait(None)
    assert out.number == 7 and out.ok
    ex.close()


def test_in_process_timeout_fails_a_slow_trial(spec):
    spec, fam = spec
    ex = make_executor(spec, workers=1, timeout=1e-9)
    ex.submit(TrialJob(1, linear(fam, 1.0, 1.0), "search"))
    (out,) = ex.wait()
    assert out.error.startswith("timeout") and out.metrics is None
