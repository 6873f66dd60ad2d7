"""Opening source checkpoints: lazy reads equal the saved tensors; every bad folder is a clear error."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from evomerge.engine.checkpoints import Sources, split_layer_name
from evomerge.errors import CheckpointError


def test_reads_the_saved_tensors(tiny_llama):
    fam = tiny_llama()
    src = Sources.open([str(fam.base)])
    saved = load_file(str(fam.base / "model.safetensors"))
    assert sorted(src.names(str(fam.base))) == sorted(saved)
    for name, value in saved.items():
        assert torch.equal(src.tensor(str(fam.base), name), value)
        assert src.info(str(fam.base), name).shape == tuple(value.shape)
    ck = src.checkpoint(str(fam.base))
    assert ck.num_layers == 4 and ck.layer_prefix == "model.layers"
    assert "self_attn.q_proj.weight" in ck.layer_suffixes
    assert set(ck.non_layer) == {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"}
    assert ck.vocab_size == 259
    assert src.config(str(fam.base))["num_hidden_layers"] == 4


def test_sharded_checkpoint_reads_the_same(tiny_llama, tmp_path):
    from transformers import AutoModelForCausalLM

    fam = tiny_llama()
    model = AutoModelForCausalLM.from_pretrained(str(fam.base))
    model.save_pretrained(str(tmp_path / "sharded"), max_shard_size="20KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    src = Sources.open([str(fam.base), str(tmp_path / "sharded")])
    for name in src.names(str(fam.base)):
        assert torch.equal(src.tensor(str(fam.base), name), src.tensor(str(tmp_path / "sharded"), name))
    src.check_compatible()


def test_relative_paths_resolve_from_the_current_folder(tiny_llama, monkeypatch):
    fam = tiny_llama()
    monkeypatch.chdir(fam.root)
    src = Sources.open(["./base", "expert0"])
    assert src.path("./base").resolve() == fam.base.resolve()


def test_split_layer_name():
    assert split_layer_name("model.layers.12.mlp.up_proj.weight") == ("model.layers", 12, "mlp.up_proj.weight")
    assert split_layer_name("transformer.h.3.attn.c_attn.bias") == ("transformer.h", 3, "attn.c_attn.bias")
    assert split_layer_name("model.embed_tokens.weight") is None


def test_missing_folder_names_the_field(tmp_path):
    with pytest.raises(CheckpointError) as info:
        Sources.open({str(tmp_path / "nope"): "models[1].model"})
    assert info.value.where == "models[1].model"
    assert "not found" in info.value.what and "relative paths" in info.value.fix


def test_hub_id_is_not_downloaded_offline():
    # the test session runs with HF_HUB_OFFLINE=1 and an empty cache (tests/test_references.py builds one)
    with pytest.raises(CheckpointError, match="neither a local folder nor in the Hugging Face cache"):
        Sources.open({"meta-llama/Llama-3-8B": "base_model"})


def test_bin_only_is_refused(tiny_llama, tmp_path):
    fam = tiny_llama()
    d = tmp_path / "binonly"
    d.mkdir()
    shutil.copy(fam.base / "config.json", d / "config.json")
    (d / "pytorch_model.bin").write_bytes(b"not read")
    with pytest.raises(CheckpointError) as info:
        Sources.open({str(d): "models[0].model"})
    assert "pickle" in info.value.what and "safetensors only" in info.value.what


def test_no_config_and_file_instead_of_folder(tiny_llama, tmp_path):
    fam = tiny_llama()
    d = tmp_path / "noconfig"
    d.mkdir()
    shutil.copy(fam.base / "model.safetensors", d / "model.safetensors")
    with pytest.raises(CheckpointError, match="no config.json"):
        Sources.open([str(d)])
    with pytest.raises(CheckpointError, match="is a file"):
        Sources.open([str(d / "model.safetensors")])


def test_corrupt_safetensors(tiny_llama, tmp_path):
    fam = tiny_llama()
    d = tmp_path / "corrupt"
    d.mkdir()
    shutil.copy(fam.base / "config.json", d / "config.json")
    (d / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}")
    with pytest.raises(CheckpointError, match="cannot read model.safetensors"):
        Sources.open([str(d)])


def test_architectures_disagree(tiny_llama):
    llama, mistral = tiny_llama(), tiny_llama(arch="mistral")
    src = Sources.open({str(llama.base): "base_model", str(mistral.base): "models[1].model"})
    with pytest.raises(CheckpointError) as info:
        src.check_compatible()
    assert "architectures disagree" in info.value.what and info.value.where == "models[1].model"


def test_shapes_disagree(tiny_llama):
    small, wide = tiny_llama(), tiny_llama(hidden=48, n_experts=0)
    src = Sources.open([str(small.base), str(wide.base)])
    with pytest.raises(CheckpointError, match="shapes disagree"):
        src.check_compatible()


def test_tokenizer_vocab_sizes_disagree(tiny_llama, tmp_path):
    fam = tiny_llama()
    d = tmp_path / "bigger-tokenizer"
    shutil.copytree(fam.experts[0], d)
    tj = json.loads((d / "tokenizer.json").read_text())
    tj["added_tokens"].append({"id": 259, "content": "<extra>", "single_word": False, "lstrip": False,
                               "rstrip": False, "normalized": False, "special": True})
    (d / "tokenizer.json").write_text(json.dumps(tj))
    src = Sources.open([str(fam.base), str(d)])
    with pytest.raises(CheckpointError, match="tokenizer vocab sizes disagree: .* 259 tokens, .* 260"):
        src.check_compatible()


def test_copy_reads_equal_mmap_reads(tiny_llama):
    fam = tiny_llama(dtype="bfloat16", arch="mistral", tie=True)
    mm = Sources.open([str(fam.base)])
    cp = Sources.open([str(fam.base)], reads="copy")
    for name in mm.names(str(fam.base)):
        a, b = mm.tensor(str(fam.base), name), cp.tensor(str(fam.base), name)
        assert a.dtype == b.dtype == torch.bfloat16 and torch.equal(a, b)
    cp.close()
