"""`evomerge merge` / `evomerge validate` from the command line: success, and every bad input giving one
clear message (what, where in the YAML, fix), exit code 2 and nothing written."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from evomerge.cli import main

TIES = """
merge_method: ties
base_model: {base}
models:
  - model: {e0}
    parameters: {{weight: 0.5, density: 0.5}}
  - model: {e1}
    parameters: {{weight: 0.5, density: 0.7}}
"""


@pytest.fixture
def fam(tiny_llama):
    return tiny_llama()


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def recipe(tmp_path, text, fam, **extra):
    paths = dict(base=fam.base, e0=fam.experts[0], e1=fam.experts[1], **extra)
    p = tmp_path / "recipe.yaml"
    p.write_text(text.format(**{k: str(v) for k, v in paths.items()}))
    return p


def test_merge_and_validate_succeed(fam, tmp_path, capsys):
    p = recipe(tmp_path, TIES, fam)
    code, out, err = run(capsys, "validate", p)
    assert code == 0 and out.startswith("ok:") and "ties" in out
    code, out, err = run(capsys, "merge", p, tmp_path / "out", "--no-progress")
    assert code == 0, err
    assert (tmp_path / "out" / "model.safetensors").is_file()


def test_existing_output_needs_overwrite(fam, tmp_path, capsys):
    p = recipe(tmp_path, TIES, fam)
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    code, _, err = run(capsys, "merge", p, out, "--no-progress")
    assert code == 2
    assert "exists and is not empty" in err and "--overwrite" in err
    assert sorted(x.name for x in out.iterdir()) == ["keep.txt"]
    code, _, err = run(capsys, "merge", p, out, "--no-progress", "--overwrite")
    assert code == 0, err
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").is_file()
    assert sorted(x.name for x in tmp_path.iterdir()) == ["out", "recipe.yaml"]  # no temp folders left


def _bin_only(tmp_path, fam):
    d = tmp_path / "binonly"
    d.mkdir()
    shutil.copy(fam.base / "config.json", d)
    (d / "pytorch_model.bin").write_bytes(b"x")
    return d


def _big_tokenizer(tmp_path, fam):
    d = tmp_path / "bigtok"
    shutil.copytree(fam.experts[1], d)
    tj = json.loads((d / "tokenizer.json").read_text())
    tj["added_tokens"].append({"id": 259, "content": "<x>", "single_word": False, "lstrip": False,
                               "rstrip": False, "normalized": False, "special": True})
    (d / "tokenizer.json").write_text(json.dumps(tj))
    return d


BAD = {
    # name: (recipe text, expected fragments in the one-line message)
    "missing path": (TIES.replace("{e1}", "{e1}-nope"), ["models[1].model", "not found", "looked at"]),
    "bin only": (TIES.replace("{e1}", "{binonly}"), ["models[1].model", "safetensors only"]),
    "architectures": (TIES.replace("{e1}", "{mistral}"), ["models[1].model", "architectures disagree"]),
    "shapes": (TIES.replace("{e1}", "{wide}"), ["shapes disagree"]),
    "slerp three": ("merge_method: slerp\nbase_model: {base}\nmodels:\n  - model: {base}\n  - model: {e0}\n"
                    "  - model: {e1}\nparameters: {{t: 0.5}}\n", ["slerp", "exactly 2", "got 3"]),
    "ties no base": (TIES.replace("base_model: {base}\n", ""), ["base_model", "needs a base model"]),
    "density high": (TIES.replace("density: 0.7", "density: 1.5"),
                     ["models[1].parameters.density", "out of range", "(0, 1]"]),
    "density zero": (TIES.replace("density: 0.7", "density: [0.5, 0]"),
                     ["models[1].parameters.density[1]", "out of range"]),
    "t high": ("merge_method: slerp\nbase_model: {base}\nmodels:\n  - model: {base}\n  - model: {e0}\n"
               "parameters:\n  t:\n    - filter: mlp\n      value: [0, 1.5]\n    - value: 0.5\n",
               ["parameters.t[0].value[1]", "out of range", "[0, 1]"]),
    "weight nan": (TIES.replace("weight: 0.5, density: 0.7", "weight: .nan, density: 0.7"),
                   ["models[1].parameters.weight", "finite"]),
    "weight inf": (TIES.replace("weight: 0.5, density: 0.5", "weight: -.inf, density: 0.5"),
                   ["models[0].parameters.weight", "finite"]),
    "unknown method": (TIES.replace("merge_method: ties", "merge_method: tie"),
                       ["merge_method", "unknown merge method 'tie'", "did you mean 'ties'"]),
    "unknown parameter": (TIES.replace("density: 0.7", "densty: 0.7"),
                          ["models[1].parameters.densty", "did you mean 'density'"]),
    "layer range": ("merge_method: passthrough\nslices:\n  - sources:\n      - model: {base}\n"
                    "        layer_range: [0, 3]\n  - sources:\n      - model: {e0}\n        layer_range: [2, 5]\n",
                    ["slices[1].sources[0].layer_range", "out of bounds", "4 layers"]),
    "tokenizer vocab": (TIES.replace("{e1}", "{bigtok}"), ["models[1].model", "tokenizer vocab sizes disagree"]),
    "unknown key": (TIES + "dtyp: bfloat16\n", ["dtyp", "unknown key", "did you mean 'dtype'"]),
    "yaml syntax": (TIES + "parameters: [\n", ["not valid YAML"]),
    "missing weight": (TIES.replace("weight: 0.5, density: 0.7", "density: 0.7"),
                       ["models[1].parameters.weight", "missing required parameter 'weight'"]),
    "tokenizer source and block": (TIES + "tokenizer_source: union\ntokenizer:\n  source: union\n",
                                   ["tokenizer_source or the tokenizer: block, not both"]),
    "token without a source": (TIES + "tokenizer:\n  source: base\n  tokens:\n    <new>: {{force: true}}\n",
                               ["tokenizer.tokens['<new>'].source", "needs a source"]),
    "chat template name": (TIES + "chat_template: vicuna\n", ["chat_template", "unknown chat template name",
                                                               "alpaca, chatml, exaone, llama3, mistral or auto"]),
    "duplicate key": (TIES + "parameters: {{normalize: true}}\nparameters: {{int8_mask: true}}\n",
                      ["recipe.yaml:10", "key 'parameters' is given twice (lines 9 and 10)", "merge the two"]),
    "linear weights sum zero": ("merge_method: linear\nmodels:\n  - model: {e0}\n    parameters: {{weight: 1.0}}\n"
                                "  - model: {e1}\n    parameters: {{weight: -1.0}}\n",
                                ["linear weights sum to zero for tensor", "normalize: false"]),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_one_message_exit_2_nothing_written(case, fam, tiny_llama, tmp_path, capsys):
    text, fragments = BAD[case]
    extra = {}
    if "{binonly}" in text:
        extra["binonly"] = _bin_only(tmp_path, fam)
    if "{mistral}" in text:
        extra["mistral"] = tiny_llama(arch="mistral").experts[1]
    if "{wide}" in text:
        extra["wide"] = tiny_llama(hidden=48, n_experts=0).base
    if "{bigtok}" in text:
        extra["bigtok"] = _big_tokenizer(tmp_path, fam)
    p = recipe(tmp_path, text, fam, **extra)
    before = sorted(x.name for x in tmp_path.iterdir())
    for command in (["validate", p], ["merge", p, tmp_path / "out", "--no-progress"]):
        code, out, err = run(capsys, *command)
        assert code == 2, (case, err)
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("evomerge: error: "), err
        for fragment in fragments:
            assert fragment in err, (case, fragment, err)
        assert sorted(x.name for x in tmp_path.iterdir()) == before  # nothing written


def test_bad_shard_size(fam, tmp_path, capsys):
    p = recipe(tmp_path, TIES, fam)
    code, _, err = run(capsys, "merge", p, tmp_path / "out", "--out-shard-size", "lots")
    assert code == 2 and "--out-shard-size" in err and "500MB" in err
    assert not (tmp_path / "out").exists()


def test_output_is_a_file(fam, tmp_path, capsys):
    p = recipe(tmp_path, TIES, fam)
    (tmp_path / "out").write_text("x")
    code, _, err = run(capsys, "merge", p, tmp_path / "out")
    assert code == 2 and "is a file" in err


def test_output_inside_a_source_is_refused(fam, tmp_path, capsys):
    p = recipe(tmp_path, TIES, fam)
    code, _, err = run(capsys, "merge", p, fam.experts[0], "--overwrite")
    assert code == 2 and "overlaps the source model" in err
    assert (fam.experts[0] / "model.safetensors").is_file()


def test_console_script_exit_code_and_light_help(fam, tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    exe = Path(sys.executable).parent / "evomerge"
    p = recipe(tmp_path, TIES.replace("merge_method: ties", "merge_method: tie"), fam)
    res = subprocess.run([str(exe), "merge", str(p), str(tmp_path / "out")], capture_output=True, text=True, env=env)
    assert res.returncode == 2 and "did you mean 'ties'" in res.stderr
    code = ("import sys; from evomerge import cli; cli.build_parser().format_help(); "
            "import evomerge.engine.recipe, evomerge.engine.merge, evomerge.engine.plan, evomerge.engine.execution, "
            "evomerge.engine.sinks, evomerge.engine.checkpoints, evomerge.engine.modelcard; "
            "bad = [m for m in ('torch', 'transformers', 'safetensors', 'lm_eval', 'ray') if m in sys.modules]; "
            "print(bad); sys.exit(1 if bad else 0)")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert res.returncode == 0, res.stdout + res.stderr


def test_unavailable_device(fam, tmp_path, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this check is about machines without CUDA")
    p = recipe(tmp_path, TIES, fam)
    code, _, err = run(capsys, "merge", p, tmp_path / "out", "--device", "cuda")
    assert code == 2 and "--device" in err and "CUDA is not available" in err
    assert not (tmp_path / "out").exists()


def test_tokenizer_source_path_is_copied(fam, tmp_path, capsys):
    tok = tmp_path / "tok"
    shutil.copytree(fam.experts[1], tok)
    cfg = json.loads((tok / "tokenizer_config.json").read_text())
    cfg["model_max_length"] = 123
    (tok / "tokenizer_config.json").write_text(json.dumps(cfg))
    p = recipe(tmp_path, TIES + "tokenizer_source: {tok}\n", fam, tok=tok)
    code, _, err = run(capsys, "merge", p, tmp_path / "out", "--no-progress")
    assert code == 0, err
    assert json.loads((tmp_path / "out" / "tokenizer_config.json").read_text())["model_max_length"] == 123


def test_tokenizer_source_missing(fam, tmp_path, capsys):
    p = recipe(tmp_path, TIES + "tokenizer_source: {tok}\n", fam, tok=tmp_path / "nope")
    code, _, err = run(capsys, "merge", p, tmp_path / "out", "--no-progress")
    assert code == 2 and "tokenizer_source" in err and "not found" in err
    assert not (tmp_path / "out").exists()


def _custom_code(tmp_path, fam, *, with_file: bool = True):
    """A copy of an expert whose config names its own code, as trust_remote_code checkpoints do."""
    d = tmp_path / "custom"
    shutil.copytree(fam.experts[1], d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["auto_map"] = {"AutoConfig": "configuration_tiny.TinyConfig",
                       "AutoModelForCausalLM": "modeling_tiny.TinyForCausalLM"}
    (d / "config.json").write_text(json.dumps(cfg))
    if with_file:
        (d / "configuration_tiny.py").write_text("# config code\n")
        (d / "modeling_tiny.py").write_text("# model code\n")
    return d


def test_custom_code_is_refused_unless_trusted_and_then_copied(fam, tmp_path, capsys):
    custom = _custom_code(tmp_path, fam)
    # the custom model donates the config (first listed), so the merged config keeps its auto_map
    text = TIES.replace("base_model: {base}", "base_model: {custom}").replace("{e1}", "{custom}")
    p = recipe(tmp_path, text, fam, custom=custom)
    out = tmp_path / "out"
    for command in (["validate", p], ["merge", p, out, "--no-progress"]):
        code, _, err = run(capsys, *command)
        assert code == 2, err
        assert "needs its own code (config.json auto_map: configuration_tiny, modeling_tiny)" in err
        assert "--trust-remote-code" in err and "base_model" in err
        assert not out.exists()
    code, _, err = run(capsys, "merge", p, out, "--no-progress", "--trust-remote-code")
    assert code == 0, err
    assert json.loads((out / "config.json").read_text())["auto_map"]["AutoModelForCausalLM"] == \
        "modeling_tiny.TinyForCausalLM"
    assert (out / "modeling_tiny.py").read_text() == "# model code\n" and (out / "configuration_tiny.py").is_file()
    missing = _custom_code(tmp_path / "second", fam, with_file=False)
    p2 = recipe(tmp_path, TIES.replace("{e1}", "{custom}"), fam, custom=missing)
    code, _, err = run(capsys, "validate", p2, "--trust-remote-code")
    assert code == 2 and "names code file configuration_tiny.py in auto_map, which is not in" in err


def test_model_root_finds_moved_model_folders(fam, tmp_path, capsys):
    """A recipe written on another machine (paths that do not exist here) merges with --model-root DIR,
    where DIR holds the folders by name, into the same tensors as the recipe with the real paths."""
    from safetensors.torch import load_file

    moved = tmp_path / "elsewhere"
    for src in (fam.base, *fam.experts[:2]):
        shutil.copytree(src, moved / src.name)
    here = recipe(tmp_path, TIES, fam)
    away = tmp_path / "away.yaml"
    away.write_text(here.read_text().replace(str(fam.root), "/nowhere/models"))
    code, _, err = run(capsys, "validate", away)
    assert code == 2 and "not found" in err
    code, _, err = run(capsys, "validate", away, "--model-root", moved)
    assert code == 0, err
    for path, args in ((tmp_path / "a", [here]), (tmp_path / "b", [away, "--model-root", moved])):
        code, _, err = run(capsys, "merge", *args, path, "--no-progress")
        assert code == 0, err
    a, b = load_file(tmp_path / "a" / "model.safetensors"), load_file(tmp_path / "b" / "model.safetensors")
    assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)
    assert str(moved / "expert0") in (tmp_path / "b" / "mergekit_config.yml").read_text()
    twins = tmp_path / "twins.yaml"
    twins.write_text(TIES.format(base=fam.base, e0=fam.experts[0], e1=tmp_path / "x" / fam.experts[0].name))
    code, _, err = run(capsys, "validate", twins, "--model-root", moved)
    assert code == 2 and "cannot tell" in err and "--model-root" in err


def test_help_promises_only_subcommands_that_exist():
    """Every verb a command's one-line help promises (locate, rebuild, evaluate, ...) has a subcommand."""
    import argparse

    from evomerge import cli

    parser = cli.build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    toy = sub.choices["toy"]
    toy_sub = next(a for a in toy._actions if isinstance(a, argparse._SubParsersAction))
    line = next(c.help for c in sub._choices_actions if c.dest == "toy")
    verbs = {"locate": "path", "rebuild": "build", "evaluate": "eval", "build": "build"}
    for verb, command in verbs.items():
        if verb in line:
            assert command in toy_sub.choices, (verb, line, sorted(toy_sub.choices))


def test_chat_template_and_no_quantization_config_in_the_output(fam, tmp_path, capsys):
    """`chat_template: chatml` (or literal Jinja, or auto) lands in the merged tokenizer, which then
    renders chats; a donor's quantization_config is not copied into the merged float model's config."""
    from transformers import AutoTokenizer

    donor = tmp_path / "donor"
    shutil.copytree(fam.base, donor)
    cfg = json.loads((donor / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "gguf"}
    (donor / "config.json").write_text(json.dumps(cfg))
    text = TIES.replace("base_model: {base}", "base_model: {donor}")
    for template, expect in (("chatml", "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"),
                             ("\"{% for m in messages %}[{{ m['content'] }}]{% endfor %}\"", "[hi]")):
        p = recipe(tmp_path, text, fam, donor=donor)
        p.write_text(p.read_text() + f"chat_template: {template}\n")  # braces: not through str.format
        out = tmp_path / "out"
        code, _, err = run(capsys, "merge", p, out, "--no-progress", "--overwrite")
        assert code == 0, err
        assert "quantization_config" not in json.loads((out / "config.json").read_text())
        tok = AutoTokenizer.from_pretrained(out)
        chat = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                       add_generation_prompt=True)
        assert chat == expect, chat
    # auto: the template most inputs carry (here: the donor's, set by hand)
    tc = json.loads((donor / "tokenizer_config.json").read_text())
    tc["chat_template"] = "{% for m in messages %}<{{ m['content'] }}>{% endfor %}"
    (donor / "tokenizer_config.json").write_text(json.dumps(tc))
    p = recipe(tmp_path, text + "chat_template: auto\n", fam, donor=donor)
    code, _, err = run(capsys, "merge", p, tmp_path / "auto", "--no-progress")
    assert code == 0, err
    assert json.loads((tmp_path / "auto" / "tokenizer_config.json").read_text())["chat_template"] == tc["chat_template"]
