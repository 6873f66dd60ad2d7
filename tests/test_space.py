"""Search-space loading: valid files resolve to the documented dimensions; mistakes fail early with a
field path and a fix (ConfigError), never deep inside a search."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from evomerge.errors import ConfigError
from evomerge.search.spacefile import load_space
from evomerge.search.suggest import baseline_value


def make_models(root: Path, names=("base", "add", "rev"), layers: int = 4) -> None:
    for name in names:
        d = root / "models" / name
        d.mkdir(parents=True, exist_ok=True)
        (d / "config.json").write_text(f'{{"num_hidden_layers": {layers}}}')


def write_space(root: Path, text: str) -> Path:
    make_models(root)
    p = root / "space.yaml"
    p.write_text(textwrap.dedent(text))
    return p


SLERP = """
models: [models/add, models/rev]
base_model: models/base
method: slerp
parameters:
  slerp:
    t: {points: 3, filters: [self_attn, mlp]}
objective:
  tasks: [{task: toy_add, weight: 2}, toy_rev]
"""


def test_slerp_gradient_dimensions(tmp_path):
    space = load_space(write_space(tmp_path, SLERP))
    names = [d.name for d in space.all_dimensions()]
    assert names == [f"slerp.t.{g}.{k}" for g in ("self_attn", "mlp", "rest") for k in range(3)]
    assert all((d.low, d.high) == (0.0, 1.0) for d in space.all_dimensions())  # from methods.slerp
    assert space.name == "space" and space.is_continuous
    base, inputs = space.roles("slerp")
    assert base.name == "add" and [m.name for m in inputs] == ["add", "rev"]  # slerp: 2 inputs
    assert [t.weight for t in space.objective.tasks] == [2.0, 1.0]
    assert Path(space.models[0].path).is_absolute()


def test_ties_per_model_and_method_choice(tmp_path):
    space = load_space(write_space(tmp_path, """
        models: [models/add, models/rev]
        base_model: models/base
        method: [linear, ties]
        parameters:
          ties:
            density: {low: 0.2, high: 0.9}
            normalize: {choices: [true, false]}
            lambda: 1.0
        objective: {tasks: [toy_add]}
        """))
    names = [d.name for d in space.all_dimensions()]
    assert names[0] == "method"
    # linear.weight is required by the method, so it is searched over the method's range by default
    assert "linear.weight.add" in names and "linear.weight.rev" in names
    assert {"ties.density.add", "ties.density.rev", "ties.weight.add", "ties.normalize"} <= set(names)
    assert "ties.lambda" not in names  # fixed
    assert not space.is_continuous
    base, inputs = space.roles("ties")
    assert base.name == "base" and [m.name for m in inputs] == ["add", "rev"]


@pytest.mark.parametrize(
    "body, where, fix",
    [
        (SLERP.replace("objective:", "objektive:"), "objektive", "objective"),
        (SLERP.replace("points: 3", "pionts: 3"), "parameters.slerp.t.pionts", "points"),
        (SLERP.replace("t: {", "tt: {"), "parameters.slerp.tt", "'t'"),
        (SLERP.replace("method: slerp", "method: slurp"), "method", "slerp"),
        (SLERP.replace("t: {points: 3", "t: {high: 1.5, points: 3"), "parameters.slerp.t.high", "[0, 1]"),
        (SLERP.replace("models/rev]", "models/nope]"), "models[1]", "local Hugging Face model folder"),
        (SLERP + "search: {trials: 0}\n", "search.trials", None),
        (SLERP + "search: {sampler: cma}\n", "search.sampler", None),
        (SLERP + "search: {pruner: median}\n", "search.pruner", "fidelity"),
        (SLERP.replace("method: slerp", "method: ties").replace("slerp:", "ties:"), "parameters.ties.t", "density"),
        # three models for slerp: refused, not silently merged as two
        (SLERP.replace("models/rev]", "models/rev, models/base]"), "method", "list 2 models for slerp"),
        (SLERP + "search: {trials: 3}\nsearch: {trials: 4}\n", "space.yaml:11", "merge the two 'search'"),
    ],
)
def test_mistakes_name_the_field(tmp_path, body, where, fix):
    with pytest.raises(ConfigError) as err:
        load_space(write_space(tmp_path, body))
    assert where in str(err.value.where), err.value.render()
    if fix:
        assert fix in (err.value.fix or ""), err.value.render()


def test_ties_without_base_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="base model"):
        load_space(write_space(tmp_path, SLERP.replace("base_model: models/base\n", "").replace(
            "method: slerp", "method: ties").replace("slerp:", "ties:").replace("t: {points: 3, filters: [self_attn, mlp]}", "density: 0.5")))


def test_overrides_validate(tmp_path):
    space = load_space(write_space(tmp_path, SLERP))
    assert space.with_overrides(trials=7, seed=3, sampler=None).budget.trials == 7
    with pytest.raises(ConfigError) as err:
        space.with_overrides(trials=0)
    assert err.value.where == "--trials"
    # the fingerprint ignores the budget, so a resumed run may raise --trials
    assert space.with_overrides(trials=99).fingerprint() == space.fingerprint()


def test_baseline_values(tmp_path):
    space = load_space(write_space(tmp_path, """
        models: [models/add, models/rev]
        base_model: models/base
        method: [slerp, ties]
        parameters:
          slerp: {t: {low: 0.0, high: 1.0}}
          ties: {density: {low: 0.1, high: 1.0}, weight: {low: 0.0, high: 1.0}}
        objective: {tasks: [toy_add]}
        """))
    specs = {(m.name, s.name): s for m in space.methods for s in m.params}
    assert baseline_value(specs["slerp", "t"]) == 0.5  # no default: the middle
    assert baseline_value(specs["ties", "density"]) == 1.0  # mergekit's default density
    assert baseline_value(specs["ties", "weight"]) == 0.5  # equal weights


def test_shipped_spaces_load(monkeypatch):
    root = Path(__file__).resolve().parents[1] / "search_spaces"
    files = sorted(root.glob("*.yaml"))
    assert files, "search_spaces/ ships ready-made spaces"
    for f in files:
        space = load_space(f)
        assert space.all_dimensions(), f


def test_dtype_follows_the_sources_and_out_dtype_is_what_is_scored(tmp_path):
    from evomerge.search.jobs import worker_spec
    from evomerge.search.suggest import baseline_params, build_recipe

    p = write_space(tmp_path, SLERP)
    for name in ("add", "rev", "base"):
        (tmp_path / "models" / name / "config.json").write_text('{"num_hidden_layers": 4, "dtype": "bfloat16"}')
    space = load_space(p)
    assert space.dtype == "bfloat16" and space.score_dtype == "bfloat16"  # not silently doubled to fp32
    p.write_text(p.read_text() + "dtype: float32\nout_dtype: float16\n")
    space = load_space(p)
    assert (space.dtype, space.score_dtype) == ("float32", "float16")
    recipe = build_recipe(space, baseline_params(space)[0][1])
    assert (recipe.dtype, recipe.out_dtype) == ("float32", "float16")  # best.yaml exports float16
    assert worker_spec(space).dtype == "float16"  # the resident model that is scored


def test_split_forms(tmp_path):
    p = write_space(tmp_path, SLERP)
    assert load_space(p).objective.splits.mode == "carve"  # the default for un-split tasks
    named = SLERP.replace("objective:\n", "objective:\n  splits: {search: dev, select: val, report: test}\n")
    sp = load_space(write_space(tmp_path, named)).objective.splits
    assert sp.mode == "named" and sp.task_name("toy_rev", "report") == "toy_rev_test"
    both = SLERP.replace("objective:\n", "objective:\n  splits: {search: dev, carve: {search: 0.5, select: 0.25, report: 0.25}}\n")
    with pytest.raises(ConfigError, match="either split names"):
        load_space(write_space(tmp_path, both))


def test_every_method_is_searchable_with_its_tunables(tmp_path):
    """The shipped 15-method choice loads; every baseline becomes a recipe that passes the engine's
    checks; DELLA's epsilon and Breadcrumbs' gamma are search dimensions; nuslerp (optional base) and
    nearswap (base + 1) build with the space's base."""
    from evomerge.engine.plan import check_recipe
    from evomerge.engine.recipe import MergeRecipe
    from evomerge.search.suggest import baseline_params, build_recipe

    root = Path(__file__).resolve().parents[1]
    space = load_space(root / "search_spaces" / "toy_method_choice_all.yaml")
    names = {d.name for d in space.all_dimensions()}
    assert {"della.epsilon.up", "breadcrumbs.gamma.rev", "sce.select_topk", "ramplus_tl.r"} <= names
    labels = []
    for label, params in baseline_params(space):
        check_recipe(MergeRecipe.from_yaml(build_recipe(space, params).to_yaml()))
        labels.append(label)
    assert len(labels) == 15
    for method, models, given in (("nuslerp", "[toy:up, toy:rev]", "{weight: {low: 0.0, high: 1.0}}"),
                                  ("nearswap", "[toy:up]", "{t: {low: 0.0, high: 0.01}}")):
        p = tmp_path / f"{method}.yaml"
        p.write_text(f"models: {models}\nbase_model: toy:base\nmethod: {method}\n"
                     f"parameters: {{{method}: {given}}}\nobjective: {{tasks_dir: toy, tasks: [toy_up]}}\n")
        s = load_space(p)
        base, inputs = s.roles(method)
        assert base.name == "base" and [m.name for m in inputs] == models.strip("[]").replace("toy:", "").split(", ")
        recipe = build_recipe(s, baseline_params(s)[0][1])
        assert recipe.base_model == base.path and [m.model for m in recipe.models] == [m.path for m in inputs]
        check_recipe(recipe)
