"""The README.md model card written next to a merged model: what was merged, from what, and how.

A merged folder should explain itself on the Hugging Face Hub and on disk: YAML front matter the Hub
reads (base model, tags), the recipe exactly as given (it reproduces the model with `evomerge merge`
or `mergekit-yaml`), and the source checkpoints with their sizes.

The card takes plain data (`CardFacts`), not the merge plan or the opened sources, so this module
depends on nothing else in the engine and `merge.py` is the only one that gathers the facts.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass


@dataclass(frozen=True)
class SourceFacts:
    """One source checkpoint as the card lists it."""

    model: str
    is_base: bool
    n_tensors: int
    nbytes: int
    origins: tuple[str, ...] = ()  # Hub parts: "model org/name@main (commit ...)", "adapter ..."


@dataclass(frozen=True)
class CardFacts:
    """Everything the card says, gathered by the merge."""

    name: str
    method: str
    reference_url: str | None
    base_model: str | None  # a Hub id (`hub_id`), or None: a local path is not a Hub base_model
    recipe_text: str
    sources: tuple[SourceFacts, ...]
    n_tensors: int
    num_layers: int
    nbytes: int
    donor: str


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def hub_id(model: str | None, config: dict | None = None) -> str | None:
    """The Hub id a card may name as `base_model`: the recipe's path when it reads like `org/name` and
    is not a local path, else the config's `_name_or_path` when that does; never a local folder."""
    for candidate in (model, (config or {}).get("_name_or_path")):
        if isinstance(candidate, str) and _HUB_ID.match(candidate) and not candidate.startswith((".", "~")) \
                and ".." not in candidate:
            return candidate
    return None


def render_card(facts: CardFacts) -> str:
    from evomerge import __version__

    front = ["---", "library_name: transformers", "tags:", "- merge", "- mergekit", "- evomerge"]
    if facts.base_model:
        front += ["base_model:", f"- {_yaml_str(facts.base_model)}"]
    front.append("---")
    lines = [
        *front,
        f"# {facts.name}",
        "",
        f"This model was merged with evomerge {__version__} using the "
        f"`{facts.method}` method ({facts.reference_url or 'see mergekit'}).",
        "The recipe is mergekit-compatible: `evomerge merge mergekit_config.yml OUT` or "
        "`mergekit-yaml mergekit_config.yml OUT` rebuilds it.",
        "",
        "## Sources",
        "",
    ]
    for s in facts.sources:
        role = " (base)" if s.is_base else ""
        hub = "; from the Hub: " + ", ".join(s.origins) if s.origins else ""
        lines.append(f"- `{s.model}`{role}: {s.n_tensors} tensors, {s.nbytes / 1e6:.1f} MB{hub}")
    lines += [
        "",
        "## Output",
        "",
        f"{facts.n_tensors} tensors, {facts.num_layers} layers, {facts.nbytes / 1e6:.1f} MB; "
        f"config from `{facts.donor}`.",
        "",
        "## Recipe",
        "",
        "```yaml",
        facts.recipe_text.rstrip(),
        "```",
        "",
    ]
    return "\n".join(lines)


def _yaml_str(s: str) -> str:
    return json.dumps(s) if any(c in s for c in ":#{}[]&*!|>'\"%@`") or s.strip() != s else s
