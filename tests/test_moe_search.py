"""`method: moe` in a search space: the MoE construction searched like a merge, built in memory.

- The space declares the construction's tunables (which experts, top-k, gate mode, residual scale) and
  its router prompts; mistakes are refused at load with the field named.
- `build_recipe` is pure: params -> a mergekit-moe config (experts in model order, top-k clipped, fewer
  than two experts refused as an invalid candidate).
- A short search on the toy family writes a best.yaml that `evomerge moe` and `mergekit-moe` build into
  the model that was scored: the same tensors as the worker's resident MoE, and the same select score.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import optuna
import pytest

from evomerge.cli import main
from evomerge.errors import ConfigError
from evomerge.search.spacefile import load_space
from evomerge.search.study import load_run_study

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SPACE = """
name: moe_e2e
models: [toy:up, toy:rev, toy:sort, toy:next]
base_model: toy:base
method: moe
parameters:
  moe:
    experts_per_token: {low: 1, high: 2}
    gate_mode: {choices: [hidden, cheap_embed, random]}
    residual_scale: {low: 0.5, high: 1.5}
    use: {choices: [true, false]}
moe:
  prompts:
    up: ["up abc=", "up xyz="]
    rev: ["rev abc=", "rev xyz="]
    sort: ["sort cab=", "sort zyx="]
    next: ["next abc=", "next xyz="]
objective:
  tasks_dir: toy
  tasks: [toy_up, toy_rev, toy_sort, toy_next]
search: {trials: 5, seed: 0, limit: 16, top_k: 1, sampler: tpe}
"""


def _space(tmp_path: Path, body: str = SPACE, name: str = "space.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(body))
    return path


# --- the space -------------------------------------------------------------------------------------
def test_moe_space_dimensions(tmp_path):
    space = load_space(_space(tmp_path))
    dims = {d.name: d for d in space.all_dimensions()}
    assert dims["moe.experts_per_token"].integer and (dims["moe.experts_per_token"].low,
                                                     dims["moe.experts_per_token"].high) == (1, 2)
    assert dims["moe.gate_mode"].choices == ("hidden", "cheap_embed", "random")
    assert {f"moe.use.{m}" for m in ("up", "rev", "sort", "next")} <= set(dims)
    assert {f"moe.residual_scale.{m}" for m in ("up", "rev", "sort", "next")} <= set(dims)
    assert space.moe.prompts["rev"] == ("rev abc=", "rev xyz=")


@pytest.mark.parametrize("change, match", [
    (("method: moe\nparameters:\n  moe:", "method: linear\nparameters:\n  linear:\n    weight: 1.0\n  unused:"),
     r"parameters.unused: parameters given for 'unused'"),
    (("    up: [\"up abc=\", \"up xyz=\"]", "    upp: [\"up abc=\"]"), r"moe.prompts.upp: 'upp' is not one of the "
                                                                      r"models.*did you mean 'up'"),
    (("    next: [\"next abc=\", \"next xyz=\"]\n", ""), r"moe.prompts: gate_mode \w+ places each router row.*next "
                                                        r"has none"),
    (("    rev: [\"rev abc=\", \"rev xyz=\"]", "    rev: [\"up abc=\", \"up xyz=\"]"), r"up and rev have the same "
                                                                                      r"prompts"),
    (("base_model: toy:base\n", ""), r"base_model: an MoE needs a base model"),
    (("{choices: [hidden, cheap_embed, random]}", "{choices: [hidden, cheapembed]}"),
     r"gate_mode.*did you mean 'cheap_embed'"),
    (("experts_per_token: {low: 1, high: 2}", "experts_per_token: {low: 1, high: 5}"),
     r"parameters.moe.experts_per_token: experts_per_token reaches 5, but only 4 models"),
    (("method: moe", "method: mixtral"), r"unknown merge method 'mixtral'.*did you mean 'moe'"),
])
def test_moe_space_mistakes(tmp_path, change, match):
    body = SPACE.replace(*change)
    assert body != SPACE
    with pytest.raises(ConfigError, match=match):
        load_space(_space(tmp_path, body))


def test_moe_section_needs_method_moe(tmp_path):
    body = SPACE.replace("method: moe", "method: linear")
    body = body[:body.index("parameters:")] + body[body.index("moe:\n  prompts"):]
    with pytest.raises(ConfigError, match=r"moe: a moe: section, but moe is not a searched method"):
        load_space(_space(tmp_path, body))


def test_random_gate_modes_need_no_prompts(tmp_path):
    body = SPACE.replace("{choices: [hidden, cheap_embed, random]}", "{choices: [random, uniform_random]}")
    body = body[:body.index("moe:\n  prompts")] + body[body.index("objective:"):]
    space = load_space(_space(tmp_path, body))
    assert space.moe.prompts == {}


# --- params -> config --------------------------------------------------------------------------------
def test_build_recipe_makes_the_mergekit_moe_config(tmp_path):
    from evomerge.moe.config import MoEConfig
    from evomerge.search.suggest import build_recipe

    space = load_space(_space(tmp_path))
    params = {"moe.experts_per_token": 2, "moe.gate_mode": "cheap_embed",
              **{f"moe.use.{m}": m != "sort" for m in ("up", "rev", "sort", "next")},
              **{f"moe.residual_scale.{m}": s for m, s in (("up", 0.5), ("rev", 1.0), ("sort", 1.2), ("next", 1.5))}}
    cfg = build_recipe(space, params)
    assert isinstance(cfg, MoEConfig)
    assert [Path(e.source_model).name for e in cfg.experts] == ["up", "rev", "next"]
    assert [e.residual_scale for e in cfg.experts] == [0.5, 1.0, 1.5]
    assert cfg.experts[1].positive_prompts == ["rev abc=", "rev xyz="]
    assert cfg.gate_mode == "cheap_embed" and cfg.experts_per_token == 2 and cfg.random_seed == 0
    assert build_recipe(space, params) == cfg  # pure
    two = {**params, "moe.use.next": False}
    assert build_recipe(space, {**two, "moe.experts_per_token": 2}).experts_per_token == 2
    one = {**two, "moe.use.rev": False}
    with pytest.raises(ConfigError, match=r"parameters.moe.use: this candidate uses fewer than two experts \(up\)"):
        build_recipe(space, one)


# --- end to end --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("moe_e2e")
    space = _space(tmp)
    out = tmp / "run"
    assert main(["search", str(space), "--out", str(out), "--no-progress"]) == 0
    return {"space": space, "out": out}


@pytest.mark.slow
def test_moe_search_best_yaml_builds_the_scored_model(run, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from evomerge.evaluation.evaluate import LMEvalEvaluator
    from evomerge.executors.worker import Worker
    from evomerge.moe.config import load_moe_config
    from evomerge.search.jobs import worker_spec
    from evomerge.search.score import mixture
    from evomerge.search.suggest import build_recipe

    out = run["out"]
    study = load_run_study(f"sqlite:///{out / 'study.db'}")
    winner = study.user_attrs["winner"]
    space = load_space(run["space"])
    best = load_moe_config(out / "best.yaml")
    assert best == build_recipe(space, study.trials[winner].params)
    text = (out / "best.yaml").read_text()
    assert "evomerge moe best.yaml OUT" in text and "mergekit-moe --random-seed 0" in text
    report = (out / "report.md").read_text()
    assert "baseline:moe" in report and "parent:up" in report

    built = tmp_path / "built"
    assert main(["moe", str(out / "best.yaml"), str(built), "--no-progress"]) == 0
    model = AutoModelForCausalLM.from_pretrained(str(built), dtype=torch.float32).eval()
    # the candidate as the search scored it: a worker's resident MoE
    worker = Worker(worker_spec(space))
    worker.setup()
    scored = worker.merge(best.to_dict()).state_dict()
    on_disk = model.state_dict()
    assert scored.keys() == on_disk.keys()
    assert all(torch.equal(scored[k], on_disk[k]) for k in scored)
    # reloaded from disk and scored again: the select score the search recorded
    evaluator = LMEvalEvaluator(AutoTokenizer.from_pretrained(str(built)), [t.task for t in space.objective.tasks],
                                space.objective.tasks_dir)
    expected = study.user_attrs["select_scores"][str(winner)]["score"]
    assert mixture(evaluator.evaluate(model, "select"), space.objective, "select") == expected

    # mergekit-moe reads best.yaml and, with the seed best.yaml names, builds the same tensors
    import yaml
    from mergekit.merge import MergeOptions
    from mergekit.moe.config import MoEMergeConfig
    import mergekit.scripts.moe as mk

    options = MergeOptions(random_seed=best.seed, quiet=True)
    options.apply_global_options()
    mk.build(MoEMergeConfig.model_validate(yaml.safe_load(text)), out_path=str(tmp_path / "mk"),
             merge_options=options, device="cpu")
    theirs = AutoModelForCausalLM.from_pretrained(str(tmp_path / "mk"), dtype=torch.float32).state_dict()
    assert all(torch.equal(theirs[k], on_disk[k]) for k in on_disk)


@pytest.mark.slow
def test_toy_moe_rows_of_the_readme(monkeypatch):
    """The README's toy-table MoE rows (report-split mixture), from the example configs (whose paths
    are relative to the repository root, as the examples say)."""
    from evomerge.executors.worker import Worker, WorkerSpec
    from evomerge.moe.config import load_moe_config
    from evomerge.toy.family import family

    repo = Path(__file__).resolve().parents[1]
    fam = family()
    skills = list(fam.skills)
    spec = WorkerSpec(sources=(str(fam.base), *(str(fam.experts[s]) for s in skills)), base=str(fam.base),
                      tasks=tuple(f"toy_{s}" for s in skills), include_path=str(fam.tasks_dir))
    monkeypatch.chdir(repo)
    spec = WorkerSpec(sources=("./evomerge/toy/data/base", *(f"./evomerge/toy/data/experts/{s}" for s in skills)),
                      base=str(fam.base), tasks=spec.tasks, include_path=spec.include_path)
    worker = Worker(spec)
    worker.setup()
    for name, want in (("toy_moe.yaml", 0.493), ("toy_moe_best.yaml", 0.495)):
        cfg = load_moe_config(repo / "examples" / name)
        res = worker.evaluator.evaluate(worker.merge(cfg.to_dict()), "report")
        mix = sum(res.metrics[f"toy_{s}_report"]["exact_match"] for s in skills) / len(skills)
        assert round(mix, 3) == want, (name, mix)
