"""LoRA adapters (`base+adapter`): applied tensor by tensor as the merge reads them, bit for bit as peft's
`merge_and_unload` does; a merge naming one gives mergekit's tensors; bad adapters are refused.

Adapters are made here with peft on the tiny models (random, non-zero B so that every update counts):
plain linear targets, and one with an embedding target, `modules_to_save`, rsLoRA and per-module
rank and alpha patterns. mergekit needs `--lora-merge-cache` (it merges the adapter with peft into a
folder first); evomerge never writes that copy.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import yaml
from safetensors.torch import load_file

from evomerge.cli import main
from evomerge.engine.checkpoints import Sources
from evomerge.engine.merge import merge_to_dir

peft = pytest.importorskip("peft")

ADAPTERS = {
    "plain": dict(target_modules=["q_proj", "v_proj", "down_proj"]),
    "embedding_rslora_patterns": dict(target_modules=["q_proj", "embed_tokens", "gate_proj"], modules_to_save=["lm_head"],
                                      use_rslora=True, rank_pattern={"gate_proj": 2}, alpha_pattern={"q_proj": 3}),
}


def make_adapter(base, out, seed=0, **config):
    """A peft LoRA adapter for the model folder `base`, saved to `out` (safetensors)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(str(base)),
                           LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, **config))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.mul_(5)  # updates large enough to change bf16 weights
            elif "modules_to_save" in name:
                p.add_(0.1)
    model.save_pretrained(str(out))
    return out


@pytest.fixture(scope="module")
def adapters(tiny_llama, tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    out = {}
    for dtype in ("float32", "bfloat16"):
        fam = tiny_llama(dtype=dtype)
        for name, config in ADAPTERS.items():
            out[dtype, name] = (fam, make_adapter(fam.base, root / f"{dtype}-{name}", **config))
    return out


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("name", sorted(ADAPTERS))
def test_every_tensor_equals_peft_merge_and_unload(adapters, dtype, name):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    fam, adapter = adapters[dtype, name]
    expected = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(fam.base)), str(adapter)) \
        .merge_and_unload().state_dict()
    ref = f"{fam.base}+{adapter}"
    sources = Sources.open([ref, str(fam.base)])
    changed = 0
    for key in sources.names(ref):
        ours = sources.tensor(ref, key)
        assert ours.dtype == expected[key].dtype and torch.equal(ours, expected[key]), key
        changed += not torch.equal(ours, sources.tensor(str(fam.base), key))
    assert changed >= 8  # the adapter did change the model


def test_a_merge_with_an_adapter_gives_mergekits_tensors(adapters, tmp_path):
    from mergekit.config import MergeConfiguration
    from mergekit.merge import MergeOptions, run_merge

    fam, adapter = adapters["bfloat16", "embedding_rslora_patterns"]
    text = (f"merge_method: ties\nbase_model: {fam.base}\nmodels:\n  - model: {fam.base}+{adapter}\n"
            f"    parameters: {{weight: 0.6, density: 0.7}}\n  - model: {fam.experts[0]}\n"
            f"    parameters: {{weight: 0.4, density: 0.5}}\ndtype: bfloat16\n")
    (tmp_path / "r.yaml").write_text(text)
    ours = merge_to_dir(tmp_path / "r.yaml", tmp_path / "ours", progress=False)
    run_merge(MergeConfiguration.model_validate(yaml.safe_load(text)), str(tmp_path / "theirs"),
              MergeOptions(quiet=True, write_model_card=False, copy_tokenizer=True, random_seed=0,
                           lora_merge_cache=str(tmp_path / "lora-cache")))
    a, b = load_file(str(ours / "model.safetensors")), load_file(str(tmp_path / "theirs" / "model.safetensors"))
    assert sorted(a) == sorted(b)
    for key in b:
        assert torch.equal(a[key], b[key]), key
    assert not list(tmp_path.glob("ours/*lora*")) and (tmp_path / "lora-cache").is_dir()  # ours wrote no merged copy


def _refused(capsys, tmp_path, reference, fragments):
    (tmp_path / "r.yaml").write_text(f"merge_method: linear\nmodels:\n  - model: {reference}\n")
    before = sorted(p.name for p in tmp_path.iterdir())
    for argv in (["validate", tmp_path / "r.yaml"], ["merge", tmp_path / "r.yaml", tmp_path / "out", "--no-progress"]):
        assert main([str(a) for a in argv]) == 2
        err = capsys.readouterr().err
        assert err.startswith("evomerge: error: models[0].model") and len(err.strip().splitlines()) == 1, err
        for fragment in fragments:
            assert fragment in err, (fragment, err)
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing written


def test_a_pickled_adapter_is_refused(adapters, tmp_path, capsys):
    fam, adapter = adapters["float32", "plain"]
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    shutil.copy(adapter / "adapter_config.json", pickled)
    (pickled / "adapter_model.bin").write_bytes(b"never unpickled")
    _refused(capsys, tmp_path, f"{fam.base}+{pickled}", ["adapter_model.bin (a pickle)", "safetensors only"])


def test_an_adapter_for_another_base_is_refused(adapters, tiny_llama, tmp_path, capsys):
    _, adapter = adapters["float32", "plain"]
    other = tiny_llama(hidden=48, n_experts=0)
    _refused(capsys, tmp_path, f"{other.base}+{adapter}", ["it was made for another model"])


def test_dora_is_refused_by_name(adapters, tmp_path, capsys):
    fam, adapter = adapters["float32", "plain"]
    dora = tmp_path / "dora"
    shutil.copytree(adapter, dora)
    config = json.loads((dora / "adapter_config.json").read_text())
    config["use_dora"] = True
    (dora / "adapter_config.json").write_text(json.dumps(config))
    _refused(capsys, tmp_path, f"{fam.base}+{dora}", ["DoRA (use_dora)"])
