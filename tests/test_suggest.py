"""Params -> recipe: FixedTrial params give exactly the golden mergekit YAML, per method.

`build_recipe` is what both the scored candidate and best.yaml come from, so its output is pinned."""

from __future__ import annotations

import textwrap

import optuna
import pytest
import yaml

from evomerge.engine.recipe import MergeRecipe
from evomerge.search.spacefile import load_space
from evomerge.search.suggest import baseline_params, build_recipe, suggest_params
from test_space import make_models


def space_for(tmp_path, method: str, parameters: str):
    make_models(tmp_path)
    data = {
        "models": ["models/add", "models/rev"],
        "base_model": "models/base",
        "method": yaml.safe_load(method),
        "parameters": yaml.safe_load(textwrap.dedent(parameters)),
        "objective": {"tasks": ["toy_add"]},
        "search": {"seed": 7},
    }
    p = tmp_path / "space.yaml"
    p.write_text(yaml.safe_dump(data))
    return load_space(p)


def golden(space, params) -> str:
    recipe = build_recipe(space, suggest_params(optuna.trial.FixedTrial(params), space))
    text = recipe.to_yaml()
    assert MergeRecipe.from_yaml(text) == recipe  # round-trips
    root = str(space.models[0].path).rsplit("/models/", 1)[0]
    return text.replace(root, "ROOT")


CASES = {
    "slerp": (
        """
        slerp:
          t: {points: 2, filters: [self_attn]}
        """,
        {"slerp.t.self_attn.0": 0.1, "slerp.t.self_attn.1": 0.9, "slerp.t.rest.0": 0.5, "slerp.t.rest.1": 0.25},
        """\
        merge_method: slerp
        base_model: ROOT/models/add
        models:
        - model: ROOT/models/add
        - model: ROOT/models/rev
        parameters:
          t:
          - filter: self_attn
            value: [0.1, 0.9]
          - value: [0.5, 0.25]
        dtype: float32
        """,
    ),
    "linear": (
        """
        linear:
          weight: {low: 0.0, high: 2.0}
          normalize: false
        """,
        {"linear.weight.add": 0.3, "linear.weight.rev": 1.5},
        """\
        merge_method: linear
        models:
        - model: ROOT/models/add
          parameters:
            weight: 0.3
        - model: ROOT/models/rev
          parameters:
            weight: 1.5
        parameters:
          normalize: false
        dtype: float32
        """,
    ),
    "ties": (
        """
        ties:
          density: {points: 3}
          weight: {shared: true}
          lambda: {low: 0.5, high: 1.5}
        """,
        {"ties.density.add.0": 0.2, "ties.density.add.1": 0.4, "ties.density.add.2": 0.6,
         "ties.density.rev.0": 0.9, "ties.density.rev.1": 0.8, "ties.density.rev.2": 0.7,
         "ties.weight": 0.5, "ties.lambda": 1.25},
        """\
        merge_method: ties
        base_model: ROOT/models/base
        models:
        - model: ROOT/models/add
          parameters:
            weight: 0.5
            density: [0.2, 0.4, 0.6]
        - model: ROOT/models/rev
          parameters:
            weight: 0.5
            density: [0.9, 0.8, 0.7]
        parameters:
          lambda: 1.25
        dtype: float32
        """,
    ),
    "dare_ties": (
        """
        dare_ties:
          density: {low: 0.3, high: 0.9}
          weight: 1.0
        """,
        {"dare_ties.density.add": 0.35, "dare_ties.density.rev": 0.75},
        """\
        merge_method: dare_ties
        base_model: ROOT/models/base
        models:
        - model: ROOT/models/add
          parameters:
            weight: 1.0
            density: 0.35
        - model: ROOT/models/rev
          parameters:
            weight: 1.0
            density: 0.75
        dtype: float32
        random_seed: 7
        """,
    ),
    "task_arithmetic": (
        """
        task_arithmetic:
          weight: {low: 0.0, high: 1.0}
          lambda: {low: 0.5, high: 2.0, log: true}
        """,
        {"task_arithmetic.weight.add": 0.25, "task_arithmetic.weight.rev": 0.75, "task_arithmetic.lambda": 1.0},
        """\
        merge_method: task_arithmetic
        base_model: ROOT/models/base
        models:
        - model: ROOT/models/add
          parameters:
            weight: 0.25
        - model: ROOT/models/rev
          parameters:
            weight: 0.75
        parameters:
          lambda: 1.0
        dtype: float32
        """,
    ),
}


@pytest.mark.parametrize("method", sorted(CASES))
def test_golden_recipe(tmp_path, method):
    parameters, params, expected = CASES[method]
    space = space_for(tmp_path, method, parameters)
    assert golden(space, params) == textwrap.dedent(expected)


def test_method_choice_only_suggests_the_chosen_method(tmp_path):
    space = space_for(tmp_path, "[slerp, linear]", """
        slerp: {t: {low: 0.0, high: 1.0}}
        """)
    trial = optuna.trial.FixedTrial({"method": "linear", "linear.weight.add": 0.2, "linear.weight.rev": 0.8})
    params = suggest_params(trial, space)
    assert params == {"method": "linear", "linear.weight.add": 0.2, "linear.weight.rev": 0.8}
    assert build_recipe(space, params).merge_method == "linear"


def test_baselines_are_uniform(tmp_path):
    space = space_for(tmp_path, "[slerp, linear, ties]", """
        slerp: {t: {points: 3, filters: [mlp]}}
        """)
    got = dict(baseline_params(space))
    assert set(got) == {"baseline:slerp", "baseline:linear", "baseline:ties"}
    assert all(v == 0.5 for k, v in got["baseline:slerp"].items() if k != "method")
    linear = build_recipe(space, got["baseline:linear"])
    assert {m.parameters["weight"] for m in linear.models} == {0.5}  # equal weights (normalized)
    ties = build_recipe(space, got["baseline:ties"])
    assert ties.merge_method == "ties" and ties.base_model.endswith("/base")


def test_build_recipe_is_pure(tmp_path):
    parameters, params, _ = CASES["ties"]
    space = space_for(tmp_path, "ties", parameters)
    assert build_recipe(space, dict(params)) == build_recipe(space, dict(params))
