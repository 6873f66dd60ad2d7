"""Model references as mergekit reads them (issue 24, item 1): Hub ids, revisions and `base+adapter`,
resolved offline from a Hugging Face cache that the tests build in the cache's own layout
(tests/hubcache.py), with HF_HUB_OFFLINE=1 (set by conftest.py for the whole session).

A config copied verbatim from a LazyMergekit model card merges from that cache and gives mergekit's
tensors (mergekit itself cannot resolve Hub ids offline, so it is given the snapshot folders). Bad
references exit 2 with the field named and nothing written. One test downloads a tiny public model;
it is skipped unless EVOMERGE_NETWORK_TESTS=1.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from evomerge.cli import main
from evomerge.engine.hub import choose_files
from evomerge.engine.references import Reference, parse
from evomerge.errors import CheckpointError, ConfigError
from hubcache import publish


@pytest.fixture
def hub(tiny_llama, tmp_path, monkeypatch):
    """A cache holding acme/base (main, tag v1), acme/expert (main: expert0; branch v2: expert1) and the
    LoRA adapter acme/lora; HF_HUB_CACHE points at it."""
    from test_lora import make_adapter

    cache = tmp_path / "hf-cache"
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    fam = tiny_llama()
    commits = {
        "base": publish(cache, "acme/base", fam.base, refs=("main", "v1")),
        "expert": publish(cache, "acme/expert", fam.experts[0]),
        "expert-v2": publish(cache, "acme/expert", fam.experts[1], refs=("v2",)),
    }
    adapter = tmp_path / "adapter-src"
    if not adapter.exists():
        make_adapter(fam.base, adapter, target_modules=["q_proj", "down_proj"])
    commits["lora"] = publish(cache, "acme/lora", adapter)
    return fam, cache, commits


def _merge(capsys, tmp_path, text, name="r"):
    (tmp_path / f"{name}.yaml").write_text(text)
    code = main(["merge", str(tmp_path / f"{name}.yaml"), str(tmp_path / f"{name}-out"), "--no-progress"])
    captured = capsys.readouterr()
    return code, captured.err, tmp_path / f"{name}-out"


LINEAR = """merge_method: linear
base_model: {base}
models:
  - model: {base}
    parameters: {{weight: 0.2}}
  - model: {e0}
    parameters: {{weight: 0.5}}
  - model: {e1}
    parameters: {{weight: 0.3}}
"""


def test_hub_ids_and_revisions_resolve_from_the_cache_offline(hub, tmp_path, capsys):
    fam, _, commits = hub
    code, err, out = _merge(capsys, tmp_path, LINEAR.format(base="acme/base", e0="acme/expert", e1="acme/expert@v2"))
    assert code == 0, err
    code, err_local, local = _merge(capsys, tmp_path, LINEAR.format(base=fam.base, e0=fam.experts[0], e1=fam.experts[1]),
                                    "local")
    assert code == 0, err_local
    a, b = load_file(str(out / "model.safetensors")), load_file(str(local / "model.safetensors"))
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in b)
    # which commit each reference resolved to: said on stderr, kept in the model card
    assert f"acme/expert@v2 (commit {commits['expert-v2']}): from the cache" in err
    assert f"acme/expert@main (commit {commits['expert']})" in err
    card = (out / "README.md").read_text()
    assert "base_model:\n- acme/base\n" in card
    for commit in (commits["base"], commits["expert"], commits["expert-v2"]):
        assert commit in card


def test_a_commit_hash_and_a_tag_are_revisions_too(hub, tmp_path, capsys):
    _, _, commits = hub
    text = f"merge_method: passthrough\nmodels:\n  - model: acme/expert@{commits['expert-v2']}\n"
    code, err, out = _merge(capsys, tmp_path, text)
    assert code == 0, err
    code, err, tagged = _merge(capsys, tmp_path, "merge_method: passthrough\nmodels:\n  - model: acme/base@v1\n", "tag")
    assert code == 0 and f"commit {commits['base']}" in err


def test_a_lora_reference_from_the_hub_equals_the_local_one(hub, tmp_path, capsys):
    fam, cache, commits = hub
    code, err, out = _merge(capsys, tmp_path, "merge_method: passthrough\nmodels:\n  - model: acme/base@v1+acme/lora\n")
    assert code == 0, err
    adapter = tmp_path / "adapter-src"
    code, err2, local = _merge(capsys, tmp_path, f"merge_method: passthrough\nmodels:\n  - model: {fam.base}+{adapter}\n",
                               "local")
    assert code == 0, err2
    a, b = load_file(str(out / "model.safetensors")), load_file(str(local / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in b)
    assert f"acme/lora@main (commit {commits['lora']})" in err
    assert f"adapter acme/lora@main (commit {commits['lora']})" in (out / "README.md").read_text()


# --- bad references: exit 2, the field named, nothing written ----------------------------------------------
def _bad_adapter_repos(cache, tiny_llama, tmp_path):
    from test_lora import make_adapter

    other = tiny_llama(hidden=48, n_experts=0)
    publish(cache, "acme/wide-lora", make_adapter(other.base, tmp_path / "wide-adapter", target_modules=["q_proj"]))
    pickled = tmp_path / "pickled-adapter"
    pickled.mkdir()
    (pickled / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 8}))
    (pickled / "adapter_model.bin").write_bytes(b"never unpickled")
    publish(cache, "acme/pickled-lora", pickled)


BAD_REFERENCES = {
    # reference in models[1].model: fragments of the one-line error
    "unknown repo offline": ("acme/nothing", ["models[1].model", "'acme/nothing' is neither a local folder nor in the "
                                              "Hugging Face cache", "HF_HUB_OFFLINE is set", "hf download acme/nothing"]),
    "revision not in the cache": ("acme/expert@v3", ["models[1].model", "revision 'v3' of acme/expert is not in the "
                                                     "Hugging Face cache", "refs main, v2"]),
    "adapter for another base": ("acme/base+acme/wide-lora", ["models[1].model", "it was made for another model"]),
    "pickled adapter": ("acme/base+acme/pickled-lora", ["models[1].model", "adapter_model.bin (a pickle)",
                                                        "safetensors only"]),
    "two plus signs": ("acme/base+acme/lora+acme/lora", ["models[1].model", "more than one '+'"]),
}


@pytest.mark.parametrize("case", sorted(BAD_REFERENCES))
def test_bad_references_exit_2_naming_the_field(case, hub, tiny_llama, tmp_path, capsys):
    _, cache, _ = hub
    _bad_adapter_repos(cache, tiny_llama, tmp_path)
    reference, fragments = BAD_REFERENCES[case]
    (tmp_path / "r.yaml").write_text(f"merge_method: linear\nmodels:\n  - model: acme/base\n  - model: {reference}\n")
    before = sorted(p.name for p in tmp_path.iterdir())
    for argv in (["validate", tmp_path / "r.yaml"], ["merge", tmp_path / "r.yaml", tmp_path / "out", "--no-progress"]):
        assert main([str(a) for a in argv]) == 2
        err = capsys.readouterr().err
        errors = [line for line in err.splitlines() if line.startswith("evomerge: error: ")]
        assert len(errors) == 1, err
        for fragment in fragments:
            assert fragment in errors[0], (case, fragment, err)
    assert sorted(p.name for p in tmp_path.iterdir()) == before


# --- a config copied verbatim from a LazyMergekit model card --------------------------------------------
# mlabonne/NeuralPipe-7B-slerp's card (LazyMergekit), word for word; the two repositories are tiny
# 32-layer Mistral-style models published under those names in the test's cache.
LAZYMERGEKIT = """
slices:
  - sources:
      - model: OpenPipe/mistral-ft-optimized-1218
        layer_range: [0, 32]
      - model: mlabonne/NeuralHermes-2.5-Mistral-7B
        layer_range: [0, 32]
merge_method: slerp
base_model: OpenPipe/mistral-ft-optimized-1218
parameters:
  t:
    - filter: self_attn
      value: [0, 0.5, 0.3, 0.7, 1]
    - filter: mlp
      value: [1, 0.5, 0.7, 0.3, 0]
    - value: 0.5
dtype: bfloat16
"""


@pytest.mark.mergekit
def test_a_lazymergekit_config_merges_offline_from_the_cache_as_mergekit_does(tiny_llama, tmp_path, monkeypatch,
                                                                                capsys):
    from mergekit.config import MergeConfiguration
    from mergekit.merge import MergeOptions, run_merge

    cache = tmp_path / "hf-cache"
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    fam = tiny_llama(arch="mistral", layers=32, dtype="bfloat16", n_experts=1)
    snapshots = {}
    for repo, folder in (("OpenPipe/mistral-ft-optimized-1218", fam.base),
                         ("mlabonne/NeuralHermes-2.5-Mistral-7B", fam.experts[0])):
        commit = publish(cache, repo, folder)
        snapshots[repo] = cache / ("models--" + repo.replace("/", "--")) / "snapshots" / commit
    code, err, ours = _merge(capsys, tmp_path, LAZYMERGEKIT)
    assert code == 0, err
    theirs_text = LAZYMERGEKIT
    for repo, snap in snapshots.items():
        theirs_text = theirs_text.replace(repo, str(snap))
    run_merge(MergeConfiguration.model_validate(yaml.safe_load(theirs_text)), str(tmp_path / "theirs"),
              MergeOptions(quiet=True, write_model_card=False, copy_tokenizer=True))
    a, b = load_file(str(ours / "model.safetensors")), load_file(str(tmp_path / "theirs" / "model.safetensors"))
    assert sorted(a) == sorted(b) and len(b) > 32 * 9
    for key in b:
        assert torch.equal(a[key], b[key]), key
    assert json.loads((ours / "config.json").read_text())["num_hidden_layers"] == 32


# --- pieces -------------------------------------------------------------------------------------------------
def test_parse_follows_mergekits_forms(tmp_path):
    assert parse("org/name", "f") == (Reference("org/name"), None)
    assert parse("org/name@v2", "f") == (Reference("org/name", "v2"), None)
    assert parse("org/a@r1+org/lora@r2", "f") == (Reference("org/a", "r1"), Reference("org/lora", "r2"))
    odd = tmp_path / "models@2024+final"
    odd.mkdir()
    assert parse(str(odd), "f") == (Reference(str(odd)), None)  # an existing folder is taken whole
    with pytest.raises(ConfigError, match="more than one '@'"):
        parse("org/a@b@c", "models[0].model")


def test_a_revision_on_a_local_folder_is_a_warning(tiny_llama):
    from evomerge.engine.references import locate
    from evomerge.errors import ConfigWarning

    fam = tiny_llama()
    with pytest.warns(ConfigWarning, match="revision 'v2' has no effect"):
        assert locate(f"{fam.base}@v2", "base_model").folder == fam.base


def test_only_safetensors_configs_and_tokenizer_files_are_fetched():
    listing = {"config.json": 1, "generation_config.json": 1, "tokenizer.json": 1, "model.safetensors.index.json": 1,
               "model-00001-of-00002.safetensors": 10, "model-00002-of-00002.safetensors": 10,
               "consolidated.safetensors": 20, "pytorch_model.bin": 20, "README.md": 1, "onnx/model.onnx": 5,
               "train.py": 1}
    assert sorted(choose_files(listing, weights=True, adapter=False, repo="r", where="f")) == [
        "config.json", "generation_config.json", "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors", "model.safetensors.index.json", "tokenizer.json"]
    assert sorted(choose_files(listing, weights=False, adapter=False, repo="r", where="f")) == [
        "config.json", "generation_config.json", "tokenizer.json"]
    with pytest.raises(CheckpointError, match=r"no safetensors weights, only pickles \(pytorch_model.bin\)"):
        choose_files({"config.json": 1, "pytorch_model.bin": 9}, weights=True, adapter=False, repo="r", where="f")
    with pytest.raises(CheckpointError, match="only adapter_model.bin"):
        choose_files({"adapter_config.json": 1, "adapter_model.bin": 9}, weights=True, adapter=True, repo="r", where="f")


# --- the network (skipped unless asked for) -----------------------------------------------------------------
@pytest.mark.skipif(os.environ.get("EVOMERGE_NETWORK_TESTS") != "1",
                    reason="downloads from the Hugging Face Hub; set EVOMERGE_NETWORK_TESTS=1 to run it")
def test_network_downloads_only_what_a_merge_needs(tmp_path):
    """NETWORK: downloads hf-internal-testing/tiny-random-LlamaForCausalLM (a few MB) into a fresh cache."""
    recipe = tmp_path / "r.yaml"
    recipe.write_text("merge_method: passthrough\nmodels:\n  - model: hf-internal-testing/tiny-random-LlamaForCausalLM\n")
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_CACHE"}
    env.update(HF_HUB_OFFLINE="0", HF_HOME=str(tmp_path / "home"))
    res = subprocess.run([sys.executable, "-m", "evomerge.cli", "merge", str(recipe), str(tmp_path / "out"),
                          "--no-progress"], capture_output=True, text=True, env=env)
    assert res.returncode == 0, res.stderr
    assert "fetching" in res.stderr and "commit" in res.stderr
    fetched = {p.name for p in (tmp_path / "home" / "hub").rglob("snapshots/*/*")}
    assert fetched and not any(name.endswith((".bin", ".pt", ".h5", ".msgpack", ".onnx")) for name in fetched), fetched
    assert "commit" in (tmp_path / "out" / "README.md").read_text()


# --- search spaces take Hub ids too --------------------------------------------------------------------------
def test_a_search_space_takes_hub_ids_and_best_yaml_names_their_commits(tmp_path, monkeypatch):
    from test_search import FakeExecutor
    from test_space import make_models

    from evomerge.engine.recipe import MergeRecipe
    from evomerge.search.run import run_search
    from evomerge.search.spacefile import load_space

    cache = tmp_path / "hf-cache"
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    make_models(tmp_path)
    commits = {n: publish(cache, f"acme/{n}", tmp_path / "models" / n) for n in ("base", "add", "rev")}
    (tmp_path / "space.yaml").write_text("models: [acme/add, acme/rev@main]\nbase_model: acme/base\nmethod: slerp\n"
                                         "objective:\n  tasks: [toy_add, toy_rev]\nsearch: {trials: 4, top_k: 1}\n")
    space = load_space(tmp_path / "space.yaml")
    assert [m.name for m in space.models] == ["add", "rev_main"]
    assert Path(space.models[0].path).name == commits["add"]
    run_search(space, tmp_path / "run", executor=FakeExecutor(), progress=False)
    best = (tmp_path / "run" / "best.yaml").read_text()
    named = set(MergeRecipe.from_yaml(best).referenced_models())
    assert {f"acme/add@{commits['add']}", f"acme/rev@{commits['rev']}"} <= named <= {f"acme/{n}@{c}" for n, c in commits.items()}
    assert f"#   acme/add@{commits['add']}: {space.models[0].path}" in best
    record = json.loads((tmp_path / "run" / "record.json").read_text())
    assert record["hub_sources"][space.models[0].path] == {"repo": "acme/add", "commit": commits["add"]}


def test_a_lora_reference_in_a_space_is_refused_with_a_way_out(tmp_path, monkeypatch):
    from evomerge.search.spacefile import load_space

    (tmp_path / "space.yaml").write_text("models: [acme/base+acme/lora, acme/other]\nmethod: slerp\n"
                                         "objective:\n  tasks: [toy_add]\n")
    with pytest.raises(ConfigError) as info:
        load_space(tmp_path / "space.yaml")
    assert info.value.where.endswith("models[0]") and "LoRA reference" in info.value.what
    assert "merge_method: passthrough" in info.value.fix


def test_the_online_path_pins_the_commit_and_fetches_only_the_chosen_files(tmp_path, monkeypatch):
    """huggingface_hub's listing and download replaced by fakes (no network): the download is pinned to
    the commit the listing named, asks for the chosen files only, and its errors name the field."""
    import huggingface_hub

    from evomerge.engine import hub

    class Sibling:
        def __init__(self, name, size):
            self.rfilename, self.size = name, size

    class Info:
        sha = "c" * 40
        siblings = [Sibling(n, 10) for n in ("config.json", "model.safetensors", "pytorch_model.bin", "tokenizer.json",
                                             "README.md")]

    asked = {}

    def model_info(self, repo, revision=None, files_metadata=False):
        if repo == "acme/missing":
            raise type("RepositoryNotFoundError", (Exception,), {})("404")
        asked["revision_listed"] = revision
        return Info()

    def snapshot_download(repo, revision=None, cache_dir=None, allow_patterns=None, **kw):
        asked.update(repo=repo, revision=revision, patterns=sorted(allow_patterns))
        return str(tmp_path / f"models--{repo.replace('/', '--')}" / "snapshots" / revision)

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", model_info)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    lines = []
    folder, origin = hub.snapshot("acme/m", "v2", where="models[0].model", log=lines.append)
    assert asked == {"revision_listed": "v2", "repo": "acme/m", "revision": "c" * 40,
                     "patterns": ["config.json", "model.safetensors", "tokenizer.json"]}
    assert origin == hub.Origin("acme/m", "v2", "c" * 40) and folder.name == "c" * 40
    assert lines == [f"acme/m@v2 (commit {'c' * 40}): fetching 3 file(s), 0.00 GB (cached files are reused)"]
    with pytest.raises(CheckpointError) as info:
        hub.snapshot("acme/missing", None, where="models[1].model")
    assert info.value.where == "models[1].model" and "no repository 'acme/missing'" in info.value.what
