"""`evomerge init MODEL... --tasks ...` (issue 24, item 4): a commented starter space that `evomerge
validate` passes as written: two models get a slerp gradient, a base and experts task arithmetic (TIES
and DARE-TIES as commented alternatives that validate too once uncommented), the objective the named
tasks, carved. Hub ids are written as given and resolve when the space is loaded."""

from __future__ import annotations

import re

import pytest
import yaml

from evomerge.cli import main
from evomerge.search.spacefile import load_space
from hubcache import publish
from localtasks import write_tasks


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture
def tasks(tmp_path):
    return write_tasks(tmp_path / "tasks")


def test_two_models_get_a_slerp_gradient_that_validates(tiny_llama, tasks, tmp_path, capsys, monkeypatch):
    fam = tiny_llama()
    monkeypatch.chdir(tmp_path)
    code, out, err = run(capsys, "init", fam.base, fam.experts[0], "--tasks", "my_up", "my_rev",
                         "--tasks-dir", "tasks", "--out", "spaces/pair.yaml")
    assert code == 0, err
    assert "wrote spaces/pair.yaml: a slerp gradient over 2 models" in out and "evomerge validate" in out
    text = (tmp_path / "spaces" / "pair.yaml").read_text()
    data = yaml.safe_load(text)
    assert data["method"] == "slerp" and data["parameters"]["slerp"]["t"] == {"points": 3, "filters": ["self_attn", "mlp"]}
    assert data["objective"]["splits"]["carve"] == {"search": 0.6, "select": 0.2, "report": 0.2}
    assert [t["task"] for t in data["objective"]["tasks"]] == ["my_up", "my_rev"]
    assert data["models"][0] == str(fam.base)  # a folder outside the space's folder: absolute
    assert data["objective"]["tasks_dir"] == "../tasks"  # one beside it: relative to the space file
    code, out, err = run(capsys, "validate", "spaces/pair.yaml")
    assert code == 0, err
    assert out.startswith("ok: spaces/pair.yaml") and "carved by content hash" in out


def test_a_base_and_experts_get_task_arithmetic_with_ties_and_dare_commented(tiny_llama, tasks, tmp_path, capsys):
    fam = tiny_llama()
    space = tmp_path / "space.yaml"
    code, out, err = run(capsys, "init", fam.base, *fam.experts, "--tasks", "my_up:exact_match", "--tasks-dir", tasks,
                         "--out", space)
    assert code == 0, err
    text = space.read_text()
    data = yaml.safe_load(text)
    assert data["method"] == "task_arithmetic" and data["base_model"].endswith("base") and len(data["models"]) == 2
    assert data["parameters"]["task_arithmetic"] == {"weight": {"low": 0.0, "high": 1.0}, "lambda": {"low": 0.5, "high": 1.5}}
    assert "#  ties:" in text and "#  dare_ties:" in text and "#   method: [task_arithmetic, ties, dare_ties]" in text
    code, out, err = run(capsys, "validate", space)
    assert code == 0, err
    # the alternatives, uncommented as the comments say, make a valid space too
    searched = re.sub(r"^#(?=  \S|    \S)", "", text.replace("\nmethod: task_arithmetic",
                                                          "\nmethod: [task_arithmetic, ties, dare_ties]"), flags=re.M)
    space.write_text(searched)
    assert load_space(space).method_names == ("task_arithmetic", "ties", "dare_ties")


def test_hub_ids_are_written_as_given(tiny_llama, tmp_path, capsys, monkeypatch):
    fam = tiny_llama()
    cache = tmp_path / "hf-cache"
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    publish(cache, "acme/base", fam.base)
    publish(cache, "acme/expert", fam.experts[0], refs=("main", "v2"))
    space = tmp_path / "space.yaml"
    code, out, err = run(capsys, "init", "acme/base", "acme/expert@v2", "--tasks", "my_up", "--out", space)
    assert code == 0, err
    data = yaml.safe_load(space.read_text())
    assert data["models"] == ["acme/base", "acme/expert@v2"] and data["base_model"] == "acme/base"
    assert [m.name for m in load_space(space).models] == ["base", "expert_v2"]


@pytest.mark.parametrize("argv, fragment", [
    (["init", "only-one", "--tasks", "t"], "at least two models"),
    (["init", "a", "a", "--tasks", "t"], "a model is named twice"),
    (["init", "a", "b", "--tasks", "t", "--tasks-dir", "nowhere"], "--tasks-dir"),
    (["init", "a", "b", "--tasks", "t", "--name", "my run"], "--name"),
])
def test_mistakes_exit_2_and_write_nothing(argv, fragment, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, out, err = run(capsys, *argv)
    assert code == 2 and fragment in err and not list(tmp_path.iterdir())


def test_an_existing_space_is_kept_unless_overwrite(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "space.yaml").write_text("mine\n")
    code, out, err = run(capsys, "init", "org/a", "org/b", "--tasks", "t")
    assert code == 2 and "--overwrite" in err and (tmp_path / "space.yaml").read_text() == "mine\n"
    code, out, err = run(capsys, "init", "org/a", "org/b", "--tasks", "t", "--overwrite")
    assert code == 0 and "method: slerp" in (tmp_path / "space.yaml").read_text()
