"""Recipe schema, YAML round trip and mergekit's parameter-resolution rules (hand-computed oracles)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from evomerge.errors import ConfigError
from evomerge.engine.parameters import evaluate_setting, layer_t, resolve_parameter
from evomerge.engine.recipe import ConditionalParameter, MergeRecipe, load_recipe

DATA = Path(__file__).parent / "data"
GOLDEN = ["slerp_gradient.yaml", "ties.yaml", "passthrough.yaml", "dare_ties_seed.yaml"]


@pytest.mark.parametrize("name", GOLDEN)
def test_golden_round_trip(name):
    r = load_recipe(DATA / name)
    text = r.to_yaml()
    assert MergeRecipe.from_yaml(text) == r
    # the written YAML means the same thing as the original file, key for key
    original = yaml.safe_load((DATA / name).read_text())
    assert yaml.safe_load(text) == {k: v for k, v in original.items()}


def test_written_yaml_is_short_flow_style_with_comments():
    r = load_recipe(DATA / "ties.yaml")
    text = r.to_yaml(comments=["evomerge best trial 7", "score 0.8125"])
    assert text == (DATA / "ties_written.yaml").read_text()
    assert "density: [1, 0.7, 0.1]" in text


def test_slerp_filters_parse_into_conditional_parameters():
    r = load_recipe(DATA / "slerp_gradient.yaml")
    t = r.parameters["t"]
    assert [c.filter for c in t] == ["self_attn", "mlp", None]
    assert t[0].value == [0, 0.5, 0.3, 0.7, 1]
    assert r.slices[0].sources[1].layer_range == (0, 4)


def test_random_seed_is_kept_and_written():
    r = load_recipe(DATA / "dare_ties_seed.yaml")
    assert r.random_seed == 42
    assert "random_seed: 42" in r.to_yaml()


@pytest.mark.parametrize(
    "text, where, fix",
    [
        ("merge_method: linear\nmodels:\n  - model: a\n    paramters: {weight: 1}\n",
         "models[0].paramters", "did you mean 'parameters'"),
        ("merge_method: linear\nmodels:\n  - model: a\n    parameters:\n      weight:\n        - {filtr: mlp, value: 1}\n",
         "models[0].parameters.weight[0].filtr", "did you mean 'filter'"),
        ("merge_method: linear\nbase_modle: a\nmodels:\n  - model: a\n", "base_modle", "did you mean 'base_model'"),
        ("merge_method: linear\nmodels: []\n", "recipe", None),
        ("merge_method: linear\nslices:\n  - sources:\n      - model: a\n        layer_range: [3, 1]\n",
         "slices[0].sources[0].layer_range", None),
        ("merge_method: linear\nmodels:\n  - model: a\ndtype: fp16\n", "dtype", "bfloat16"),
        ("merge_method: linear\nmodules:\n  text:\n    models:\n      - model: a\n", "recipe", None),
        ("merge_method: linear\nmodels:\n  - model: a\nmodules: {default: {models: [{model: a}]}}\n", "recipe", None),
    ],
)
def test_schema_errors_name_the_field(text, where, fix):
    with pytest.raises(ConfigError) as info:
        MergeRecipe.from_yaml(text, source="r.yaml")
    assert info.value.where == f"r.yaml: {where}"
    if fix:
        assert fix in info.value.fix


def test_yaml_syntax_error_names_line(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("merge_method: linear\nmodels: [\n")
    with pytest.raises(ConfigError) as info:
        load_recipe(p)
    assert str(p) in info.value.where and ":3:" in info.value.where


def test_missing_recipe_file(tmp_path):
    with pytest.raises(ConfigError, match="recipe file not found"):
        load_recipe(tmp_path / "nope.yaml")


def test_slice_sources_must_have_equal_lengths():
    text = ("merge_method: slerp\nslices:\n  - sources:\n      - {model: a, layer_range: [0, 4]}\n"
            "      - {model: b, layer_range: [0, 3]}\n")
    with pytest.raises(ConfigError, match="same number of layers"):
        MergeRecipe.from_yaml(text)


# --- parameter resolution: oracles computed by hand from mergekit's rules -------------------------
def test_layer_t_matches_mergekit_mapping():
    assert [layer_t(i, 5) for i in range(5)] == [0, 0.25, 0.5, 0.75, 1]
    assert layer_t(0, 1) == 1.0  # a one-layer slice reads a gradient at its END (mergekit)
    assert layer_t(1, 2) == 1.0


@pytest.mark.parametrize(
    "gradient, t, expected",
    [
        ([0, 1], 0.5, 0.5),
        ([0, 1], 0.0, 0.0),
        ([0, 1], 1.0, 1.0),
        ([0, 0.5, 0.3, 0.7, 1], 0.25, 0.5),  # exactly on a knot
        ([0, 0.5, 0.3, 0.7, 1], 1 / 3, 0.5 + (1 / 3 * 4 - 1) * (0.3 - 0.5)),  # between knots 1 and 2
        ([0.2, 0.8], 2 / 3, 0.2 + 2 / 3 * 0.6),
        ([0.7], 0.9, 0.7),  # a one-element gradient is constant
        ([1, 0.7, 0.1], 0.5, 0.7),
    ],
)
def test_gradient_interpolation(gradient, t, expected):
    assert evaluate_setting(gradient, "model.layers.0.mlp.up_proj.weight", t) == pytest.approx(expected, abs=1e-12)


def test_gradient_of_booleans_picks_by_index():
    assert evaluate_setting([True, False], "x", 0.4) is True  # int(0.4 * 1) = 0
    assert evaluate_setting([True, False], "x", 1.0) is False


def test_filters_first_match_wins_substring_rule():
    setting = [ConditionalParameter(filter="self_attn", value=0.1),
               ConditionalParameter(filter="attn", value=0.2),
               ConditionalParameter(value=0.9)]
    assert evaluate_setting(setting, "model.layers.3.self_attn.q_proj.weight", 0) == 0.1
    assert evaluate_setting(setting, "transformer.h.3.attn.c_attn.weight", 0) == 0.2
    assert evaluate_setting(setting, "model.layers.3.mlp.up_proj.weight", 0) == 0.9
    star = [ConditionalParameter(filter="*", value=0.4)]
    assert evaluate_setting(star, "anything", 0) == 0.4


def test_filter_without_fallback_falls_through_to_next_scope():
    per_model = {"weight": [ConditionalParameter(filter="mlp", value=0.3)]}
    top = {"weight": 0.8}
    assert resolve_parameter("weight", [per_model, None, top], "model.layers.0.mlp.down_proj.weight", 0) == 0.3
    assert resolve_parameter("weight", [per_model, None, top], "model.layers.0.self_attn.o_proj.weight", 0) == 0.8
    assert resolve_parameter("weight", [None, {}], "x", 0) is None


def test_filter_value_can_be_a_gradient():
    setting = [ConditionalParameter(filter="mlp", value=[0.0, 1.0]), ConditionalParameter(value=0.5)]
    assert evaluate_setting(setting, "model.layers.1.mlp.gate_proj.weight", 0.25) == 0.25
