"""The README.md model card written next to a merged model: what was merged, from what, and how.

A merged folder should explain itself on the Hugging Face Hub and on disk: YAML front matter the Hub
reads (base model, tags), the recipe exactly as given (it reproduces the model with `evomerge merge`
or `mergekit-yaml`), and the source checkpoints with their sizes.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    from evomerge.checkpoints import Sources
    from evomerge.merge import MergePlan
    from evomerge.recipe import MergeRecipe


def render_card(recipe: "MergeRecipe", recipe_text: str, plan: "MergePlan", sources: "Sources", name: str) -> str:
    from evomerge import __version__

    front = ["---", "library_name: transformers", "tags:", "- merge", "- mergekit", "- evomerge"]
    if recipe.base_model:
        front += ["base_model:", f"- {_yaml_str(recipe.base_model)}"]
    front.append("---")
    lines = [
        *front,
        f"# {name}",
        "",
        f"This model was merged with evomerge {__version__} using the "
        f"`{recipe.merge_method}` method ({plan.method.reference_url or 'see mergekit'}).",
        "The recipe is mergekit-compatible: `evomerge merge mergekit_config.yml OUT` or "
        "`mergekit-yaml mergekit_config.yml OUT` rebuilds it.",
        "",
        "## Sources",
        "",
    ]
    for m in recipe.referenced_models():
        ck = sources.checkpoint(m)
        size = sum(_nbytes(i.shape, i.dtype) for i in ck.tensors.values())
        role = " (base)" if m == recipe.base_model else ""
        lines.append(f"- `{m}`{role}: {len(ck.tensors)} tensors, {size / 1e6:.1f} MB")
    lines += [
        "",
        "## Output",
        "",
        f"{len(plan.tasks)} tensors, {plan.num_layers} layers, {plan.nbytes / 1e6:.1f} MB; config from `{plan.donor}`.",
        "",
        "## Recipe",
        "",
        "```yaml",
        recipe_text.rstrip(),
        "```",
        "",
    ]
    return "\n".join(lines)


def _nbytes(shape, dtype: str) -> int:
    from evomerge.sinks import ITEM_SIZE

    n = 1
    for d in shape:
        n *= d
    return n * ITEM_SIZE.get(dtype, 4)


def _yaml_str(s: str) -> str:
    import json

    return json.dumps(s) if any(c in s for c in ":#{}[]&*!|>'\"%@`") or s.strip() != s else s
