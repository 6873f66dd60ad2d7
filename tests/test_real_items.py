"""The real family's items (examples/smollm2/build.py), without building any model.

The four-expert family and the fresh-items writer are item generators plus task files: the same seed
gives the same items, the families' own task items never meet their training items, fresh items meet
neither, and every space the four-expert family writes is a valid search space. The two-expert family's
items are pinned by hash, so the family that CI and the README's earlier numbers used cannot drift.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BUILD = ROOT / "examples" / "smollm2" / "build.py"


def _load_build():
    spec = importlib.util.spec_from_file_location("smollm2_build", BUILD)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def build():
    return _load_build()


def _prompts(rows_by_skill: dict) -> set[str]:
    return {r["prompt"] for rows in rows_by_skill.values() for r in rows}


@pytest.mark.parametrize("family", ["two", "four"])
def test_family_items_are_deterministic_and_tasks_never_meet_training(build, family):
    fam = build.FAMILIES[family]
    evals, train, taken = build.family_items(fam, 0)
    again = build.family_items(fam, 0)
    assert (evals, train) == again[:2]
    assert set(evals) == set(fam.skills) and all(len(v) == fam.eval_items for v in evals.values())
    assert _prompts(evals).isdisjoint(_prompts(train))
    assert taken == _prompts(evals) | _prompts(train)
    other = build.family_items(fam, 1)[0]
    assert other != evals


def test_the_two_expert_familys_items_are_unchanged(build):
    evals, train, _ = build.family_items(build.FAMILIES["two"], 0)
    blob = json.dumps([evals, train], sort_keys=True).encode()
    assert hashlib.sha256(blob).hexdigest()[:16] == "aa12df4b8b83d52d"


def test_four_skills_answer_as_specified(build):
    import random

    rng = random.Random(0)
    for skill in ("add", "rev", "caps", "mid"):
        prompt, answer = build.draw(skill, rng)
        words = prompt.split(": ", 1)[1].rstrip(" =").split(" ")
        if skill == "add":
            a, b = prompt.removeprefix("Add: ").removesuffix("=").split("+")
            assert answer == str(int(a) + int(b))
        elif skill == "rev":
            assert answer == " ".join(reversed(words))
        elif skill == "caps":
            assert answer == " ".join(words).upper() and answer != " ".join(words)
        else:
            assert answer == words[1]
    with pytest.raises(ValueError):
        build.draw("nope", rng)


def _fake_family(tmp_path: Path, family: str = "four", seed: int = 0) -> Path:
    folder = tmp_path / f"fam-{family}"
    folder.mkdir()
    (folder / "BUILT.json").write_text(json.dumps({"family": family, "seed": seed, "quick": False}))
    return folder


def _read_items(tasks: Path) -> dict[str, list[dict]]:
    return {f.stem: [json.loads(line) for line in f.read_text().splitlines()] for f in sorted(tasks.glob("*.jsonl"))}


def test_items_only_writes_fresh_items_disjoint_from_the_family(tmp_path):
    fam = _fake_family(tmp_path)
    outs = []
    for name, seed in (("a", 7), ("b", 7), ("c", 8)):
        out = tmp_path / name
        res = subprocess.run([sys.executable, str(BUILD), "--items-only", "--seed", str(seed), "--family-dir",
                              str(fam), str(out), "--items", "120"], capture_output=True, text=True)
        assert res.returncode == 0, res.stderr
        outs.append(out)
    a, b, c = (_read_items(o / "tasks") for o in outs)
    assert a == b and a != c  # the same seed writes the same items; another seed others
    assert set(a) == {"add", "rev", "caps", "mid"} and all(len(v) == 120 for v in a.values())
    mod = _load_build()
    _, _, taken = mod.family_items(mod.FAMILIES["four"], 0)
    assert _prompts(a).isdisjoint(taken)  # in no split and no training set of the family
    task = (outs[0] / "tasks" / "smol_caps.yaml").read_text()
    assert str(outs[0] / "tasks" / "caps.jsonl") in task and "ignore_case: false" in task
    assert json.loads((outs[0] / "FRESH.json").read_text())["items"]["mid"] == 120


def test_items_only_refuses_the_familys_own_seed_and_a_missing_family(tmp_path):
    fam = _fake_family(tmp_path)
    res = subprocess.run([sys.executable, str(BUILD), "--items-only", "--seed", "0", "--family-dir", str(fam),
                          str(tmp_path / "x")], capture_output=True, text=True)
    assert res.returncode != 0 and "family's own seed" in res.stderr and not (tmp_path / "x").exists()
    res = subprocess.run([sys.executable, str(BUILD), "--items-only", "--seed", "3", str(tmp_path / "y")],
                         capture_output=True, text=True)
    assert res.returncode == 2 and "--family-dir" in res.stderr and not (tmp_path / "y").exists()


def test_the_four_expert_spaces_load(build, tmp_path):
    """Every space the four-expert family writes is a valid search space over its folders."""
    from evomerge.search.spacefile import load_space

    fam = build.FAMILIES["four"]
    for name in ("base", *fam.skills):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text(json.dumps({"torch_dtype": "float32"}))
    evals, _, _ = build.family_items(fam, 0)
    build.write_tasks(tmp_path / "tasks", tmp_path / "tasks", fam, evals)
    build.write_spaces(tmp_path, fam, 100)
    spaces = {p.stem: load_space(p) for p in sorted(tmp_path.glob("space*.yaml"))}
    assert set(spaces) == {"space", "space_layers", "space_ties", "space_methods"}
    assert all(s.budget.trials == 100 and s.objective.splits.mode == "carve" for s in spaces.values())
    assert spaces["space"].is_continuous and len(spaces["space"].all_dimensions()) == 5
    assert len(spaces["space_layers"].all_dimensions()) == 4 * 3 * 3 + 1
    assert spaces["space_methods"].method_names == ("task_arithmetic", "ties", "dare_ties", "della")
