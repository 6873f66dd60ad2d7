"""Every config mergekit 0.1.5 accepts, checked against mergekit's own output (issue 24, item 3).

Each case is run through `mergekit.merge.run_merge` and through `evomerge merge`, and the tensors are
compared bit for bit: the `tokenizer:` block (`source: base | union | <model>`, `tokens:` with every
kind of source and `force`, `pad_to_multiple_of`), `tokenizer_source: union`, `modules:`, YAML truthy
numbers (`normalize: 0.0`, `int8_mask: 1`), a top-level `name:`, and the keys mergekit reads and ignores (`weight` on
model_stock, `normalize` on sce, a source's `revision:`, a slice's `residual_weight`), which evomerge
accepts with one warning line each. Matrices indexed by token are compared token by token through each
output tokenizer's vocabulary: mergekit numbers a union's new tokens in hash-map order, which varies
between its runs (evomerge uses each model's id order). The named chat templates are rendered by
transformers beside mergekit's own files. Typos stay errors, all reported in one message.
"""

from __future__ import annotations

import json
import re
import warnings

import pytest
import torch
import yaml
from safetensors.torch import load_file

from evomerge.cli import main
from evomerge.engine.merge import merge_to_dir
from evomerge.engine.recipe import MergeRecipe
from evomerge.errors import ConfigError, ConfigWarning
from tinymodels import with_new_tokens

pytestmark = pytest.mark.mergekit

TIES = """
merge_method: ties
base_model: {base}
models:
  - model: {c0}
    parameters: {{weight: 0.5, density: 0.6}}
  - model: {c1}
    parameters: {{weight: 0.5, density: 0.8}}
"""

CASES = {
    # name: (recipe, the keys that must be warned about)
    "tokenizer_source_union": (TIES + "tokenizer_source: union\n", []),
    "block_union_default": (TIES.replace("models:", "models:\n  - model: {e0}\n    parameters: {{weight: 0.3, density: 1}}")
                            + "tokenizer: {{}}\n", []),
    "block_base": ("merge_method: linear\nbase_model: {c1}\nmodels:\n  - model: {c0}\n    parameters: {{weight: 0.4}}\n"
                   "  - model: {c1}\n    parameters: {{weight: 0.6}}\ntokenizer: {{source: base}}\n", []),
    "block_model": ("merge_method: slerp\nbase_model: {base}\nmodels:\n  - model: {base}\n  - model: {c1}\n"
                    "parameters: {{t: [0.2, 0.8]}}\ntokenizer:\n  source: {c1}\n", []),
    "block_tokens": (TIES + """tokenizer:
  source: union
  pad_to_multiple_of: 8
  tokens:
    <|im_start|>:
      source: {{kind: model_token, model: {base}, token: "<s>"}}
    <|im_end|>:
      source: {c1}
      force: true
    <new>:
      source: {{kind: zero}}
    zz:
      source: {{kind: model_token, model: {c0}, token_id: 5}}
""", []),
    "union_no_base_mean_rows": ("merge_method: linear\nmodels:\n  - model: {c0}\n    parameters: {{weight: 0.3}}\n"
                                "  - model: {c1}\n    parameters: {{weight: 0.7}}\n  - model: {e0}\n"
                                "    parameters: {{weight: 0.2}}\ntokenizer_source: union\n", []),
    "modules_default_slices": ("""merge_method: slerp
base_model: {base}
modules:
  default:
    slices:
      - sources:
          - model: {base}
            layer_range: [0, 2]
          - model: {e0}
            layer_range: [0, 2]
        parameters:
          t: [0.1, 0.9]
      - sources:
          - model: {base}
            layer_range: [2, 4]
          - model: {e0}
            layer_range: [2, 4]
    parameters:
      t:
        - filter: mlp
          value: 0.7
        - value: [0.3, 0.6]
parameters: {{t: 0.5}}
""", []),
    "modules_default_models": ("merge_method: task_arithmetic\nbase_model: {base}\nmodules:\n  default:\n    models:\n"
                               "      - model: {e0}\n        parameters: {{weight: 0.7}}\n      - model: {e1}\n"
                               "    parameters: {{weight: 0.4}}\n", []),
    "truthy_numbers_and_name": ("name: my-first-merge\n" + TIES.replace("{c0}", "{e0}").replace("{c1}", "{e1}")
                                + "parameters: {{normalize: 0.0, int8_mask: 1}}\n", []),
    "ignored_weight_on_model_stock": ("merge_method: model_stock\nbase_model: {base}\nmodels:\n  - model: {e0}\n"
                                      "    parameters: {{weight: 0.5}}\n  - model: {e1}\n    parameters: {{weight: 0.5}}\n",
                                      ["models[0].parameters.weight", "models[1].parameters.weight"]),
    "ignored_normalize_on_sce": ("merge_method: sce\nbase_model: {base}\nmodels:\n  - model: {e0}\n  - model: {e1}\n"
                                 "parameters: {{normalize: true, select_topk: 0.5}}\n", ["parameters.normalize"]),
    "ignored_revision_and_residual_weight": ("""merge_method: passthrough
slices:
  - sources:
      - model: {base}
        revision: main
        layer_range: [0, 3]
    residual_weight: 0.5
  - sources:
      - model: {e0}
        layer_range: [2, 4]
""", ["slices[0].sources[0].revision", "slices[0].residual_weight"]),
}


def _rows_by_token(folder):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(folder)).get_vocab()


@pytest.fixture(scope="module")
def compat(tiny_llama, tmp_path_factory):
    """Every case merged by mergekit and by evomerge: {name: (ours, theirs, warnings)}."""
    from mergekit.config import MergeConfiguration
    from mergekit.merge import MergeOptions, run_merge

    fam = tiny_llama(dtype="bfloat16")
    root = tmp_path_factory.mktemp("compat")
    paths = dict(base=fam.base, e0=fam.experts[0], e1=fam.experts[1],
                 c0=with_new_tokens(fam.experts[0], root / "chat0", added=("<|im_start|>", "<|im_end|>"), seed=1),
                 c1=with_new_tokens(fam.experts[1], root / "chat1", plain=("zz",), added=("<|im_start|>", "<|im_end|>"),
                                    seed=2))
    out = {}
    for name, (text, _) in CASES.items():
        text = text.format(**{k: str(v) for k, v in paths.items()})
        cfg = root / f"{name}.yaml"
        cfg.write_text(text)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            ours = merge_to_dir(cfg, root / f"{name}-evomerge", progress=False)
        theirs = root / f"{name}-mergekit"
        run_merge(MergeConfiguration.model_validate(yaml.safe_load(text)), str(theirs),
                  MergeOptions(quiet=True, write_model_card=False, copy_tokenizer=True, random_seed=0))
        out[name] = (ours, theirs, [str(w.message) for w in caught if issubclass(w.category, ConfigWarning)])
    return out


@pytest.mark.parametrize("name", sorted(CASES))
def test_same_tensors_as_mergekit(compat, name):
    ours, theirs, warned = compat[name]
    a, b = load_file(str(ours / "model.safetensors")), load_file(str(theirs / "model.safetensors"))
    ca, cb = (json.loads((d / "config.json").read_text()) for d in (ours, theirs))
    assert sorted(a) == sorted(b)
    assert (ca["vocab_size"], ca["num_hidden_layers"]) == (cb["vocab_size"], cb["num_hidden_layers"])
    va, vb = _rows_by_token(ours), _rows_by_token(theirs)
    assert set(va) == set(vb)
    for key in b:
        assert a[key].dtype == b[key].dtype and a[key].shape == b[key].shape, key
        if a[key].ndim == 2 and a[key].shape[0] == cb["vocab_size"]:  # indexed by token: compare token by token
            order_a = torch.tensor([va[t] for t in vb])
            order_b = torch.tensor(list(vb.values()))
            assert torch.equal(a[key][order_a], b[key][order_b]), key
            assert torch.equal(a[key][len(vb):], b[key][len(vb):]), f"{key}: padding rows"
        else:
            assert torch.equal(a[key], b[key]), key
    expected = CASES[name][1]
    assert len(warned) == len(expected), warned
    for path, line in zip(expected, warned):
        assert f"{path}: '{path.rsplit('.', 1)[-1]}' has no effect" in line and "\n" not in line


def test_new_tokens_get_their_rows_and_the_tokenizer_knows_them(compat):
    ours, theirs, _ = compat["block_tokens"]
    vocab = _rows_by_token(ours)
    assert {"<|im_start|>", "<|im_end|>", "zz", "<new>"} <= set(vocab)
    state = load_file(str(ours / "model.safetensors"))
    assert torch.count_nonzero(state["model.embed_tokens.weight"][vocab["<new>"]]) == 0  # {kind: zero}
    assert state["model.embed_tokens.weight"].shape[0] % 8 == 0  # pad_to_multiple_of


def test_source_base_with_new_tokens_works_where_mergekit_fails(compat, tmp_path):
    """mergekit 0.1.5 adds `tokens:` to the base's own tokenizer object and then fails (KeyError) while
    re-indexing; evomerge builds the output vocabulary apart from each model's."""
    ours, _, _ = compat["block_base"]
    base = json.loads((ours / "config.json").read_text())
    text = (compat["block_base"][1].parent / "block_base.yaml").read_text()
    text = text.replace("tokenizer: {source: base}", "tokenizer:\n  source: base\n  tokens:\n    <x>:\n      source: {kind: zero}")
    (tmp_path / "r.yaml").write_text(text)
    out = merge_to_dir(tmp_path / "r.yaml", tmp_path / "out", progress=False)
    assert json.loads((out / "config.json").read_text())["vocab_size"] == base["vocab_size"] + 1


# --- named chat templates --------------------------------------------------------------------------------
CONVERSATIONS = [
    [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": " 2+2? "}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
    [{"role": "system", "content": "S"}, {"role": "user", "content": "u1"}, {"role": "user_context", "content": "c"},
     {"role": "assistant", "content": "a1"}],
]
EXACT = {"chatml", "mistral"}  # mergekit's alpaca, exaone and llama3 files leave stray whitespace


def _render(template, conversation, generation):
    from transformers.utils.chat_template_utils import render_jinja_template

    try:
        return render_jinja_template(conversations=[conversation], chat_template=template, bos_token="<s>",
                                     eos_token="</s>", add_generation_prompt=generation)[0][0]
    except Exception as exc:  # a template that refuses the conversation (mistral's roles)
        return f"refused: {type(exc).__name__}"


@pytest.mark.parametrize("name", ["alpaca", "chatml", "exaone", "llama3", "mistral"])
def test_named_chat_templates_render_as_mergekits(name):
    import importlib.resources

    from mergekit._data import chat_templates

    from evomerge.engine.chat_template import NAMED_TEMPLATES

    theirs = importlib.resources.files(chat_templates).joinpath(f"{name}.jinja").read_text()
    assert NAMED_TEMPLATES[name] != theirs
    for conversation in CONVERSATIONS:
        for generation in (False, True):
            a, b = _render(NAMED_TEMPLATES[name], conversation, generation), _render(theirs, conversation, generation)
            if a.startswith("refused") or b.startswith("refused"):
                assert a.startswith("refused") and b.startswith("refused"), (a, b)
            elif name in EXACT:
                assert a == b
            else:
                assert re.sub(r"\s+", "", a) == re.sub(r"\s+", "", b), (a, b)


def test_named_chat_template_is_written(compat, tmp_path):
    ours, _, _ = compat["truthy_numbers_and_name"]
    text = (ours / "mergekit_config.yml").read_text() + "chat_template: alpaca\n"
    (tmp_path / "r.yaml").write_text(text)
    out = merge_to_dir(tmp_path / "r.yaml", tmp_path / "out", progress=False)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(out))
    text = tok.apply_chat_template([{"role": "user", "content": "Add 2 and 2."}], tokenize=False, add_generation_prompt=True)
    assert text == "### Instruction:\nAdd 2 and 2.\n\n### Response:\n"


# --- keys: typos refused together, ignored keys warned --------------------------------------------------
def test_several_typos_in_one_message():
    text = ("merge_method: ties\nbase_model: a\nmodels:\n  - model: b\n    paramters: {weight: 1}\n  - model: c\n"
            "    parameters: {densty: 0.5, weight: 1}\ndtyp: bfloat16\n")
    with pytest.raises(ConfigError) as info:
        MergeRecipe.from_yaml(text, source="r.yaml")
    msg = str(info.value)
    assert "3 unknown keys" in msg and msg.count("did you mean") == 3
    for fragment in ("models[0].paramters (did you mean 'parameters'?)", "models[1].parameters.densty (did you mean "
                     "'density'?)", "dtyp (did you mean 'dtype'?)"):
        assert fragment in msg


def test_unknown_key_far_from_any_is_ignored_with_a_warning():
    with pytest.warns(ConfigWarning, match="'notes' has no effect"):
        r = MergeRecipe.from_yaml("merge_method: linear\nnotes: my favourite\nmodels:\n  - model: a\n")
    assert r.merge_method == "linear"


def test_mapping_form_of_a_reference_reads_as_text():
    r = MergeRecipe.from_yaml("merge_method: linear\nmodels:\n  - model: {model: {path: org/m, revision: v2}, "
                              "lora: {path: org/l}}\n")
    assert r.models[0].model == "org/m@v2+org/l"


def test_cli_prints_each_warning_on_one_line(compat, tmp_path, capsys):
    ours, _, _ = compat["ignored_weight_on_model_stock"]
    (tmp_path / "r.yaml").write_text((ours / "mergekit_config.yml").read_text())
    assert main(["validate", str(tmp_path / "r.yaml")]) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all(line.startswith("evomerge: warning: ") and "model_stock does not take it" in line
                                 for line in err)
