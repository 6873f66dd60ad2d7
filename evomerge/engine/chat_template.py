"""A recipe's `chat_template:`: literal Jinja, a name mergekit knows, or `auto`; and writing it into an output.

Why it exists: mergekit lets a recipe set the merged model's chat template, by name (alpaca, chatml,
exaone, llama3, mistral), as Jinja text, or `auto` (the template most input models carry).
`plan.check_recipe` checks the value without checkpoints; `merge.merge_to_dir` resolves it against
the input models' tokenizers and writes it into the merged tokenizer's config.

The named templates are written here from each format's own definition, not copied from mergekit's
data files. chatml and mistral render exactly as mergekit's do; for alpaca, exaone and llama3,
mergekit's files leave stray whitespace (indentation, an extra newline after each llama3 turn, no blank
line before alpaca's `### Response:`) that these do not: the same text apart from whitespace
(tests/test_compat.py renders both).
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

from evomerge.errors import ConfigError, ConfigWarning

if TYPE_CHECKING:  # pragma: no cover
    from evomerge.engine.checkpoints import Sources
    from evomerge.engine.recipe import MergeRecipe

CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] "
          "+ '<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
          "{% endif %}")
# Meta's Llama 3 turns: a header with the role, a blank line, the trimmed text, <|eot_id|>.
LLAMA3 = ("{{ bos_token if messages else '' }}{% for message in messages %}{{ '<|start_header_id|>' + "
          "message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}")
# Mistral's [INST] turns; a leading system message joins the first user turn.
MISTRAL = (
    "{%- if messages and messages[0]['role'] == 'system' %}{% set system = messages[0]['content'] %}"
    "{% set turns = messages[1:] %}{% else %}{% set turns = messages %}{% endif -%}"
    "{{ bos_token }}"
    "{%- for m in turns -%}"
    "{%- if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}{{ raise_exception('mistral: after an optional "
    "system message, the roles must alternate user, assistant, user, ...') }}{% endif -%}"
    "{%- if m['role'] == 'user' -%}"
    "{{ ' [INST] ' + (system + '\\n\\n' if loop.first and system is defined else '') + m['content'] + ' [/INST]' }}"
    "{%- elif m['role'] == 'assistant' -%}{{ ' ' + m['content'] + eos_token }}"
    "{%- else -%}{{ raise_exception('mistral: only user and assistant roles, after one optional system message') }}"
    "{%- endif -%}{%- endfor -%}")
# Stanford Alpaca: the (last) system text, then ### Instruction / ### Input / ### Response blocks.
ALPACA = (
    "{%- set system = messages | selectattr('role', 'equalto', 'system') | list -%}"
    "{%- if system %}{{ system[-1]['content'] | trim }}{% endif -%}"
    "{%- set ns = namespace(sep=system | length > 0) -%}"
    "{%- for m in messages if m['role'] in ('user', 'user_context', 'assistant') -%}"
    "{{ '\\n\\n' if ns.sep else '' }}{{ {'user': '### Instruction:', 'user_context': '### Input:', "
    "'assistant': '### Response:'}[m['role']] + '\\n' + m['content'] | trim }}"
    "{%- set ns.sep = true -%}{%- endfor -%}"
    "{%- if add_generation_prompt and messages and messages[-1]['role'] != 'assistant' -%}"
    "{{ ('\\n\\n' if ns.sep else '') + '### Response:\\n' }}{%- endif -%}")
# LG's EXAONE: [|role|] before each turn; a user turn ends with a newline, any other with [|endofturn|].
EXAONE = (
    "{%- for m in messages -%}"
    "{%- if loop.first and m['role'] != 'system' %}{{ '[|system|][|endofturn|]\\n' }}{% endif -%}"
    "{{ '[|' + m['role'] + '|]' + m['content'] + ('\\n' if m['role'] == 'user' else '[|endofturn|]\\n') }}"
    "{%- endfor -%}{%- if add_generation_prompt %}{{ '[|assistant|]' }}{% endif -%}")
NAMED_TEMPLATES = {"alpaca": ALPACA, "chatml": CHATML, "exaone": EXAONE, "llama3": LLAMA3, "mistral": MISTRAL}


def chat_template_text(recipe: MergeRecipe, sources: "Sources | None") -> str | None:
    """The Jinja text a recipe's `chat_template:` asks for: literal Jinja, a name, or `auto` (the
    template most of the input models' tokenizers carry; None, with a warning, when none has one, as
    mergekit then sets none). With `sources` None, only checks."""
    value = recipe.chat_template
    if "{" in value or "\n" in value:
        if len(value) < 20 or "{" not in value:
            raise ConfigError(f"chat_template {value!r} is too short to be a Jinja template", where="chat_template",
                              fix="give a template's Jinja text, a name (" + ", ".join(NAMED_TEMPLATES) + "), or auto")
        return value
    if value == "auto":
        return value if sources is None else _most_common(recipe, sources)
    if value in NAMED_TEMPLATES:
        return NAMED_TEMPLATES[value]
    import difflib

    close = difflib.get_close_matches(value, [*NAMED_TEMPLATES, "auto"], n=1)
    raise ConfigError(f"unknown chat template name {value!r}", where="chat_template",
                      fix=(f"did you mean {close[0]!r}? " if close else "") + "use one of "
                      + ", ".join(NAMED_TEMPLATES) + " or auto, or paste the template's Jinja text")


def _most_common(recipe: MergeRecipe, sources: "Sources") -> str | None:
    from collections import Counter

    found: Counter = Counter()
    for model in recipe.referenced_models():
        text = tokenizer_template(sources.path(model))
        if text:
            found[text.strip()] += 1
    if not found:
        warnings.warn(ConfigWarning("chat_template: auto, but none of the input models' tokenizers has a chat "
                                    "template; the merged tokenizer keeps its own"), stacklevel=3)
        return None
    return found.most_common(1)[0][0]


def tokenizer_template(folder: Path) -> str | None:
    """The chat template a tokenizer folder carries (chat_template.jinja, else tokenizer_config.json's)."""
    jinja = folder / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    cfg = folder / "tokenizer_config.json"
    value = json.loads(cfg.read_text(encoding="utf-8")).get("chat_template") if cfg.is_file() else None
    if isinstance(value, list):  # named templates: [{"name": "default", "template": ...}, ...]
        value = next((v.get("template") for v in value if isinstance(v, dict) and v.get("name") == "default"), None)
    return value if isinstance(value, str) else None


def write_chat_template(folder: Path, template: str) -> None:
    """Put `template` into the merged tokenizer's config (where transformers reads it)."""
    cfg = folder / "tokenizer_config.json"
    data = json.loads(cfg.read_text(encoding="utf-8")) if cfg.is_file() else {}
    data["chat_template"] = template
    cfg.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    for stale in ("chat_template.jinja", "chat_template.json"):  # these would win over the config
        (folder / stale).unlink(missing_ok=True)
