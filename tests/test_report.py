"""The run folder's files: best.yaml keeps provenance as comments and stays a valid mergekit recipe,
trials.csv has a row per trial, per-layer curves follow mergekit's gradient rules, writes are atomic."""

from __future__ import annotations

import csv
import io

import pytest
import yaml

from evomerge.engine.recipe import MergeRecipe
from evomerge.engine.output import atomic_write
from evomerge.search.plots import winner_curves
from evomerge.search.report import source_hashes
from evomerge.search.run import run_search
from test_search import FakeExecutor, make_space


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("report")
    space = make_space(tmp, trials=6)
    return run_search(space, tmp / "run", executor=FakeExecutor(), progress=False)


def test_best_yaml_is_a_recipe_with_provenance(run):
    text = (run.out / "best.yaml").read_text()
    header = [line for line in text.splitlines() if line.startswith("#")]
    assert any("seed: 0" in line and f"trial: {run.winner.trial}" in line for line in header)
    for split in ("search", "select", "report"):
        assert any(line.startswith(f"# score on {split}:") for line in header), split
    assert sum("sha256" in line or len(line.split(": ")[-1]) == 64 for line in header) >= 3
    assert "evomerge 0.1.0" in header[0]
    assert MergeRecipe.from_yaml(text) == run.winner.recipe
    assert yaml.safe_load(text)["merge_method"] == "slerp"  # comments are invisible to YAML readers
    assert "# on another machine: add --model-root DIR, DIR holding the folders add, rev" in text
    assert "global RNG" not in text  # slerp draws nothing


def test_best_yaml_of_a_dare_winner_says_mergekit_draws_another_mask(tmp_path):
    space = make_space(tmp_path, SPACE_DARE, trials=3)
    result = run_search(space, tmp_path / "run", executor=FakeExecutor(), progress=False)
    text = (result.out / "best.yaml").read_text()
    assert result.winner.recipe.merge_method == "dare_ties"
    assert "mergekit-yaml draws from its global RNG, so it gives another draw" in text


SPACE_DARE = """
models: [models/add, models/rev]
base_model: models/base
method: dare_ties
parameters:
  dare_ties:
    density: {low: 0.3, high: 0.9}
objective:
  tasks: [toy_add, toy_rev]
search: {trials: 3, seed: 0, top_k: 2}
"""


@pytest.mark.mergekit
def test_best_yaml_loads_in_mergekit(run):
    pytest.importorskip("mergekit")
    from mergekit.config import MergeConfiguration

    config = MergeConfiguration.model_validate(yaml.safe_load((run.out / "best.yaml").read_text()))
    assert config.merge_method == "slerp"


def test_trials_csv_and_report_md(run):
    rows = list(csv.DictReader(io.StringIO((run.out / "trials.csv").read_text())))
    assert [int(r["number"]) for r in rows] == list(range(6))
    assert rows[0]["role"] == "baseline:slerp" and rows[0]["state"] == "COMPLETE"
    assert {"slerp.t.0", "slerp.t.1", "t_merge", "t_eval", "search_toy_add"} <= set(rows[0])
    md = (run.out / "report.md").read_text()
    assert "(winner)" in md and "parent:add" in md and "baseline:slerp" in md
    assert "optuna-dashboard sqlite:///" in md


def test_winner_curves_follow_gradients():
    recipe = MergeRecipe.from_dict({
        "merge_method": "slerp", "base_model": "a", "models": [{"model": "a"}, {"model": "b"}],
        "parameters": {"t": [{"filter": "mlp", "value": [0.0, 1.0]}, {"value": 0.25}]},
    })
    curves = winner_curves(recipe, 5)
    assert curves["t (mlp)"] == pytest.approx([0.0, 0.25, 0.5, 0.75, 1.0])
    assert curves["t (rest)"] == [0.25] * 5


def test_atomic_write_and_hash_cache(tmp_path):
    atomic_write(tmp_path / "a.txt", "one")
    atomic_write(tmp_path / "a.txt", "two")
    assert (tmp_path / "a.txt").read_text() == "two"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt"]  # no temp files left
    model = tmp_path / "m"
    model.mkdir()
    (model / "config.json").write_text("{}")
    (model / "model.safetensors").write_bytes(b"x" * 10)
    first = source_hashes([str(model)], tmp_path / "cache.json")
    assert source_hashes([str(model)], tmp_path / "cache.json") == first
    (model / "model.safetensors").write_bytes(b"y" * 11)
    assert source_hashes([str(model)], tmp_path / "cache.json") != first
