"""An MoE config -> a plan -> every output tensor, streamed into a sink (shards on disk, or a resident model).

Why it exists: `evomerge moe` (export) and the search's `method: moe` (in memory) must produce the same
tensors. Both go through `plan_moe` (every check, before any heavy work: the config's own checks, the
checkpoints' architectures and shapes, the output architecture) and `write_moe` (router weights
first, then each output tensor in mergekit-moe's order, read lazily from the memory-mapped experts,
noise and residual scale applied, cast, handed to the sink one at a time). On disk that is the
engine's `ShardedSafetensorsSink`, so peak memory grows with one tensor, not with the expert count;
in memory it is `ResidentMoESink`, which writes the same tensors into a loaded transformers model
(transformers 5 keeps each layer's experts fused in one tensor; the sink writes each expert's slice).

Randomness (the `random`/`uniform_random` routers and `noise_scale`) comes from one generator seeded
with the config's `random_seed` (default 0), drawn in mergekit-moe's order, so `mergekit-moe
--random-seed N` gives the same numbers for the same config.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

from evomerge.engine.output import check_out, copy_side_files, human_bytes, staged
from evomerge.engine.sinks import ITEM_SIZE, TensorSpec
from evomerge.errors import CheckpointError
from evomerge.moe.config import PROMPT_MODES, MoEConfig, load_moe_config
from evomerge.moe.layout import DISPLAY, Layout, build_layout, parameter_counts

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from evomerge.engine.checkpoints import Sources

CONFIG_FILE = "mergekit_moe_config.yml"  # the name mergekit-moe gives the config it was built from


@dataclass(frozen=True)
class MoEPlan:
    config: MoEConfig
    layout: Layout
    dtype: str  # output dtype name

    @property
    def specs(self) -> list[TensorSpec]:
        return [TensorSpec(p.name, p.shape, self.dtype) for p in self.layout.pieces]

    @property
    def nbytes(self) -> int:
        return sum(s.nbytes for s in self.specs)

    @property
    def parameters(self) -> tuple[int, int]:
        """(total, active per token) parameter counts."""
        return parameter_counts(self.layout, self.config.experts_per_token)


def output_dtype(config: MoEConfig, base_cfg: dict) -> str:
    """config.dtype, else the base's stored dtype (config.json), else float32 (as mergekit-moe)."""
    if config.dtype:
        return config.dtype
    stored = base_cfg.get("dtype") or base_cfg.get("torch_dtype")
    if isinstance(stored, str) and stored.replace("torch.", "") in ITEM_SIZE:
        return stored.replace("torch.", "")
    return "float32"


def plan_moe(config: MoEConfig, sources: "Sources", *, allow_all_same: bool = False,
             source: str | None = None) -> MoEPlan:
    """Every check on the config and its checkpoints; cheap (reads headers and configs only)."""
    config.check(allow_all_same=allow_all_same, source=source)
    models = config.referenced_models()
    where = config.model_fields_paths()
    layout = build_layout(config, sources, output_dtype(config, sources.config(config.base_model)))
    sources.check_compatible(models, where=where)
    if config.gate_mode == "cheap_embed" and not sources.has(config.base_model, "model.embed_tokens.weight"):
        raise CheckpointError("gate_mode cheap_embed reads model.embed_tokens.weight, which the base lacks",
                              where="gate_mode", fix="use gate_mode: hidden")
    return MoEPlan(config=config, layout=layout, dtype=layout.out_config["dtype"])


# --- router weights ---------------------------------------------------------------------------------
class GateSource:
    """What the prompt-driven gate modes need from the base: its tokenizer, its embeddings, and (for
    `hidden`) the base model in bfloat16, each loaded once and reused (a search asks many times)."""

    def __init__(self, base_path: str, sources: "Sources", base: str, *, trust_remote_code: bool = False,
                 device: str = "cpu"):
        self.base_path = base_path
        self.sources = sources
        self.base = base
        self.trust_remote_code = trust_remote_code
        self.device = device
        self._tokenizer = None
        self._hidden_model = None
        self._cache: dict[tuple, "torch.Tensor"] = {}

    def tokenizer(self):
        if self._tokenizer is None:
            from evomerge.moe.router import prompt_tokenizer

            self._tokenizer = prompt_tokenizer(self.base_path, trust_remote_code=self.trust_remote_code)
        return self._tokenizer

    def expert_rows(self, mode: str, expert, num_layers: int) -> "torch.Tensor":
        """(layers, hidden) router row(s) of one expert under a prompt-driven mode (cached)."""
        from evomerge.moe import router

        key = (mode, tuple(expert.positive_prompts or ()), tuple(expert.negative_prompts or ()))
        if key not in self._cache:
            if mode == "cheap_embed":
                fn = router.cheap_embed_fn(self.sources.tensor(self.base, "model.embed_tokens.weight"), num_layers)
            else:
                if self._hidden_model is None:
                    self._hidden_model = router.load_hidden_model(self.base_path,
                                                                  trust_remote_code=self.trust_remote_code,
                                                                  device=self.device)
                fn = router.hidden_fn(self._hidden_model, average=mode == "hidden_avg")
            tok = self.tokenizer()
            self._cache[key] = router.prompt_gates([expert], lambda ps: router.tokenize(ps, tok), fn)[:, 0, :]
        return self._cache[key]


def gate_weights(p: MoEPlan, gates: GateSource, generator: "torch.Generator") -> "torch.Tensor":
    """(layers, gated experts, hidden): routed experts, then the shared ones when they are gated."""
    import torch

    from evomerge.moe.router import random_gates

    cfg = p.config
    need = list(cfg.experts) + (list(cfg.shared_experts or []) if p.layout.gated_shared else [])
    shape = (p.layout.num_layers, len(need), p.layout.hidden_size)
    if cfg.gate_mode in ("random", "uniform_random"):
        return random_gates(cfg.gate_mode, shape, generator)
    return torch.stack([gates.expert_rows(cfg.gate_mode, e, p.layout.num_layers) for e in need], dim=1)


# --- tensors ----------------------------------------------------------------------------------------
def iter_tensors(p: MoEPlan, sources: "Sources", gate_vecs: "torch.Tensor",
                 generator: "torch.Generator") -> Iterator[tuple[str, "torch.Tensor"]]:
    """(name, tensor) for every output tensor, in the layout's order (which the noise draws follow)."""
    import torch

    out = getattr(torch, p.dtype)
    experts = p.config.all_experts
    n = len(p.config.experts)
    for piece in p.layout.pieces:
        if piece.kind == "copy":
            t = sources.tensor(piece.model, piece.source)
            if piece.expert is not None:
                e = experts[piece.expert]
                if e.noise_scale is not None:
                    noise = torch.randn(t.shape, dtype=t.dtype, generator=generator)  # CPU stream, as mergekit-moe
                    t = t + noise.to(t.device) * e.noise_scale
                if piece.residual and e.residual_scale is not None:
                    t = t * e.residual_scale
        elif piece.kind == "zeros":
            t = torch.zeros(piece.shape, dtype=out)
        elif piece.kind == "router":
            t = gate_vecs[piece.layer, :n, :]
        else:  # shared_router
            t = gate_vecs[piece.layer, n:, :]
        yield piece.name, t.to(dtype=out).contiguous()


def write_moe(sink: Any, p: MoEPlan, sources: "Sources", gates: GateSource, *,
              progress: bool = False) -> "torch.Tensor":
    """Router weights, then every output tensor, into `sink` (prepare, write each, finish). Returns the
    gate vectors (layers, gated experts, hidden)."""
    import torch

    generator = torch.Generator().manual_seed(p.config.seed)
    gate_vecs = gate_weights(p, gates, generator)
    sink.prepare(p.specs)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(p.layout.pieces), desc="building", unit="tensor", dynamic_ncols=True)
    try:
        for name, tensor in iter_tensors(p, sources, gate_vecs, generator):
            sink.write(name, tensor)
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    sink.finish()
    return gate_vecs


# --- in memory (the search) -------------------------------------------------------------------------
class ResidentMoESink:
    """Writes an MoE's tensors (in the saved, one-tensor-per-expert naming) into a loaded transformers
    MoE model, in place. transformers 5 stores a layer's experts fused (`mlp.experts.gate_up_proj`:
    experts x [gate; up] x hidden, `mlp.experts.down_proj`); each expert tensor goes into its slice.
    Every parameter of the model must be written (else it would keep a previous candidate's values)."""

    _MIXTRAL = {"w1": ("gate_up_proj", 0), "w3": ("gate_up_proj", 1), "w2": ("down_proj", None)}
    _QWEN = {"gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1), "down_proj": ("down_proj", None)}

    def __init__(self, model: Any):
        self.model = model
        self._params = dict(model.named_parameters())
        self._covered: dict[str, int] = {}

    def _target(self, name: str):
        """(parameter, index or None): where saved tensor `name` lives in the model."""
        if name in self._params:
            return self._params[name], None
        name = name.replace(".block_sparse_moe.", ".mlp.")
        if name in self._params:
            return self._params[name], None
        parts = name.split(".")
        if "experts" in parts and parts[-1] == "weight":
            i = parts.index("experts")
            expert, proj = int(parts[i + 1]), parts[i + 2]
            fused, half = (self._MIXTRAL.get(proj) or self._QWEN.get(proj) or (None, None))
            key = ".".join(parts[:i + 1] + [fused]) if fused else None
            if key in self._params:
                param = self._params[key][expert]
                if half is not None:
                    rows = param.shape[0] // 2
                    param = param[half * rows:(half + 1) * rows]
                return param, key
        raise CheckpointError(f"the resident MoE model has no place for {name!r}", where=type(self.model).__name__,
                              fix="build the resident model from the MoE plan's config")

    def prepare(self, specs: list[TensorSpec]) -> None:
        self._covered.clear()
        for spec in specs:
            target, key = self._target(spec.name)
            if tuple(target.shape) != tuple(spec.shape):
                raise CheckpointError(f"shape mismatch for {spec.name}: the MoE gives {list(spec.shape)}, the "
                                      f"resident model has {list(target.shape)}", where=type(self.model).__name__)
            k = key or spec.name.replace(".block_sparse_moe.", ".mlp.")
            self._covered[k] = self._covered.get(k, 0) + target.numel()
        for name, param in self._params.items():
            if self._covered.get(name, 0) != param.numel():
                raise CheckpointError(f"the MoE does not produce all of {name!r} of the resident model",
                                      where=type(self.model).__name__,
                                      fix="build the resident model from the MoE plan's config")

    def write(self, name: str, tensor: "torch.Tensor") -> None:
        import torch

        target, _ = self._target(name)
        with torch.no_grad():
            target.copy_(tensor)

    def finish(self) -> None:
        pass


def resident_model(p: MoEPlan, *, dtype: str | None = None, device: str = "cpu") -> Any:
    """An empty transformers model of the plan's MoE config (weights to be written by a sink)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    data = dict(p.layout.out_config)
    model_type = data.pop("model_type")
    cfg = AutoConfig.for_model(model_type, **data)
    model = AutoModelForCausalLM.from_config(cfg, dtype=getattr(torch, dtype or p.dtype))
    model.to(device)
    model.eval()
    model.requires_grad_(False)
    return model


# --- the CLI's moe and validate ---------------------------------------------------------------------
def _open(config: MoEConfig, device: str = "cpu", reads: str = "mmap") -> "Sources":
    from evomerge.engine.checkpoints import Sources

    return Sources.open(config.model_fields_paths(), device=device, reads=reads)


def _load(config_path, model_root) -> tuple[MoEConfig, str]:
    config = load_moe_config(config_path)
    text = Path(config_path).read_text(encoding="utf-8")
    if model_root is not None:
        config = config.relocated(model_root)
        text = config.to_yaml(comments=[f"{config_path}, model folders under {model_root}"])
    return config, text


def moe_to_dir(config_path: str | os.PathLike, out: str | os.PathLike, *, overwrite: bool = False,
               shard_size: int | str = "5GB", device: str = "cpu", progress: bool = True,
               trust_remote_code: bool = False, allow_all_same: bool = False,
               model_root: str | os.PathLike | None = None) -> Path:
    """`evomerge moe`: build the MoE that `config_path` describes into the folder `out` (HF layout)."""
    from evomerge.engine.execution import resolve_device
    from evomerge.engine.sinks import ShardedSafetensorsSink, parse_size
    from evomerge.moe.card import render_moe_card

    out = Path(out)
    config, text = _load(config_path, model_root)
    config.check(allow_all_same=allow_all_same)
    shard_bytes = parse_size(shard_size)
    check_out(out, overwrite)
    device = resolve_device(device)
    sources = _open(config, "cpu", reads="copy")  # copying tensors gains nothing on a GPU; `device` runs the base
    try:
        sources.check_custom_code(allowed=trust_remote_code, flag="--trust-remote-code")
        p = plan_moe(config, sources, allow_all_same=allow_all_same)
        check_out(out, overwrite, sources)
        base_dir = sources.path(config.base_model)
        gates = GateSource(str(base_dir), sources, config.base_model, trust_remote_code=trust_remote_code,
                           device=device)
        with staged(out) as tmp:
            gate_vecs = write_moe(ShardedSafetensorsSink(tmp, shard_bytes), p, sources, gates, progress=progress)
            (tmp / "config.json").write_text(json.dumps(p.layout.out_config, indent=2, sort_keys=True) + "\n",
                                             encoding="utf-8")
            copy_side_files(tmp, config_from=base_dir, tokenizer_from=base_dir)
            (tmp / CONFIG_FILE).write_text(text, encoding="utf-8")
            (tmp / "README.md").write_text(render_moe_card(p, text, out.name), encoding="utf-8")
    finally:
        sources.close()
    from evomerge.moe.router import degenerate_layers

    weak = degenerate_layers(gate_vecs)
    if weak and progress:
        import sys

        print(f"warning: router rows nearly dependent in {len(weak)} of {p.layout.num_layers} layers "
              f"({', '.join(map(str, weak[:8]))}{'...' if len(weak) > 8 else ''}): the prompts may be too "
              "similar, and some experts will be chosen rarely", file=sys.stderr)
    return out


def validate_moe(config_path: str | os.PathLike, *, trust_remote_code: bool = False, allow_all_same: bool = False,
                 model_root: str | os.PathLike | None = None) -> str:
    """`evomerge validate` for an MoE config: every check `evomerge moe` makes, without building."""
    config, _ = _load(config_path, model_root)
    sources = _open(config)
    try:
        sources.check_custom_code(allowed=trust_remote_code, flag="--trust-remote-code")
        p = plan_moe(config, sources, allow_all_same=allow_all_same, source=str(config_path))
        if config.gate_mode in PROMPT_MODES:
            GateSource(str(sources.path(config.base_model)), sources, config.base_model,
                       trust_remote_code=trust_remote_code).tokenizer()
    finally:
        sources.close()
    total, active = p.parameters
    shared = len(config.shared_experts or [])
    lines = [
        f"ok: {config_path}",
        f"  moe         {DISPLAY[p.layout.arch]}: {len(config.experts)} experts" + (f" + {shared} shared" if shared else "")
        + f", {config.experts_per_token} per token, gate_mode {config.gate_mode}",
        f"  output      {len(p.layout.pieces)} tensors, {p.layout.num_layers} layers, {p.dtype}, "
        f"{human_bytes(p.nbytes)}",
        f"  parameters  {total / 1e6:.2f}M total, {active / 1e6:.2f}M active per token",
        f"  base        {config.base_model} (attention, norms, embeddings, tokenizer)",
    ]
    if config.gate_mode in ("random", "uniform_random") or any(e.noise_scale is not None for e in config.all_experts):
        lines.append(f"  random_seed {config.seed}" + ("" if config.random_seed is not None else
                                                       " (default; add random_seed to pin it)"))
    return "\n".join(lines)


__all__ = ["MoEPlan", "plan_moe", "write_moe", "iter_tensors", "gate_weights", "GateSource", "ResidentMoESink",
           "resident_model", "moe_to_dir", "validate_moe", "output_dtype", "CONFIG_FILE"]
