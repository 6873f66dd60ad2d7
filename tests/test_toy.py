"""The embedded toy family: shipped layout, manifest hashes, disjoint splits, deterministic builds,
and the documented scores (docs/toy_family.md, from evomerge/toydata/scores.json)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from evomerge import toy
from evomerge.errors import CheckpointError, ConfigError, OutputError
from evomerge.toyskills import SKILLS, normalize


# One torch thread for these modules (see conftest.one_torch_thread).
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def fam():
    return toy.family()


def test_shipped_family_layout(fam):
    assert fam.root == toy.SHIPPED.resolve()
    assert set(fam.experts) == set(SKILLS) and len(fam.experts) >= 3
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

    from evomerge import training

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

    from evomerge.evaluate import LMEvalEvaluator

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
    for skill in fam.skills:
        assert measured[f"expert_{skill}"][skill] >= measured["base"][skill] + 0.1, skill
