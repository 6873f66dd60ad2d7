"""LMEvalEvaluator: in-memory lm-eval over the shipped toy family, offline; seeded subsets; in-place
weight changes are seen; task naming errors; the tasks also run through lm-eval's own CLI."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from guards import hang_guard

from evomerge.toy import family as toy
from evomerge.errors import ConfigError
from evomerge.evaluation.evaluate import EvalResult, LMEvalEvaluator
from evomerge.evaluation.subsets import subset


# One torch thread for these modules (see conftest.one_torch_thread).
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def fam():
    return toy.family()


@pytest.fixture(scope="module")
def setup(fam):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(fam.tokenizer)
    model = AutoModelForCausalLM.from_pretrained(fam.experts["up"], dtype=torch.float32).eval()
    ev = LMEvalEvaluator(tok, [f"toy_{s}" for s in fam.skills], str(fam.tasks_dir), batch_size=64)
    return ev, model


def test_subset_is_seeded_random_not_first_n():
    a = subset(500, 64, 0, "toy_up_search")
    assert a == subset(500, 64, 0, "toy_up_search")
    assert a != list(range(64)) and len(set(a)) == 64 and a == sorted(a)
    assert a != subset(500, 64, 1, "toy_up_search")
    assert a != subset(500, 64, 0, "toy_rev_search")
    assert subset(500, None, 0, "t") is None and subset(10, 64, 0, "t") is None
    with pytest.raises(ConfigError):
        subset(10, 0, 0, "t")


def test_evaluates_in_memory_model_offline(setup, fam):
    assert os.environ["HF_HUB_OFFLINE"] == "1" and os.environ["HF_DATASETS_OFFLINE"] == "1"
    ev, model = setup
    result = ev.evaluate(model, "search", limit=32, seed=0)
    assert isinstance(result, EvalResult)
    assert set(result.metrics) == {f"toy_{s}_search" for s in fam.skills}
    assert result.samples == {f"toy_{s}_search": 32 for s in fam.skills}
    for row in result.metrics.values():
        assert 0.0 <= row["exact_match"] <= 1.0
        assert not any("stderr" in k for k in row)
    assert result.seconds > 0
    again = ev.evaluate(model, "search", limit=32, seed=0)
    assert again.metrics == result.metrics  # same subset, same greedy answers
    full = ev.sizes("search")
    assert all(n >= 256 for n in full.values())


def test_sees_in_place_weight_changes(setup, fam):
    import torch
    from transformers import AutoModelForCausalLM

    ev, model = setup
    before = ev.evaluate(model, "select", limit=64, seed=1).metrics["toy_up_select"]["exact_match"]
    lm = ev._lm
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    base = AutoModelForCausalLM.from_pretrained(fam.base, dtype=torch.float32)
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            tensor.copy_(base.state_dict()[name])
    after = ev.evaluate(model, "select", limit=64, seed=1).metrics["toy_up_select"]["exact_match"]
    assert ev._lm is lm  # the same HFLM wrapper: it holds the model, not a copy
    assert after < before - 0.2, (before, after)
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            tensor.copy_(saved[name])
    restored = ev.evaluate(model, "select", limit=64, seed=1).metrics["toy_up_select"]["exact_match"]
    assert restored == before


def test_unknown_task_suggests_a_name(fam):
    ev = LMEvalEvaluator(None, ["toy_revv"], str(fam.tasks_dir))
    with pytest.raises(ConfigError, match="did you mean 'toy_rev_search'"):
        ev.view("search")


@pytest.mark.slow
def test_tasks_run_through_lm_eval_cli(fam, tmp_path):
    lm_eval = os.path.join(os.path.dirname(sys.executable), "lm_eval")
    cmd = [
        lm_eval, "--model", "hf", "--model_args", f"pretrained={fam.experts['up']},dtype=float32",
        "--include_path", str(fam.tasks_dir), "--tasks", "toy_up_report", "--device", "cpu",
        "--batch_size", "64", "--limit", "40", "--output_path", str(tmp_path / "out"),
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, timeout=hang_guard(30))
    assert done.returncode == 0, done.stderr[-3000:]
    assert "toy_up_report" in done.stdout and "exact_match" in done.stdout


def test_per_item_scores_match_the_aggregate_and_are_paired(setup, fam):
    ev, model = setup
    plain = ev.evaluate(model, "search", limit=40, seed=3)
    assert plain.items is None
    result = ev.evaluate(model, "search", limit=40, seed=3, per_item=True)
    assert result.metrics == plain.metrics
    for name, row in result.metrics.items():
        scores = result.items[name]["exact_match"]
        assert len(scores) == 40 and set(scores) <= {0.0, 1.0}
        assert sum(scores) / len(scores) == pytest.approx(row["exact_match"])
    # Same items in the same order on every call: item i of one model pairs with item i of another.
    again = ev.evaluate(model, "search", limit=40, seed=3, per_item=True)
    assert again.items == result.items
