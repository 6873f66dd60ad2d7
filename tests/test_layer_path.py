"""Layer paths (data-flow-space merging): the encoding, the export, and the in-memory scored model.

- engine: a path <-> a mergekit passthrough `slices:` recipe (gains as `scale` filters on o_proj and
  down_proj); malformed paths refused; per-layer config lists (`layer_types`) rebuilt for the new depth.
- the resident path (executors/resident_path.py): its logits equal the exported model's exactly, for
  unscaled and scaled paths, on Llama and on Qwen2 (sliding/full `layer_types`); weights are shared, not
  copied (only scaled projections are new tensors, the sources stay untouched); generation with the KV
  cache equals a full forward without it, and the test fails when a repeated layer shares a cache slot.
- the search space (`method: layer_path`): dimensions, edit semantics, seeds, pure build_recipe;
  mistakes exit 2 before any trial; `evomerge validate` shows the depth and parameter range.
- end to end on the toy family: best.yaml is a plain passthrough config; `evomerge merge` and
  `mergekit-yaml` give the same tensors; the merged folder loads in plain transformers and gives the
  worker's scored logits.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from evomerge.cli import main
from evomerge.engine.layer_path import Step, check_path, describe, path_recipe, path_steps, runs
from evomerge.errors import ConfigError

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# --- helpers ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """A tiny Llama family (4 layers): base and one expert."""
    from tinymodels import build_family

    return build_family(tmp_path_factory.mktemp("lp-llama"), n_experts=1, hidden=32, layers=4)


@pytest.fixture(scope="module")
def qwen2(tmp_path_factory):
    """A tiny Qwen2 pair whose layers alternate sliding and full attention (`layer_types`)."""
    from transformers import AutoModelForCausalLM, Qwen2Config

    from tinymodels import VOCAB_SIZE, _save

    root = tmp_path_factory.mktemp("lp-qwen2")
    types = ["sliding_attention", "full_attention", "sliding_attention", "full_attention"]
    cfg = Qwen2Config(vocab_size=VOCAB_SIZE, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      use_sliding_window=True, sliding_window=4, layer_types=types, tie_word_embeddings=False,
                      bos_token_id=1, eos_token_id=2, pad_token_id=0)
    paths = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(cfg)
        _save(model, root / f"m{seed}", tokenizer=True)
        paths.append(str(root / f"m{seed}"))
    return paths


def _export(recipe, folder: Path):
    """`evomerge merge` of the recipe, loaded with plain transformers."""
    from transformers import AutoModelForCausalLM

    (folder.parent / f"{folder.name}.yaml").write_text(recipe.to_yaml())
    assert main(["merge", str(folder.parent / f"{folder.name}.yaml"), str(folder), "--no-progress"]) == 0
    return AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()


def _resident(paths):
    from evomerge.engine.checkpoints import Sources
    from evomerge.executors.resident_path import ResidentPath

    return ResidentPath(Sources.open(list(paths)))


IDS = torch.randint(3, 259, (2, 11), generator=torch.Generator().manual_seed(0))


def _logits(model, ids=IDS):
    with torch.no_grad():
        return model(ids).logits


# --- engine: path <-> recipe -------------------------------------------------------------------------
def test_path_recipe_is_passthrough_slices_with_gain_filters():
    steps = [Step("a", 0), Step("a", 1), Step("a", 2), Step("a", 1, 0.5), Step("a", 2, 0.5), Step("d", 2),
             Step("a", 3)]
    recipe = path_recipe(steps, dtype="float32")
    data = recipe.to_dict()
    assert data["merge_method"] == "passthrough" and "models" not in data
    assert [s["sources"][0]["layer_range"] for s in data["slices"]] == [[0, 3], [1, 3], [2, 3], [3, 4]]
    assert data["slices"][1]["sources"][0]["parameters"] == {
        "scale": [{"filter": "self_attn.o_proj", "value": 0.5}, {"filter": "mlp.down_proj", "value": 0.5}]}
    assert "parameters" not in data["slices"][0]["sources"][0]  # gain 1: nothing written, nothing multiplied
    assert path_steps(recipe) == steps
    assert describe(steps, {"a": "up", "d": "rev"}) == "up[0:3] up[1:3]x0.5 rev[2:3] up[3:4]"
    assert runs([Step("a", 0), Step("a", 2)]) == [("a", 0, 1, None), ("a", 2, 3, None)]  # not consecutive


@pytest.mark.parametrize("steps, match", [
    ([], "empty"),
    ([Step("d", 0), Step("a", 1), Step("a", 3)], "first layer of the path comes from d"),
    ([Step("a", 0), Step("a", 1), Step("d", 3)], "last layer of the path comes from d"),
    ([Step("a", 0), Step("a", 4), Step("a", 3)], "layer 4 is out of range"),
    ([Step("a", 0), Step("x", 1), Step("a", 3)], "not a model of this path"),
])
def test_malformed_paths_are_refused(steps, match):
    with pytest.raises(ConfigError, match=match):
        check_path(steps, "a", {"a": 4, "d": 4})


def test_per_layer_config_lists_follow_the_stack():
    from evomerge.engine.layer_config import per_layer_keys, restack

    donor = {"num_hidden_layers": 3, "layer_types": ["s", "f", "s"], "architectures": ["X", "Y", "Z"],
             "eos_token_id": [1, 2, 3], "mlp_only_layers": [0], "no_rope_layers": [1, 0, 1]}
    other = {**donor, "layer_types": ["F", "F", "F"]}
    assert sorted(per_layer_keys(donor)) == ["layer_types", "no_rope_layers"]
    out = restack({**donor, "num_hidden_layers": 5}, donor, [(donor, 0), (donor, 1), (other, 1), (donor, 1), (donor, 2)])
    assert out["layer_types"] == ["s", "f", "F", "f", "s"] and out["no_rope_layers"] == [1, 0, 0, 0, 1]
    assert out["architectures"] == ["X", "Y", "Z"] and out["mlp_only_layers"] == [0]


# --- the resident path: logits, sharing, cache -------------------------------------------------------
def test_scored_logits_equal_the_exported_model(llama, tmp_path):
    a, d = str(llama.base), str(llama.experts[0])
    resident = _resident([a, d])
    plain = [Step(a, 0), Step(a, 1), Step(a, 2), Step(a, 1), Step(a, 2), Step(d, 2), Step(a, 3)]
    scaled = [Step(a, 0), Step(a, 1), Step(a, 2), Step(a, 1, 0.6), Step(a, 2, 0.6), Step(d, 2, 1.3), Step(a, 3)]
    for name, steps in (("plain", plain), ("scaled", scaled)):
        recipe = path_recipe(steps, dtype="float32")
        scored = _logits(resident.build(recipe))
        exported = _export(recipe, tmp_path / name)
        assert exported.config.num_hidden_layers == 7
        assert torch.equal(scored, _logits(exported)), name
    # the identity path is the anchor itself
    assert torch.equal(_logits(resident.build(path_recipe([Step(a, i) for i in range(4)]))), _logits(resident.model(a)))


def test_layers_are_shared_only_scaled_projections_are_new(llama):
    a = str(llama.base)
    resident = _resident([a])
    source = resident.model(a)
    before = {k: v.clone() for k, v in source.state_dict().items()}
    model = resident.build(path_recipe([Step(a, 0), Step(a, 1), Step(a, 1, 0.5), Step(a, 2), Step(a, 3)]))
    layers = model.model.layers
    src1 = source.model.layers[1]
    assert layers[1].self_attn.q_proj.weight is src1.self_attn.q_proj.weight  # position 1: the source's tensors
    assert layers[2].self_attn.q_proj.weight is src1.self_attn.q_proj.weight  # position 2 (repeat): shared too
    assert layers[2].mlp.up_proj.weight is src1.mlp.up_proj.weight
    assert layers[2].self_attn.o_proj.weight is not src1.self_attn.o_proj.weight  # scaled: materialised
    assert torch.equal(layers[2].self_attn.o_proj.weight, src1.self_attn.o_proj.weight * 0.5)
    assert torch.equal(layers[2].mlp.down_proj.weight, src1.mlp.down_proj.weight * 0.5)
    assert [layer.self_attn.layer_idx for layer in layers] == [0, 1, 2, 3, 4]  # one cache slot per position
    assert src1.self_attn.layer_idx == 1 and model.config.num_hidden_layers == 5
    assert model.model.embed_tokens is source.model.embed_tokens and model.lm_head is source.lm_head
    after = source.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # the sources were not changed
    new = {p.data_ptr() for p in model.parameters()} - {p.data_ptr() for p in source.parameters()}
    assert len(new) == 2  # o_proj and down_proj of the scaled step: nothing else was copied
    assert not [k for k in resident.sources.cache if k[0] == "plan-structure"]  # no plan kept per path


def _greedy_without_cache(model, ids, steps):
    out = ids
    for _ in range(steps):
        with torch.no_grad():
            logits = model(out, use_cache=False).logits[:, -1]
        out = torch.cat([out, logits.argmax(-1, keepdim=True)], dim=1)
    return out, logits


def _greedy_with_cache(model, ids, steps):
    got = model.generate(ids, max_new_tokens=steps, do_sample=False, use_cache=True, output_logits=True,
                         return_dict_in_generate=True, pad_token_id=0)
    return got.sequences, got.logits[-1]


def test_generation_with_the_cache_equals_a_full_forward(llama):
    a, d = str(llama.base), str(llama.experts[0])
    resident = _resident([a, d])
    steps = [Step(a, 0), Step(a, 1), Step(a, 2), Step(a, 1, 0.8), Step(a, 2, 0.8), Step(d, 2), Step(a, 3)]
    model = resident.build(path_recipe(steps))
    ids = IDS[:1]
    seq, last = _greedy_without_cache(model, ids, 6)
    cached, cached_last = _greedy_with_cache(model, ids, 6)
    assert torch.equal(seq, cached)
    torch.testing.assert_close(cached_last, last, rtol=1e-4, atol=1e-5)
    # the test bites: a repeated layer that shares its cache slot with its first run generates wrongly
    for position in (3, 4):
        model.model.layers[position].self_attn.layer_idx = position - 2
    _, wrong_last = _greedy_with_cache(model, ids, 6)
    assert not torch.allclose(wrong_last, last, rtol=1e-3, atol=1e-3)


def test_qwen2_path_exports_layer_types_and_loads(qwen2, tmp_path):
    a, d = qwen2
    steps = [Step(a, 0), Step(a, 1), Step(a, 2), Step(d, 1, 0.7), Step(a, 2), Step(a, 3)]
    recipe = path_recipe(steps, dtype="float32")
    exported = _export(recipe, tmp_path / "qwen2")  # transformers refuses a layer_types list of another length
    config = json.loads((tmp_path / "qwen2" / "config.json").read_text())
    assert config["num_hidden_layers"] == 6
    assert config["layer_types"] == ["sliding_attention", "full_attention", "sliding_attention", "full_attention",
                                     "sliding_attention", "full_attention"]
    model = _resident(qwen2).build(recipe)
    ids = torch.randint(3, 259, (2, 9), generator=torch.Generator().manual_seed(1))  # past the sliding window
    assert torch.equal(_logits(model, ids), _logits(exported, ids))
    seq, last = _greedy_without_cache(model, ids[:1], 4)
    cached, cached_last = _greedy_with_cache(model, ids[:1], 4)
    assert torch.equal(seq, cached)


def test_worker_scores_a_path_beside_parameter_merges(llama):
    """The worker routes a passthrough `slices:` recipe to the resident path; merges into its resident
    model (a parent, a linear merge) do not disturb the path's layers, and back again."""
    from evomerge.executors.worker import Worker, WorkerSpec

    a, d = str(llama.base), str(llama.experts[0])
    worker = Worker(WorkerSpec(sources=(a, d), base=a, evaluator="test_worker:make_evaluator"))
    worker.setup()
    recipe = path_recipe([Step(a, 0), Step(d, 1, 0.9), Step(a, 1), Step(a, 2), Step(a, 3)]).to_dict()
    first = _logits(worker.merge(recipe))
    linear = {"merge_method": "linear", "models": [{"model": d, "parameters": {"weight": 1.0}}]}
    assert torch.equal(_logits(worker.merge(linear)), _logits(_resident([d]).model(d)))
    assert torch.equal(_logits(worker.merge(recipe)), first)


# --- the search space ----------------------------------------------------------------------------------
REPO = Path(__file__).resolve().parents[1]
TOY_SPACE = REPO / "search_spaces" / "toy_layer_path.yaml"
SPACE = """
name: lp
models: [toy:up, toy:rev]
method: layer_path
layer_path: {body}
objective:
  tasks_dir: toy
  tasks: [toy_up, toy_rev]
search: {{trials: 6, seed: 0, limit: 16, top_k: 2}}
"""
SEEDED = "{anchor: up, edits: 2, gain: {low: 0.5, high: 1.5}, seeds: [[{op: repeat, start: 1, length: 2, gain: 0.7}, " \
         "{op: swap, start: 2, donor: rev, gain: 1.2}]]}"


def _space_file(tmp_path: Path, body: str = SEEDED, text: str = SPACE) -> Path:
    path = tmp_path / "lp.yaml"
    path.write_text(textwrap.dedent(text.format(body=body)))
    return path


def test_space_dimensions_seeds_and_pure_recipes():
    from evomerge.search.spacefile import load_space
    from evomerge.search.suggest import baseline_params, build_recipe

    space = load_space(TOY_SPACE)
    names = [d.name for d in space.all_dimensions()]
    assert names == [f"layer_path.{f}.{k}" for k in (0, 1) for f in ("op", "start", "length", "gain")]
    ops = next(d for d in space.all_dimensions() if d.name == "layer_path.op.0")
    assert ops.choices == ("none", "repeat", "swap", "skip") and not space.is_continuous
    seeds = baseline_params(space)
    assert [label for label, _ in seeds] == ["baseline:layer_path identity", "baseline:layer_path repeat 1-2",
                                             "baseline:layer_path swap 1-2 from rev"]
    up, rev = (m.path for m in space.models)
    paths = [path_steps(build_recipe(space, p)) for _, p in seeds]
    assert paths[0] == [Step(up, i) for i in range(4)]
    assert paths[1] == [Step(up, i) for i in (0, 1, 2, 1, 2, 3)]
    assert paths[2] == [Step(up, 0), Step(rev, 1), Step(rev, 2), Step(up, 3)]
    assert build_recipe(space, seeds[1][1]) == build_recipe(space, dict(seeds[1][1]))  # pure


def test_edit_semantics():
    """Edits read the anchor's indices: swaps and skips replace blocks (the later edit wins), a repeat
    runs its (edited) blocks again after its end, with its own gain; lengths are clipped to the span."""
    from evomerge.search.layer_path import apply_edits, edits_of
    from evomerge.search.space import LayerPathSetup, PathEdit

    setup = LayerPathSetup(anchor="a", layers=8, donors=("d",), span=(1, 7), length=(1, 3), edits=4)
    paths = {"a": "A", "d": "D"}
    edits = [PathEdit(op="swap", start=2, length=2, donor="d", gain=1.5), PathEdit(op="repeat", start=3, length=2, gain=0.5),
             PathEdit(op="skip", start=6), PathEdit(op="skip", start=2)]
    steps = apply_edits(setup, edits, paths)
    assert [(s.model, s.layer, s.gain) for s in steps] == [
        ("A", 0, None), ("A", 1, None), ("D", 3, 1.5), ("A", 4, None),  # layer 2 skipped (the later edit wins)
        ("D", 3, 0.5), ("A", 4, 0.5),  # the repeat of 3-4 as edited, at its gain
        ("A", 5, None), ("A", 7, None)]  # 6 skipped
    params = {"layer_path.op.0": "swap", "layer_path.start.0": 6, "layer_path.length.0": 3, "layer_path.gain.0": 1.0}
    params.update({f"layer_path.{f}.{k}": v for k in (1, 2, 3) for f, v in (("op", "none"), ("start", 1))})
    assert edits_of(setup, params)[0].length == 1  # 6 + 3 would leave the span [1, 7)


@pytest.mark.parametrize("body, where, match", [
    ("{anchor: upp}", "layer_path.anchor", "did you mean 'up'"),
    ("{layers: [0, 3]}", "layer_path.layers", "the first layer"),
    ("{layers: [1, 4]}", "layer_path.layers", "must lie within"),
    ("{length: 3}", "layer_path.length", "must lie within"),
    ("{seeds: [[{op: repeat, start: 2, length: 2}]]}", "layer_path.seeds[0][0]", "leave the span"),
    ("{seeds: [[{op: swap, start: 1, donor: sort}]]}", "layer_path.seeds[0][0].donor", "not a donor"),
    ("{edits: 1, seeds: [[{op: skip, start: 1}, {op: skip, start: 2}]]}", "layer_path.seeds[0]", "at most 1"),
    ("{gain: {low: 1.5, high: 0.5}}", "layer_path.gain", "above high"),
    ("{edit: 2}", "layer_path.edit", "did you mean 'edits'"),
])
def test_space_mistakes(tmp_path, body, where, match):
    from evomerge.search.spacefile import load_space

    with pytest.raises(ConfigError, match=match) as exc:
        load_space(_space_file(tmp_path, body))
    assert exc.value.where.endswith(where)


def test_space_mistakes_outside_the_section(tmp_path):
    from evomerge.search.spacefile import load_space

    one = SPACE.replace("[toy:up, toy:rev]", "[toy:up]")
    with pytest.raises(ConfigError, match="swap needs a donor"):
        load_space(_space_file(tmp_path, "{ops: [swap]}", one))
    with pytest.raises(ConfigError, match="an anchor, not a base model"):
        load_space(_space_file(tmp_path, "{}", SPACE.replace("method: layer_path", "base_model: toy:base\nmethod: layer_path")))
    with pytest.raises(ConfigError, match="searched on its own"):
        load_space(_space_file(tmp_path, "{}", SPACE.replace("method: layer_path", "method: [layer_path, linear]")))
    with pytest.raises(ConfigError, match="not the searched method"):
        load_space(_space_file(tmp_path, "{}", SPACE.replace("method: layer_path", "method: linear")))


def test_malformed_spaces_exit_2_before_any_trial(tmp_path, llama, qwen2, capsys):
    """A path whose first slice would not be the anchor's, and models of two architectures: exit 2, and
    nothing is written (no study, no run folder)."""
    first = _space_file(tmp_path, "{layers: [0, 3]}")
    mixed = SPACE.replace("[toy:up, toy:rev]", f"[{llama.base}, {qwen2[0]}]")
    (tmp_path / "mixed").mkdir()
    for name, path in (("first", first), ("architecture", _space_file(tmp_path / "mixed", "{}", mixed))):
        out = tmp_path / f"run-{name}"
        assert main(["search", str(path), "--out", str(out), "--no-progress"]) == 2, name
        assert not out.exists(), name
    err = capsys.readouterr().err
    assert "first layer" in err and "architectures disagree" in err


def test_validate_shows_depth_and_parameters(capsys):
    assert main(["validate", str(TOY_SPACE)]) == 0
    out = capsys.readouterr().out
    assert "layer path  anchor up (4 layers), donors rev; 2 edits of repeat/swap/skip over layers 1-2" in out
    assert "depth       2 to 8 layers (identity 4); parameters 0.39M to 1.38M (identity 0.72M)" in out


# --- end to end on the toy family -------------------------------------------------------------------
@pytest.fixture(scope="module")
def run(tmp_path_factory):
    from evomerge.search.run import run_search
    from evomerge.search.spacefile import load_space

    tmp = tmp_path_factory.mktemp("lp_e2e")
    space = load_space(_space_file(tmp))
    result = run_search(space, tmp / "run", progress=False, evidence=False, log=lambda *a, **k: None)
    return {"space": space, "out": tmp / "run", "result": result}


def _study(out: Path):
    import optuna

    return optuna.load_study(study_name=None, storage=f"sqlite:///{out / 'study.db'}")  # the run's one study


def _trial_recipe(run, label: str):
    from evomerge.search.study import ROLE
    from evomerge.search.suggest import build_recipe

    study = _study(run["out"])
    trial = next(t for t in study.trials if t.user_attrs.get(ROLE) == label)
    return build_recipe(run["space"], trial.params)


@pytest.mark.slow
@pytest.mark.mergekit
def test_best_yaml_is_plain_passthrough_and_reproduces_the_scored_model(run, tmp_path):
    from transformers import AutoModelForCausalLM

    from evomerge.engine.recipe import load_recipe
    from evomerge.executors.worker import Worker
    from evomerge.search.jobs import worker_spec
    from evomerge.search.suggest import build_recipe

    out, space = run["out"], run["space"]
    best = load_recipe(out / "best.yaml")
    study = _study(out)
    winner = study.trials[study.user_attrs["winner"]]
    assert best == build_recipe(space, winner.params) and best.merge_method == "passthrough"
    text = (out / "best.yaml").read_text()
    assert "# layer path: up[0:" in text and "parameters)" in text
    worker = Worker(worker_spec(space))
    worker.setup()
    seeded = _trial_recipe(run, "baseline:layer_path seed 1")  # scaled steps and a swap, whatever won
    assert len(path_steps(seeded)) == 6 and {s.gain for s in path_steps(seeded)} == {None, 0.7, 1.2}
    for name, recipe in (("best", best), ("seeded", seeded)):
        scored = _logits(worker.merge(recipe.to_dict()))
        exported = _export(recipe, tmp_path / name)  # plain transformers, no remote code
        assert torch.equal(scored, _logits(exported)), name
        assert type(exported).__name__ == "LlamaForCausalLM"
    ours = tmp_path / "best"  # written by _export from best's own YAML; now mergekit-yaml from best.yaml itself
    mk = tmp_path / "mergekit"
    subprocess.run([str(Path(sys.executable).with_name("mergekit-yaml")), str(out / "best.yaml"), str(mk)],
                   check=True, capture_output=True)
    _same_tensors(ours, mk)
    _mergekit_same_tensors(seeded, tmp_path / "seeded", tmp_path)


def _same_tensors(a: Path, b: Path) -> None:
    from safetensors.torch import load_file

    def read(folder):
        out = {}
        for f in sorted(folder.glob("*.safetensors")):
            out.update(load_file(str(f)))
        return out

    ta, tb = read(a), read(b)
    assert sorted(ta) == sorted(tb)
    assert all(ta[k].dtype == tb[k].dtype and torch.equal(ta[k], tb[k]) for k in ta)


def _mergekit_same_tensors(recipe, ours: Path, tmp_path: Path) -> None:
    import yaml
    from mergekit.config import MergeConfiguration
    from mergekit.merge import MergeOptions, run_merge

    theirs = tmp_path / "mk-seeded"
    run_merge(MergeConfiguration.model_validate(yaml.safe_load(recipe.to_yaml())), str(theirs),
              MergeOptions(quiet=True, write_model_card=False, copy_tokenizer=True))
    _same_tensors(ours, theirs)
