"""Mixtures of experts from dense fine-tunes: `evomerge moe` against mergekit-moe and a hand computation.

- The schema is mergekit-moe's, strict (typos fail with "did you mean"), and round-trips through YAML.
- `cheap_embed` router rows equal a hand computation (sum of token embedding rows, minus the negative
  prompts', unit length).
- Every tensor equals mergekit-moe 0.1.5's for the same config (run in this process through its
  Python entry point): hidden, hidden_avg, cheap_embed, and the random modes with noise_scale and
  residual_scale under `--random-seed` (same generator, same draw order), for Mixtral and Qwen2-MoE.
- The output loads with AutoModelForCausalLM and generates; the resident sink the search uses writes
  the same tensors into an in-memory model.
- Bad input: clear errors, exit 2, nothing written.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from evomerge.cli import main
from evomerge.errors import ConfigError
from evomerge.moe.config import MoEConfig, load_moe_config

pytestmark = pytest.mark.usefixtures("one_torch_thread")

PROMPTS = [["up abc=", "upper q="], ["rev abc="], ["sort cab=", "sort zyx="], ["next abc="]]


def _config(fam, tmp_path: Path, name: str = "moe.yaml", *, experts=None, **top) -> Path:
    experts = experts if experts is not None else [
        {"source_model": str(p), "positive_prompts": PROMPTS[i]} for i, p in enumerate(fam.experts)]
    data = {"base_model": str(fam.base), "gate_mode": "cheap_embed", "experts_per_token": 2, "experts": experts,
            **top}
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return path


def _state(folder):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(folder)).state_dict()


def _mergekit_moe(config_path: Path, out: Path, seed: int) -> None:
    """mergekit-moe's own build, in this process (its CLI does exactly this)."""
    import mergekit.scripts.moe as mk
    from mergekit.merge import MergeOptions
    from mergekit.moe.config import MoEMergeConfig

    options = MergeOptions(random_seed=seed, quiet=True)
    options.apply_global_options()
    config = MoEMergeConfig.model_validate(yaml.safe_load(config_path.read_text(encoding="utf-8")))
    mk.build(config, out_path=str(out), merge_options=options, device="cpu")


def _assert_same(ours: Path, theirs: Path) -> int:
    import torch

    a, b = _state(ours), _state(theirs)
    assert a.keys() == b.keys()
    bad = [k for k in a if a[k].dtype != b[k].dtype or not torch.equal(a[k], b[k])]
    assert bad == [], f"tensors differ from mergekit-moe: {bad[:5]}"
    return len(a)


# --- schema ---------------------------------------------------------------------------------------
def test_schema_round_trip_and_typos(tmp_path):
    text = """
base_model: ./base
architecture: mixtral
gate_mode: hidden
dtype: bfloat16
experts_per_token: 2
random_seed: 3
experts:
  - source_model: ./a
    positive_prompts: ["math", "add"]
    negative_prompts: ["poetry"]
    noise_scale: 0.01
    residual_scale: 0.5
  - source_model: ./b
    positive_prompts: ["story"]
shared_experts:
  - source_model: ./c
    positive_prompts: ["anything"]
"""
    cfg = MoEConfig.from_yaml(text)
    assert MoEConfig.from_yaml(cfg.to_yaml(comments=["a comment"])) == cfg
    assert cfg.referenced_models() == ["./base", "./a", "./b", "./c"]
    with pytest.raises(ConfigError, match=r"experts\[0\].positve_prompts: unknown key.*did you mean 'positive_prompts'"):
        MoEConfig.from_yaml(text.replace("positive_prompts: [\"math\"", "positve_prompts: [\"math\""))
    with pytest.raises(ConfigError, match=r"gate_mode.*unknown gate_mode 'hiden'.*did you mean 'hidden'"):
        MoEConfig.from_yaml(text.replace("gate_mode: hidden", "gate_mode: hiden"))
    with pytest.raises(ConfigError, match="duplicate|twice"):
        MoEConfig.from_yaml(text + "gate_mode: random\n", source="x.yaml")
    with pytest.raises(ConfigError, match="noise_scale must be >= 0"):
        MoEConfig.from_yaml(text.replace("noise_scale: 0.01", "noise_scale: -1"))


def test_mergekit_moe_reads_our_config_file(tmp_path, tiny_llama):
    """Our extension (random_seed) is ignored by mergekit-moe's schema, so it reads our files."""
    from mergekit.moe.config import MoEMergeConfig

    fam = tiny_llama(n_experts=2)
    path = _config(fam, tmp_path, random_seed=5, gate_mode="random")
    theirs = MoEMergeConfig.model_validate(yaml.safe_load(path.read_text()))
    ours = load_moe_config(path)
    assert [str(e.source_model.model.path) for e in theirs.experts] == [e.source_model for e in ours.experts]
    assert theirs.gate_mode == ours.gate_mode and theirs.experts_per_token == ours.experts_per_token


# --- router: hand computation ------------------------------------------------------------------------
def test_cheap_embed_router_equals_hand_computation(tmp_path, tiny_llama):
    import torch
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    fam = tiny_llama(n_experts=2)
    experts = [{"source_model": str(fam.experts[0]), "positive_prompts": ["ab", "c"], "negative_prompts": ["b"]},
               {"source_model": str(fam.experts[1]), "positive_prompts": ["zz"]}]
    path = _config(fam, tmp_path, experts=experts)
    assert main(["moe", str(path), str(tmp_path / "out"), "--no-progress"]) == 0
    got = load_file(str(tmp_path / "out" / "model.safetensors"))
    embed = load_file(str(fam.base / "model.safetensors"))["model.embed_tokens.weight"].double()
    tok = AutoTokenizer.from_pretrained(str(fam.base))
    bos = tok.bos_token_id

    def vec(prompts):  # every prompt is <s> + its bytes; padding never counts
        total = torch.zeros(embed.shape[1], dtype=torch.float64)
        for p in prompts:
            for t in [bos] + tok(p, add_special_tokens=False)["input_ids"]:
                total += embed[t]
        return total / total.norm()

    rows = []
    for e in experts:
        v = vec(e["positive_prompts"]) - (vec(e["negative_prompts"]) if "negative_prompts" in e else 0)
        rows.append(v / v.norm())
    want = torch.stack(rows)
    for layer in range(4):
        gate = got[f"model.layers.{layer}.block_sparse_moe.gate.weight"].double()
        assert gate.shape == (2, embed.shape[1])
        assert torch.allclose(gate, want, atol=1e-6), (gate - want).abs().max()


# --- cross-check against mergekit-moe ------------------------------------------------------------------
CASES = {
    "hidden+noise+residual": dict(gate_mode="hidden", extra=[{"noise_scale": 0.01}, {"residual_scale": 0.5}, {}]),
    "hidden_avg": dict(gate_mode="hidden_avg", extra=[{}, {}, {}]),
    "cheap_embed_bf16": dict(gate_mode="cheap_embed", dtype="bfloat16", extra=[{}, {"residual_scale": 2.0}, {}]),
    "random+noise": dict(gate_mode="random", extra=[{"noise_scale": 0.05}, {}, {"noise_scale": 0.0}]),
    "uniform_random": dict(gate_mode="uniform_random", extra=[{}, {}, {"noise_scale": 0.02}]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_same_tensors_as_mergekit_moe_mixtral(case, tmp_path, tiny_llama):
    spec = CASES[case]
    fam = tiny_llama(n_experts=3, arch="mistral" if case == "hidden_avg" else "llama")
    experts = [{"source_model": str(p), "positive_prompts": PROMPTS[i], **spec["extra"][i]}
               for i, p in enumerate(fam.experts)]
    experts[1]["negative_prompts"] = ["up abc="]
    top = {"gate_mode": spec["gate_mode"], "random_seed": 11}
    if "dtype" in spec:
        top["dtype"] = spec["dtype"]
    path = _config(fam, tmp_path, experts=experts, **top)
    assert main(["moe", str(path), str(tmp_path / "ours"), "--no-progress"]) == 0
    _mergekit_moe(path, tmp_path / "theirs", seed=11)
    assert _assert_same(tmp_path / "ours", tmp_path / "theirs") > 0
    ours = json.loads((tmp_path / "ours" / "config.json").read_text())
    theirs = json.loads((tmp_path / "theirs" / "config.json").read_text())
    ours.pop("dtype"), theirs.pop("dtype", None), theirs.pop("torch_dtype", None)
    assert ours == theirs
    assert ours["architectures"] == ["MixtralForCausalLM"] and ours["num_local_experts"] == 3


def test_same_tensors_as_mergekit_moe_qwen2_with_shared_expert(tmp_path, tiny_llama):
    """mergekit-moe 0.1.5 opens only the base's and the routed experts' files, so its shared expert
    must be one of those (here: the base, the usual choice); evomerge also takes any other model."""
    fam = tiny_llama(n_experts=3)
    experts = [{"source_model": str(fam.experts[i]), "positive_prompts": PROMPTS[i]} for i in range(2)]
    experts[0]["noise_scale"] = 0.01
    shared = [{"source_model": str(fam.base), "positive_prompts": ["anything at all"], "residual_scale": 0.3,
               "noise_scale": 0.02}]
    path = _config(fam, tmp_path, experts=experts, shared_experts=shared, gate_mode="hidden", experts_per_token=1)
    assert main(["moe", str(path), str(tmp_path / "ours"), "--no-progress"]) == 0
    _mergekit_moe(path, tmp_path / "theirs", seed=0)
    _assert_same(tmp_path / "ours", tmp_path / "theirs")
    cfg = json.loads((tmp_path / "ours" / "config.json").read_text())
    assert cfg["architectures"] == ["Qwen2MoeForCausalLM"] and cfg["num_experts"] == 2


# --- the output is a model ---------------------------------------------------------------------------
def test_output_loads_generates_and_explains_itself(tmp_path, tiny_llama):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    fam = tiny_llama(n_experts=4)
    path = _config(fam, tmp_path, gate_mode="hidden")
    out = tmp_path / "my-moe"
    assert main(["moe", str(path), str(out), "--no-progress", "--out-shard-size", "300kB"]) == 0
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    assert len(shards) > 1 and (out / "model.safetensors.index.json").is_file()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "mergekit_moe_config.yml", "README.md"):
        assert (out / name).is_file(), name
    assert load_moe_config(out / "mergekit_moe_config.yml") == load_moe_config(path)
    card = (out / "README.md").read_text()
    assert "Mixtral" in card and "4 experts, 2 per token" in card and "active per token" in card
    model = AutoModelForCausalLM.from_pretrained(str(out))
    assert type(model).__name__ == "MixtralForCausalLM"
    assert model.config.num_local_experts == 4 and model.config.num_experts_per_tok == 2
    tok = AutoTokenizer.from_pretrained(str(out))
    ids = tok("up abc=", return_tensors="pt")
    with torch.no_grad():
        gen = model.generate(**ids, max_new_tokens=5, do_sample=False)
    assert gen.shape[1] == ids["input_ids"].shape[1] + 5
    # Attention and norms are the base's; each expert's MLP is its fine-tune's.
    from safetensors.torch import load_file

    state = model.state_dict()
    base = load_file(str(fam.base / "model.safetensors"))
    exp2 = load_file(str(fam.experts[2] / "model.safetensors"))
    assert torch.equal(state["model.layers.1.self_attn.q_proj.weight"], base["model.layers.1.self_attn.q_proj.weight"])
    fused = state["model.layers.1.mlp.experts.gate_up_proj"][2]
    half = fused.shape[0] // 2
    assert torch.equal(fused[:half], exp2["model.layers.1.mlp.gate_proj.weight"])
    assert torch.equal(fused[half:], exp2["model.layers.1.mlp.up_proj.weight"])


def test_validate_prints_the_moe_without_writing(tmp_path, tiny_llama, capsys):
    fam = tiny_llama(n_experts=4)
    path = _config(fam, tmp_path)
    assert main(["validate", str(path)]) == 0
    out = capsys.readouterr().out
    assert "Mixtral" in out and "4 experts, 2 per token" in out and "M active per token" in out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["moe.yaml"]


@pytest.mark.parametrize("cfg_name", ["mixtral_random", "qwen_hidden"])
def test_resident_sink_writes_the_exported_tensors(cfg_name, tmp_path, tiny_llama):
    """The search's in-memory path: a resident transformers MoE, written in place, equals the export."""
    import torch

    from evomerge.engine.checkpoints import Sources
    from evomerge.moe.build import GateSource, ResidentMoESink, plan_moe, resident_model, write_moe

    fam = tiny_llama(n_experts=3)
    extra = {}
    experts = None
    if cfg_name == "qwen_hidden":
        experts = [{"source_model": str(fam.experts[i]), "positive_prompts": PROMPTS[i], "noise_scale": 0.01}
                   for i in range(2)]
        extra = {"shared_experts": [{"source_model": str(fam.experts[2]), "positive_prompts": ["x y z"]}],
                 "gate_mode": "hidden"}
    else:
        extra = {"gate_mode": "random", "random_seed": 4}
    path = _config(fam, tmp_path, experts=experts, **extra)
    assert main(["moe", str(path), str(tmp_path / "out"), "--no-progress"]) == 0
    cfg = load_moe_config(path)
    sources = Sources.open(cfg.referenced_models())
    p = plan_moe(cfg, sources)
    model = resident_model(p)
    with torch.no_grad():
        for param in model.parameters():
            param.fill_(float("nan"))  # anything not written would show
    write_moe(ResidentMoESink(model), p, sources, GateSource(str(fam.base), sources, cfg.base_model))
    want = _state(tmp_path / "out")
    got = model.state_dict()
    assert got.keys() == want.keys()
    assert all(torch.equal(got[k], want[k]) for k in want)


def test_parameter_counts(tmp_path, tiny_llama):
    from evomerge.engine.checkpoints import Sources
    from evomerge.moe.build import plan_moe

    fam = tiny_llama(n_experts=4)
    cfg = load_moe_config(_config(fam, tmp_path))
    p = plan_moe(cfg, Sources.open(cfg.referenced_models()))
    total, active = p.parameters
    # tiny llama: hidden 32, intermediate 64, 4 layers; each expert MLP is 3 * 32 * 64 per layer
    mlp = 3 * 32 * 64 * 4
    assert total - active == mlp * (4 - 2)
    from transformers import AutoModelForCausalLM

    dense = sum(t.numel() for t in AutoModelForCausalLM.from_pretrained(str(fam.base)).parameters())
    router = 4 * 4 * 32
    assert total == dense - mlp + 4 * mlp + router


# --- bad input ------------------------------------------------------------------------------------------
def _refused(args, capsys, match: str, nothing_in: Path) -> None:
    before = sorted(p.name for p in nothing_in.iterdir())
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "evomerge: error:" in err and re.search(match, err), err
    assert sorted(p.name for p in nothing_in.iterdir()) == before  # nothing written, no temp folder left


def test_bad_inputs_are_refused_before_anything_is_written(tmp_path, tiny_llama, capsys):
    fam = tiny_llama(n_experts=3)
    other = tiny_llama(n_experts=1, intermediate=48)
    mistral = tiny_llama(n_experts=1, arch="mistral")
    out = str(tmp_path / "out")

    def run(match, **kw):
        experts = kw.pop("experts", None)
        path = _config(fam, tmp_path, experts=experts, **kw)
        _refused(["moe", str(path), out, "--no-progress"], capsys, match, tmp_path)
        _refused(["validate", str(path)], capsys, match, tmp_path)

    good = [{"source_model": str(p), "positive_prompts": PROMPTS[i]} for i, p in enumerate(fam.experts)]
    run(r"experts_per_token.*only 3 expert", experts_per_token=4)
    run(r"experts_per_token must be at least 1", experts_per_token=0)
    run(r"experts\[2\] have the same prompts",
        experts=good[:2] + [{**good[2], "positive_prompts": PROMPTS[0]}])
    run(r"experts\[1\].positive_prompts.*places the router from prompts",
        gate_mode="hidden", experts=[good[0], {"source_model": str(fam.experts[1])}, good[2]])
    run(r"every expert is the same model", experts=[{**g, "source_model": str(fam.experts[0])} for g in good])
    run(r"experts\[1\].source_model.*\[48, 32\].*\[64, 32\]",
        experts=[good[0], {**good[1], "source_model": str(other.experts[0])}, good[2]])
    run(r"different architectures.*mistral",
        experts=[good[0], {**good[1], "source_model": str(mistral.experts[0])}, good[2]])
    run(r"unknown MoE architecture 'deepseekk'", architecture="deepseekk")
    run(r"shared_experts\[0\].*DeepSeek-MoE.*only on the Hugging Face Hub",
        shared_experts=[{"source_model": str(fam.experts[0])}])
    run(r"some shared experts have prompts and some do not",
        shared_experts=[{"source_model": str(fam.experts[0]), "positive_prompts": ["a"]},
                        {"source_model": str(fam.experts[1])}])
    # every expert the same is allowed when asked for
    same = _config(fam, tmp_path, experts=[{**g, "source_model": str(fam.experts[0])} for g in good])
    assert main(["moe", str(same), out, "--no-progress", "--allow-all-same"]) == 0


def test_base_without_moe_counterpart_is_refused(tmp_path, capsys):
    from transformers import GPT2Config, GPT2LMHeadModel

    from tinymodels import save_tokenizer

    folders = []
    for i in range(3):
        model = GPT2LMHeadModel(GPT2Config(n_embd=16, n_layer=2, n_head=2, vocab_size=259, n_positions=32))
        folder = tmp_path / f"gpt{i}"
        model.save_pretrained(str(folder))
        save_tokenizer(folder)
        folders.append(folder)
    data = {"base_model": str(folders[0]), "gate_mode": "random",
            "experts": [{"source_model": str(folders[1])}, {"source_model": str(folders[2])}]}
    path = tmp_path / "gpt.yaml"
    path.write_text(yaml.safe_dump(data))
    _refused(["moe", str(path), str(tmp_path / "out"), "--no-progress"], capsys,
             r"base_model: a gpt2 base has no MoE counterpart", tmp_path)


def test_mixtral_refuses_a_base_with_attention_bias(tmp_path, tiny_llama, capsys):
    fam = tiny_llama(n_experts=2, attention_bias=True)
    path = _config(fam, tmp_path)
    _refused(["moe", str(path), str(tmp_path / "out"), "--no-progress"], capsys,
             r"attention or MLP biases.*architecture: qwen", tmp_path)
    # Qwen2-MoE keeps q/k/v biases (but o_proj has none there): refused as well, with its own reason
    shared = [{"source_model": str(fam.experts[0]), "positive_prompts": ["x"]}]
    path = _config(fam, tmp_path, shared_experts=shared, name="q.yaml")
    _refused(["moe", str(path), str(tmp_path / "out"), "--no-progress"], capsys,
             r"output-projection biases", tmp_path)


def test_merge_and_moe_point_at_each_other(tmp_path, tiny_llama, capsys):
    fam = tiny_llama(n_experts=2)
    moe_cfg = _config(fam, tmp_path, experts=[{"source_model": str(p), "positive_prompts": PROMPTS[i]}
                                              for i, p in enumerate(fam.experts)])
    _refused(["merge", str(moe_cfg), str(tmp_path / "out")], capsys, r"MoE config.*evomerge moe", tmp_path)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({"merge_method": "linear", "models": [
        {"model": str(p), "parameters": {"weight": 1.0}} for p in fam.experts]}))
    _refused(["moe", str(recipe), str(tmp_path / "out")], capsys, r"unknown key 'merge_method'.*evomerge merge",
             tmp_path)
