"""The README.md model card written next to a built MoE: its architecture, experts, routing and config.

Why it exists: a frankenMoE should explain itself on the Hub and on disk: that it is an MoE built
from dense fine-tunes without training, which model donated what, how tokens are routed, how many of
its parameters run per token, and the config that rebuilds it (`evomerge moe` or `mergekit-moe`).
"""

from __future__ import annotations

from typing import Any

from evomerge.engine.modelcard import hub_id
from evomerge.moe.layout import DISPLAY



def render_moe_card(p: Any, config_text: str, name: str) -> str:
    """`p`: the build's MoEPlan (config, layout, dtype, parameter counts)."""
    from evomerge import __version__

    cfg = p.config
    total, active = p.parameters
    front = ["---", "library_name: transformers", "tags:", "- moe", "- frankenmoe", "- merge", "- mergekit",
             "- evomerge"]
    hub = [h for h in (hub_id(m) for m in cfg.referenced_models()) if h]
    if hub:
        front += ["base_model:"] + [f"- {h}" for h in hub]
    front.append("---")
    lines = [
        *front,
        f"# {name}",
        "",
        f"A {DISPLAY[p.layout.arch]} mixture of experts built with evomerge {__version__} "
        "from dense fine-tunes, without training: the base model gives attention, norms and embeddings; each "
        "expert model gives its MLP as one expert in every layer; the routers were placed from prompts "
        f"(gate_mode `{cfg.gate_mode}`).",
        "The config is mergekit-moe's: `evomerge moe mergekit_moe_config.yml OUT` or "
        "`mergekit-moe mergekit_moe_config.yml OUT` rebuilds it"
        + (f" (mergekit-moe with `--random-seed {cfg.seed}`)." if _random(p) else "."),
        "",
        f"- {len(cfg.experts)} experts, {cfg.experts_per_token} per token"
        + (f", {len(cfg.shared_experts)} shared expert" if cfg.shared_experts else ""),
        f"- {total / 1e6:.2f}M parameters, {active / 1e6:.2f}M active per token; {p.layout.num_layers} layers, "
        f"{p.dtype}",
        f"- base: `{cfg.base_model}`",
        "",
        "## Experts",
        "",
    ]
    for i, e in enumerate(cfg.all_experts):
        role = "shared" if i >= len(cfg.experts) else f"{i}"
        extra = "".join(f", {k} {v}" for k, v in (("noise_scale", e.noise_scale), ("residual_scale", e.residual_scale))
                        if v is not None)
        prompts = "; ".join(f"`{x}`" for x in (e.positive_prompts or [])[:3])
        lines.append(f"- expert {role}: `{e.source_model}`{extra}" + (f" (prompts: {prompts})" if prompts else ""))
    lines += ["", "## Config", "", "```yaml", config_text.rstrip(), "```", ""]
    return "\n".join(lines)


def _random(p: Any) -> bool:
    return p.config.gate_mode in ("random", "uniform_random") or any(
        e.noise_scale is not None for e in p.config.all_experts)
