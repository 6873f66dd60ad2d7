"""A recipe's `chat_template:`: literal Jinja, a name (chatml), or `auto`; and writing it into an output.

Why it exists: mergekit lets a recipe set the merged model's chat template. `plan.check_recipe` checks
the value without checkpoints; `merge.merge_to_dir` resolves it against the input models' tokenizers
and writes it into the merged tokenizer's config.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

from evomerge.errors import ConfigError

if TYPE_CHECKING:  # pragma: no cover
    from evomerge.engine.checkpoints import Sources
    from evomerge.engine.recipe import MergeRecipe

# Named chat templates, as mergekit names them. Only ChatML is built in (a public, fixed format); for
# another name, paste the template's Jinja text into `chat_template:`.
CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] "
          "+ '<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
          "{% endif %}")
NAMED_TEMPLATES = {"chatml": CHATML}


def chat_template_text(recipe: MergeRecipe, sources: "Sources | None") -> str:
    """The Jinja text a recipe's `chat_template:` asks for: literal Jinja, a name (chatml), or `auto`
    (the template most of the input models' tokenizers carry). With `sources` None, only checks."""
    value = recipe.chat_template
    if "{" in value or "\n" in value:
        if len(value) < 20:
            raise ConfigError(f"chat_template {value!r} is too short to be a Jinja template", where="chat_template",
                              fix="give a template's Jinja text, `chatml`, or `auto`")
        return value
    if value == "auto":
        if sources is None:
            return value
        from collections import Counter

        found = Counter()
        for model in recipe.referenced_models():
            cfg = sources.path(model) / "tokenizer_config.json"
            text = json.loads(cfg.read_text(encoding="utf-8")).get("chat_template") if cfg.is_file() else None
            if isinstance(text, str):
                found[text] += 1
        if not found:
            raise ConfigError("chat_template: auto, but none of the input models' tokenizers has a chat template",
                              where="chat_template", fix="give the template's Jinja text, or `chatml`")
        return found.most_common(1)[0][0]
    if value in NAMED_TEMPLATES:
        return NAMED_TEMPLATES[value]
    raise ConfigError(f"unknown chat template name {value!r}", where="chat_template",
                      fix="use chatml or auto, or paste the template's Jinja text (mergekit 0.1.5 also names "
                          "alpaca, exaone, llama3, mistral from its own data files)")


def write_chat_template(folder: Path, template: str) -> None:
    """Put `template` into the merged tokenizer's config (where transformers reads it)."""
    cfg = folder / "tokenizer_config.json"
    data = json.loads(cfg.read_text(encoding="utf-8")) if cfg.is_file() else {}
    data["chat_template"] = template
    cfg.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    for stale in ("chat_template.jinja", "chat_template.json"):  # these would win over the config
        (folder / stale).unlink(missing_ok=True)
