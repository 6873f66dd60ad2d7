"""The merge engine: mergekit's YAML in, merged tensors out, usable on its own like mergekit.

What it holds: the recipe schema (`recipe.py`), the merge methods (`methods/`, each declaring its
tunables once), lazily memory-mapped source checkpoints (`checkpoints.py`), one plan of every output
tensor (`plan.py`) and its execution (`execution.py`), the two sinks it writes into (`sinks.py`: a
resident model during a search, streamed safetensors shards at export), the command-line merge
(`merge.py`, with `output.py`, `chat_template.py` and the model card, `modelcard.py`).

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
from evomerge.engine.execution import merge_into
from evomerge.engine.merge import merge_to_dir, validate_config
from evomerge.engine.plan import MergePlan, plan
from evomerge.engine.recipe import MergeRecipe, load_recipe
from evomerge.engine.sinks import ModelSink, ShardedSafetensorsSink

__all__ = ["MergePlan", "MergeRecipe", "ModelSink", "ShardedSafetensorsSink", "Sources", "load_recipe",
           "merge_into", "merge_to_dir", "methods", "plan", "validate_config"]
