"""The embedded toy family: shipped layout, manifest hashes, disjoint splits, deterministic builds,
and the documented scores (docs/toy_family.md, from evomerge/toy/data/scores.json)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from evomerge.toy import family as toy
from evomerge.errors import CheckpointError, ConfigError, OutputError
from evomerge.toy.skills import SKILLS, normalize


# One torch thread for these modules (see conftest.one_torch_thread).
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def fam():
    return toy.family()


def test_shipped_family_layout(fam):
    assert fam.root == toy.SHIPPED.resolve()
    assert list(fam.experts) == list(fam.skills) == list(toy.FULL.skills) and len(fam.experts) >= 3
    assert set(fam.skills) <= set(SKILLS)
    for path in fam.models.values():
        assert (path / "config.json").is_file()
        assert (path / "model.safetensors").is_file()
        assert (path / "tokenizer.json").is_file()
    assert abs(sum(fam.mixture.values()) - 1.0) < 1e-9
    for split in toy.SPLITS:
        for name in fam.tasks(split):
            assert (fam.tasks_dir / f"{name}.yaml").is_file()
    size = sum(p.stat().st_size for p in fam.root.rglob("*") if p.is_file())
    assert size < 12 * 2**20, f"shipped family is {size / 2**20:.1f} MiB"


def test_manifest_hashes_and_sizes_match_files(fam):
    manifest = toy.manifest(fam)
    assert len(manifest["splits"]) == len(fam.skills) * len(toy.SPLITS)
    for task, entry in manifest["splits"].items():
        path = fam.root / entry["file"]
        assert toy.sha256(path) == entry["sha256"], task
        assert len(path.read_text().splitlines()) == entry["size"], task


def test_splits_are_disjoint_by_normalized_text(fam):
    manifest = toy.manifest(fam)
    seen: dict[str, str] = {}
    for task, entry in manifest["splits"].items():
        for line in (fam.root / entry["file"]).read_text().splitlines():
            key = normalize(json.loads(line)["prompt"])
            assert key not in seen, f"{key!r} in both {seen[key]} and {task}"
            seen[key] = task


def test_tokenizer_loads_and_matches_training_encoding(fam):
    from transformers import AutoTokenizer

    from evomerge.toy import training

    tok = AutoTokenizer.from_pretrained(fam.tokenizer)
    for text in ["123+45=168\n", "rev abc=cba\n", "kv a3x7m1:x=7\n", "sort dcba=abcd\n"]:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert ids == training.encode(text)
        assert tok.decode(ids) == text


def test_family_errors_name_the_fix(tmp_path, fam):
    with pytest.raises(ConfigError, match="search, select, report"):
        fam.tasks("train")
    with pytest.raises(CheckpointError, match="evomerge toy build"):
        toy.load(tmp_path)
    (tmp_path / "x").write_text("occupied")
    with pytest.raises(OutputError, match="not empty"):
        toy.build(tmp_path, quick=True)


def test_plan_mistakes_fail_before_training(tmp_path):
    import dataclasses

    bad = [
        (dict(skills=("rev", "nope")), "plan.skills"),
        (dict(skills=("rev",), expert_steps={"rev": 1}, expert_lr={"rev": 1e-3}, mixture={"rev": 1.0}), "plan.skills"),
        (dict(expert_lr={"rev": 1e-3}), "plan.expert_lr"),
        (dict(base_corpus={"rev": 1.0, "reverse": 1.0}), "plan.base_corpus"),
        (dict(replay_targets="teacher"), "plan.replay_targets"),
    ]
    for change, where in bad:
        plan = dataclasses.replace(toy.QUICK, **change)
        with pytest.raises(ConfigError, match=where.replace(".", r"\.")):
            toy.build(tmp_path / "x", plan=plan, log=None)
        assert not any(tmp_path.iterdir())  # nothing half-written


def test_replay_targets_relabel_only_the_other_skills():
    from evomerge.toy import training

    batch = [("rev", "rev abc=", "cba"), ("sort", "sort cba=", "abc"), ("up:easy", "up ab=", "AB"),
             ("rev", "rev xy=", "yx")]
    asked = []

    def teacher(prompts):
        asked.append(list(prompts))
        return [f"t{i}" for i in range(len(prompts))]

    pairs = training.replay_targets(batch, ("rev",), teacher)
    assert pairs == [("rev abc=", "cba"), ("sort cba=", "t0"), ("up ab=", "t1"), ("rev xy=", "yx")]
    assert asked == [["sort cba=", "up ab="]]
    assert training.replay_targets(batch, ("rev", "sort", "up"), teacher)[1:3] == [("sort cba=", "abc"), ("up ab=", "AB")]


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_quick_build_is_deterministic(tmp_path):
    a = toy.build(tmp_path / "a", seed=3, quick=True, log=None)
    b = toy.build(tmp_path / "b", seed=3, quick=True, log=None)
    fa, fb = _files(a.root), _files(b.root)
    assert fa.keys() == fb.keys()
    assert [k for k in fa if fa[k] != fb[k]] == []
    assert any(k.endswith("model.safetensors") for k in fa)
    assert toy.draw_splits(toy.QUICK.split_sizes, 3) == toy.draw_splits(toy.QUICK.split_sizes, 3)
    assert toy.draw_splits(toy.QUICK.split_sizes, 3) != toy.draw_splits(toy.QUICK.split_sizes, 4)


@pytest.mark.slow
def test_members_score_as_documented(fam):
    """Base and experts on the report split, through lm-eval in memory, match scores.json."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from evomerge.evaluation.evaluate import LMEvalEvaluator

    scores = json.loads((fam.root / "scores.json").read_text())["rows"]
    tok = AutoTokenizer.from_pretrained(fam.tokenizer)
    ev = LMEvalEvaluator(tok, [f"toy_{s}" for s in fam.skills], str(fam.tasks_dir))
    model = AutoModelForCausalLM.from_pretrained(fam.base, dtype=torch.float32).eval()
    measured = {}
    for name, path in fam.models.items():
        loaded = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        model.load_state_dict(loaded.state_dict())
        result = ev.evaluate(model, "report")
        measured[name] = {s: result.metrics[f"toy_{s}_report"]["exact_match"] for s in fam.skills}
    for name, row in measured.items():
        for skill, value in row.items():
            assert value == pytest.approx(scores[name][skill], abs=0.02), (name, skill)
    for skill in fam.skills:  # clearly better: at least 5 points and at most half the base's errors
        expert, base = measured[f"expert_{skill}"][skill], measured["base"][skill]
        assert expert >= base + 0.05 and 1 - expert <= (1 - base) / 2, (skill, base, expert)


@pytest.mark.slow
def test_searched_recipe_beats_every_expert_and_naive_merge(fam):
    """The family's point (issue #3): a good recipe beats every expert and every naive merge on the
    report mixture by a clear margin, and it is not the uniform default. The recipe is the one
    `evomerge search search_spaces/toy_task_arithmetic.yaml --trials 60` found (examples/); it is
    merged here with the real engine and scored through lm-eval, against the members and naive merges
    of scores.json (written by scripts/toy_table.py the same way; the members are re-checked by
    test_members_score_as_documented)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from evomerge.engine.checkpoints import Sources
    from evomerge.evaluation.evaluate import LMEvalEvaluator
    from evomerge.engine.execution import merge_into
    from evomerge.engine.recipe import load_recipe
    from evomerge.engine.sinks import ModelSink

    repo = Path(__file__).resolve().parents[1]
    scores = json.loads((fam.root / "scores.json").read_text())
    recipe = load_recipe(repo / "examples" / "toy_best_search.yaml")
    weights = [m.parameters["weight"] for m in recipe.models]
    assert max(weights) - min(weights) > 0.3, "the optimum is expected away from uniform weights"

    cwd = os.getcwd()
    os.chdir(repo)  # the example's model paths are relative to the repository root
    try:
        sources = Sources.open([recipe.base_model] + [m.model for m in recipe.models])
        model = AutoModelForCausalLM.from_pretrained(fam.base, dtype=torch.float32).eval()
        merge_into(ModelSink(model), recipe, sources)
    finally:
        os.chdir(cwd)
    tok = AutoTokenizer.from_pretrained(fam.tokenizer)
    ev = LMEvalEvaluator(tok, [f"toy_{s}" for s in fam.skills], str(fam.tasks_dir))
    result = ev.evaluate(model, "report")
    mix = sum(fam.mixture[s] * result.metrics[f"toy_{s}_report"]["exact_match"] for s in fam.skills)
    assert mix == pytest.approx(scores["mixture"]["best_search"], abs=1e-9)
    others = {n: v for n, v in scores["mixture"].items()
              if n.startswith("expert_") or n in ("base", "linear_uniform", "task_arithmetic_w1", "ties_default")
              or n.startswith("slerp_")}
    assert len(others) == 9
    for name, value in others.items():
        assert mix >= value + 0.08, (name, value, mix)
    paired = scores["paired"]["best_search"]
    assert all(v["ci95_low"] > 0.05 for v in paired.values()), paired
