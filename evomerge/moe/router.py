"""Router (gate) weights for an MoE built from dense fine-tunes, computed as mergekit-moe computes them.

Why it exists: the router is the only part of a frankenMoE that no parent has. mergekit-moe places
each expert's router row where that expert's prompts land in the base model's space, and we match its
arithmetic, so that one config gives the same tensors under either tool:

- `hidden` (and `hidden_last`): the base model's hidden state at the last prompt token, at the input of
  every layer, averaged over the expert's prompts; `hidden_avg` averages over the tokens instead. The
  base runs in bfloat16, as in mergekit-moe.
- `cheap_embed`: the sum of the prompts' token embeddings, normalized, the same for every layer.
- For both: the negative prompts' vector is subtracted, and each row is scaled to unit length.
- `random` (standard normal) and `uniform_random` (torch.nn.Linear's default init range): drawn from a
  generator seeded with the config's `random_seed`; with `mergekit-moe --random-seed N` the draws are
  the same numbers.

Prompts are tokenized as mergekit-moe does: the base's tokenizer, padding on the left with the BOS token
as pad, the BOS text prepended, no other special tokens.

Returns (layers, experts, hidden) tensors; the caller slices routed and shared experts apart.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:
    import torch

    from evomerge.moe.config import Expert


def prompt_tokenizer(path: str, *, trust_remote_code: bool = False) -> Any:
    """The base's tokenizer, set up for prompts the way mergekit-moe sets it up."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    tok.padding_side = "left"
    tok.pad_token_id = tok.bos_token_id
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def tokenize(prompts: list[str], tokenizer: Any) -> dict:
    return tokenizer([(tokenizer.bos_token or "") + p for p in prompts], return_tensors="pt", padding=True,
                     add_special_tokens=False)


def random_gates(mode: str, shape: tuple[int, int, int], generator: "torch.Generator") -> "torch.Tensor":
    """`random`: N(0, 1); `uniform_random`: U(-1/sqrt(hidden), 1/sqrt(hidden)), as nn.Linear initializes."""
    import torch

    if mode == "random":
        return torch.randn(shape, generator=generator)
    scale = math.sqrt(1.0 / shape[2])
    return torch.rand(shape, generator=generator) * 2 * scale - scale


def cheap_embed_fn(embed: "torch.Tensor", num_layers: int) -> Callable[[dict], "torch.Tensor"]:
    """Prompts -> (layers, hidden): the normalized sum of their token embeddings, for every layer."""
    import torch

    table = embed.float()

    def run(tokenized: dict) -> "torch.Tensor":
        h = torch.nn.functional.embedding(tokenized["input_ids"], table)  # (batch, seq, hidden)
        summed = (h * tokenized["attention_mask"].unsqueeze(-1)).sum(dim=1).sum(dim=0, keepdim=True)
        unit = summed / summed.norm(dim=-1, keepdim=True).clamp(min=1e-8)
        return unit.repeat(num_layers, 1)

    return run


def hidden_fn(model: Any, *, average: bool) -> Callable[[dict], "torch.Tensor"]:
    """Prompts -> (layers, hidden): each layer's input hidden state (last token, or the token mean),
    averaged over the prompts."""
    import torch

    def run(tokenized: dict) -> "torch.Tensor":
        with torch.no_grad():
            out = model(**{k: v.to(model.device) for k, v in tokenized.items()}, output_hidden_states=True,
                        return_dict=True)
        states = torch.stack(out.hidden_states[:-1])  # (layers, batch, seq, hidden): each layer's input
        if average:
            states = states.sum(dim=2) / states.shape[2]
        else:
            states = states[:, :, -1, :]
        return (states.sum(dim=1) / states.shape[1]).cpu()

    return run


def load_hidden_model(path: str, *, trust_remote_code: bool = False, device: str = "cpu") -> Any:
    """The base model as mergekit-moe runs it for `hidden` gates: bfloat16, inference only."""
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    shown = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # one clean display: the build's own progress
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16, trust_remote_code=trust_remote_code)
    finally:
        if shown:
            hf_logging.enable_progress_bar()
    model.to(device)
    model.eval()
    model.requires_grad_(False)
    return model


def prompt_gates(experts: "list[Expert]", encode: Callable[[list[str]], dict],
                 fn: Callable[[dict], "torch.Tensor"]) -> "torch.Tensor":
    """(layers, experts, hidden): per expert, positive minus negative prompt vectors, unit length."""
    import torch

    rows = []
    for e in experts:
        vec = fn(encode(list(e.positive_prompts or [])))
        if e.negative_prompts:
            vec -= fn(encode(list(e.negative_prompts)))
        vec /= vec.norm(p=2, dim=-1, keepdim=True).clamp(min=1e-8)
        rows.append(vec)
    return torch.stack(rows, dim=0).permute(1, 0, 2)


def degenerate_layers(gates: "torch.Tensor", threshold: float = 5.0) -> list[int]:
    """Layers whose router rows are nearly linearly dependent (condition number above `threshold`):
    some experts will hardly be chosen there. mergekit-moe warns at the same threshold."""
    import torch

    out = []
    for i in range(gates.shape[0]):
        if float(torch.linalg.cond(gates[i].float())) > threshold:
            out.append(i)
    return out


__all__ = ["prompt_tokenizer", "tokenize", "random_gates", "cheap_embed_fn", "hidden_fn", "load_hidden_model",
           "prompt_gates", "degenerate_layers"]
