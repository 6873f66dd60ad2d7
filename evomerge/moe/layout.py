"""Which MoE architecture a config becomes, its config.json, and where every output tensor comes from.

Why it exists: the same experts can become a Mixtral (Llama or Mistral experts, no shared expert) or a
Qwen2-MoE (one shared expert with its own gate). Each output architecture is a naming scheme plus a
config; this module holds both, as plain data (`Piece`: one output tensor and its source), so that
`moe/build.py` streams any of them through the engine's sinks with one loop.

Tensor names are those `transformers.save_pretrained` writes for these classes (and mergekit-moe's
Qwen2-MoE output): one tensor per expert (`block_sparse_moe.experts.3.w1.weight`), which every
transformers version, vLLM and llama.cpp's converter read. transformers 5 fuses the experts into one
tensor in memory (`mlp.experts.gate_up_proj`); `moe/build.py`'s resident sink maps onto that.

Architecture choice follows mergekit-moe: `architecture:` filters by name prefix (`mixtral`, `qwen`),
then the first that supports the config wins, Mixtral preferred. DeepSeek-MoE is mergekit-moe's choice
for one shared expert without prompts; its model code lives only on the Hugging Face Hub
(`deepseek-ai/deepseek-moe-16b-base`, remote code), not in transformers, so evomerge refuses it with a
way out (prompts for the shared expert make it a Qwen2-MoE).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from evomerge.errors import CheckpointError, ConfigError

if TYPE_CHECKING:
    from evomerge.engine.checkpoints import Sources
    from evomerge.moe.config import MoEConfig

# mergekit-moe's output names; `architecture:` matches a prefix of one of these (case-insensitive).
ARCH_NAMES = ("Mixtral", "DeepSeek MoE", "Qwen MoE", "Qwen3 MoE")
DISPLAY = {"Mixtral": "Mixtral (MixtralForCausalLM)", "Qwen MoE": "Qwen2-MoE (Qwen2MoeForCausalLM)"}
DENSE_TYPES = {"Mixtral": ("llama", "mistral"), "Qwen MoE": ("llama", "mistral", "qwen2")}
_MLP = ("gate_proj", "up_proj", "down_proj")
_DROP = ("architectures", "auto_map", "quantization_config", "_name_or_path", "transformers_version", "model_type",
         "torch_dtype", "dtype")


@dataclass(frozen=True)
class Piece:
    """One output tensor. kind: `copy` (from `model`'s `source`, with expert `expert`'s noise and, for a
    down projection, its residual_scale), `zeros`, `router` or `shared_router` (row block of layer
    `layer`'s gate vectors)."""

    name: str
    kind: str
    shape: tuple[int, ...]
    model: str | None = None
    source: str | None = None
    expert: int | None = None  # index into config.all_experts
    residual: bool = False
    layer: int | None = None


@dataclass(frozen=True)
class Layout:
    arch: str  # one of ARCH_NAMES
    out_config: dict  # config.json
    pieces: tuple[Piece, ...]  # in computing order (the noise draws follow it, as in mergekit-moe)
    num_layers: int
    hidden_size: int
    gated_shared: bool  # whether shared experts get router rows


def choose_arch(config: "MoEConfig", model_types: dict[str, str]) -> str:
    """mergekit-moe's choice of output architecture, or a ConfigError that says why none fits."""
    candidates = list(ARCH_NAMES)
    if config.architecture:
        candidates = [a for a in ARCH_NAMES if a.lower().startswith(config.architecture.lower())]
        if not candidates:
            raise ConfigError(f"unknown MoE architecture {config.architecture!r}", where="architecture",
                              fix="use mixtral or qwen (Qwen2-MoE), or leave it out to infer it")
    types = set(model_types.values())
    reasons = []
    for arch in candidates:
        why = _unsupported(arch, config, types)
        if why is None:
            return arch
        reasons.append(f"{arch}: {why}")
    if len(types) != 1:
        listing = ", ".join(f"{m} is {t}" for m, t in model_types.items())
        raise CheckpointError(f"the base and the experts have different architectures ({listing})",
                              where="experts", fix="build an MoE from fine-tunes of one base model")
    (mtype,) = types
    if all(mtype not in DENSE_TYPES[a] for a in DENSE_TYPES):
        raise CheckpointError(f"a {mtype} base has no MoE counterpart in evomerge",
                              where="base_model", fix="use Llama, Mistral or Qwen2 models (Mixtral or Qwen2-MoE "
                                                      "output)")
    raise ConfigError("no MoE architecture fits this config: " + "; ".join(reasons),
                      where="architecture" if config.architecture else "shared_experts",
                      fix="see the reasons above (Mixtral: no shared experts; Qwen2-MoE: exactly one shared "
                          "expert, with prompts)")


def _unsupported(arch: str, config: "MoEConfig", types: set[str]) -> str | None:
    shared = config.shared_experts or []
    if arch == "Mixtral":
        if shared:
            return "has no shared experts"
    elif arch == "Qwen MoE":
        if len(shared) != 1:
            return "needs exactly one shared expert"
        if config.gate_mode != "random" and not shared[0].positive_prompts:
            return "needs prompts for the shared expert's gate"
    elif arch == "DeepSeek MoE":
        if len(shared) > 1 or (shared and (shared[0].positive_prompts or shared[0].negative_prompts)):
            return "takes at most one shared expert, without prompts"
        if shared:  # mergekit-moe would pick DeepSeek here; we cannot build it (see the module docstring)
            raise ConfigError(
                "one shared expert without prompts makes a DeepSeek-MoE in mergekit-moe, whose model code is "
                "only on the Hugging Face Hub (remote code), not in transformers", where="shared_experts[0]",
                fix="give the shared expert positive_prompts (a Qwen2-MoE with a gated shared expert), or drop "
                    "shared_experts (a Mixtral)")
        return "needs remote code from the Hub (not built by evomerge)"
    else:
        return "Qwen3 inputs are not supported by evomerge"
    if len(types) != 1:
        return "needs every model to have the same architecture"
    if next(iter(types)) not in DENSE_TYPES[arch]:
        return f"takes {' or '.join(DENSE_TYPES[arch])} models, not {next(iter(types))}"
    return None


def build_layout(config: "MoEConfig", sources: "Sources", dtype: str) -> Layout:
    """The layout of `config` over the opened sources (checked: every expert tensor exists with the
    base's shape). `dtype`: the output dtype name."""
    base = config.base_model
    types = {m: str(sources.config(m).get("model_type")) for m in config.referenced_models()}
    arch = choose_arch(config, types)
    cfg = sources.config(base)
    num_layers = int(cfg["num_hidden_layers"])
    hidden = int(cfg["hidden_size"])
    _check_biases(arch, cfg, sources, base)
    gated_shared = bool(config.shared_experts) and (
        any(e.positive_prompts for e in config.shared_experts) or config.gate_mode in ("random", "uniform_random"))
    _check_experts(config, sources, num_layers)
    pieces = _base_pieces(arch, sources, base, num_layers) + _moe_pieces(arch, config, sources, num_layers, hidden)
    return Layout(arch=arch, out_config=out_config(arch, cfg, config, dtype), pieces=tuple(pieces),
                  num_layers=num_layers, hidden_size=hidden, gated_shared=gated_shared)


def _mlp(layer: int, part: str) -> str:
    return f"model.layers.{layer}.mlp.{part}.weight"


def _check_biases(arch: str, cfg: dict, sources: "Sources", base: str) -> None:
    """The base's biases have a place in the output architecture."""
    if arch == "Mixtral" and (cfg.get("attention_bias") or cfg.get("mlp_bias")):
        raise CheckpointError("the base uses attention or MLP biases, which Mixtral has no place for",
                              where="base_model", fix="use architecture: qwen (Qwen2-MoE keeps q/k/v biases) or "
                                                      "a base without biases")
    if arch == "Qwen MoE" and (cfg.get("mlp_bias") or sources.has(base, "model.layers.0.self_attn.o_proj.bias")):
        raise CheckpointError("the base uses MLP or output-projection biases, which Qwen2-MoE has no place for",
                              where="base_model", fix="use a base without those biases")


def _check_experts(config: "MoEConfig", sources: "Sources", num_layers: int) -> None:
    """Every expert (shared ones included) has every MLP tensor of the base, with the base's shape."""
    n = len(config.experts)
    for i, e in enumerate(config.all_experts):
        key = f"experts[{i}]" if i < n else f"shared_experts[{i - n}]"
        for layer in range(num_layers):
            for part in _MLP:
                name = _mlp(layer, part)
                if not sources.has(e.source_model, name):
                    raise CheckpointError(f"{e.source_model} has no tensor {name}", where=f"{key}.source_model",
                                          fix="use dense fine-tunes of the base (same layer count and MLP names)")
                got, want = sources.info(e.source_model, name).shape, sources.info(config.base_model, name).shape
                if tuple(got) != tuple(want):
                    raise CheckpointError(f"{name} is {list(got)} in {e.source_model} but {list(want)} in the base",
                                          where=f"{key}.source_model", fix="use fine-tunes of the same base model")


def _base_pieces(arch: str, sources: "Sources", base: str, num_layers: int) -> list[Piece]:
    """What the base gives: every tensor but its MLPs (and, for Qwen2-MoE, zero q/k/v biases it lacks)."""
    pieces: list[Piece] = []
    for name in sources.names(base):
        if ".mlp." in name:
            continue
        pieces.append(Piece(name, "copy", tuple(sources.info(base, name).shape), model=base, source=name))
    if arch == "Qwen MoE":  # Qwen2-MoE always has q/k/v biases: zeros where the base has none
        for layer in range(num_layers):
            for proj in ("q_proj", "k_proj", "v_proj"):
                bias = f"model.layers.{layer}.self_attn.{proj}.bias"
                if not sources.has(base, bias):
                    rows = sources.info(base, f"model.layers.{layer}.self_attn.{proj}.weight").shape[0]
                    pieces.append(Piece(bias, "zeros", (rows,)))
    return pieces


def _moe_pieces(arch: str, config: "MoEConfig", sources: "Sources", num_layers: int, hidden: int) -> list[Piece]:
    """The experts' MLPs and the routers, in mergekit-moe's order (noise draws follow it)."""
    base, experts, n = config.base_model, config.all_experts, len(config.experts)

    def expert_piece(name: str, index: int, layer: int, part: str) -> Piece:
        src = _mlp(layer, part)
        return Piece(name, "copy", tuple(sources.info(base, src).shape), model=experts[index].source_model,
                     source=src, expert=index, residual=part == "down_proj")

    pieces: list[Piece] = []
    if arch == "Mixtral":
        for layer in range(num_layers):
            for e in range(n):  # mergekit-moe's order: per expert gate, down, up (noise draws follow it)
                for part, w in (("gate_proj", "w1"), ("down_proj", "w2"), ("up_proj", "w3")):
                    pieces.append(expert_piece(f"model.layers.{layer}.block_sparse_moe.experts.{e}.{w}.weight",
                                               e, layer, part))
        for layer in range(num_layers):
            pieces.append(Piece(f"model.layers.{layer}.block_sparse_moe.gate.weight", "router", (n, hidden),
                                layer=layer))
        return pieces
    for layer in range(num_layers):
        for part in ("down_proj", "gate_proj", "up_proj"):  # mergekit-moe's (alphabetical) order
            for e in range(n):
                pieces.append(expert_piece(f"model.layers.{layer}.mlp.experts.{e}.{part}.weight", e, layer, part))
            pieces.append(expert_piece(f"model.layers.{layer}.mlp.shared_expert.{part}.weight", n, layer, part))
    for layer in range(num_layers):
        pieces.append(Piece(f"model.layers.{layer}.mlp.gate.weight", "router", (n, hidden), layer=layer))
        pieces.append(Piece(f"model.layers.{layer}.mlp.shared_expert_gate.weight", "shared_router", (1, hidden),
                            layer=layer))
    return pieces


def out_config(arch: str, base_cfg: dict, config: "MoEConfig", dtype: str) -> dict:
    """config.json of the MoE: the base's config carried into the MoE class, as mergekit-moe does."""
    import transformers

    data = {k: v for k, v in base_cfg.items() if k not in _DROP}
    n = len(config.experts)
    if arch == "Mixtral":
        data["sliding_window"] = None
        out: Any = transformers.MixtralConfig(**data)
        out.architectures = ["MixtralForCausalLM"]
        out.num_local_experts = n
        out.num_experts_per_tok = config.experts_per_token
        out.sliding_window = None
    else:
        out = transformers.Qwen2MoeConfig(**data)
        out.architectures = ["Qwen2MoeForCausalLM"]
        out.num_experts = n
        out.num_experts_per_tok = config.experts_per_token
        out.decoder_sparse_step = 1
        out.mlp_only_layers = []
        out.norm_topk_prob = True
        out.sliding_window = None
        out.use_sliding_window = False
        out.shared_expert_intermediate_size = out.intermediate_size
        out.moe_intermediate_size = out.intermediate_size
    result = json.loads(out.to_json_string(use_diff=True))  # what save_pretrained writes
    result["dtype"] = dtype
    result.pop("torch_dtype", None)
    return result


def parameter_counts(layout: Layout, experts_per_token: int) -> tuple[int, int]:
    """(total, active per token) parameter counts: every tensor counts once in the total; of the
    routed experts' tensors, only `experts_per_token` of them count as active."""
    total = routed = 0
    n_routed = layout.out_config.get("num_local_experts") or layout.out_config.get("num_experts") or 1
    for p in layout.pieces:
        size = 1
        for d in p.shape:
            size *= d
        total += size
        if p.kind == "copy" and p.expert is not None and ".shared_expert." not in p.name:
            routed += size
    return total, total - routed + routed * experts_per_token // n_routed


__all__ = ["ARCH_NAMES", "DISPLAY", "Piece", "Layout", "choose_arch", "build_layout", "out_config", "parameter_counts"]
