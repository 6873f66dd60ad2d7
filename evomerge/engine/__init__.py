"""The merge engine: mergekit's YAML in, merged tensors out, usable on its own like mergekit.

What it holds: the recipe schema (`recipe.py`), the merge methods (`methods/`, each declaring its
tunables once), lazily memory-mapped source checkpoints (`checkpoints.py`), one plan that computes
every output tensor (`merge.py`), the two sinks it writes into (`sinks.py`: a resident model during a
search, streamed safetensors shards at export) and the model card (`modelcard.py`).

What it may import: `evomerge.errors` and third-party libraries (torch, safetensors, pydantic, yaml),
nothing from `evaluation`, `search`, `executors`, `moe` or `toy` (tests/test_architecture.py).
Importing it does not import torch.

The public API, stable for scripts and notebooks::

    from evomerge.engine import load_recipe, Sources, plan, merge_into, ModelSink, merge_to_dir
    recipe = load_recipe("config.yaml")
    merge_to_dir("config.yaml", "./merged")                  # what `evomerge merge` does
    sources = Sources.open(recipe.referenced_models())
    merge_into(ModelSink(model), recipe, sources)            # in place, into a loaded model
"""

from evomerge.engine import methods
from evomerge.engine.checkpoints import Sources
from evomerge.engine.merge import MergePlan, merge_into, merge_to_dir, plan, validate_config
from evomerge.engine.recipe import MergeRecipe, load_recipe
from evomerge.engine.sinks import ModelSink, ShardedSafetensorsSink

__all__ = ["MergePlan", "MergeRecipe", "ModelSink", "ShardedSafetensorsSink", "Sources", "load_recipe",
           "merge_into", "merge_to_dir", "methods", "plan", "validate_config"]
