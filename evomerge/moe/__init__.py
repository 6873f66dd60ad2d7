"""Mixtures of experts from dense fine-tunes (the "frankenMoE" of mergekit-moe), on disk or in memory.

What it holds: mergekit-moe's config schema (`config.py`), the router weights (`router.py`), the output
architectures Mixtral and Qwen2-MoE (`layout.py`), the build that streams every tensor into a sink
(`build.py`: `evomerge moe` to safetensors shards, and a resident model for the search), and the
model card (`card.py`).

What it may import: `evomerge.errors`, `evomerge.yamlfile` and the engine (sources, sinks, output
folders), never `search`, `executors` or `evaluation` (tests/test_architecture.py). Importing it
imports neither torch nor transformers.

    from evomerge.moe import moe_to_dir, load_moe_config
    moe_to_dir("moe.yaml", "./my-moe")                   # what `evomerge moe` does
"""

from evomerge.moe.build import MoEPlan, moe_to_dir, plan_moe, validate_moe, write_moe
from evomerge.moe.config import Expert, MoEConfig, is_moe_config, load_moe_config

__all__ = ["Expert", "MoEConfig", "MoEPlan", "is_moe_config", "load_moe_config", "moe_to_dir", "plan_moe",
           "validate_moe", "write_moe"]
