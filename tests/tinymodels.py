"""Tiny random Llama/Mistral-style checkpoint families for tests and benchmarks.

Merges are only meaningful between fine-tunes of one base, so a family is a random base model plus
"experts" = base + small seeded noise, each saved as a Hugging Face folder (config.json,
model.safetensors, generation_config.json) with a byte-level BPE tokenizer next to it. Everything is
built offline in a second or two; importable on its own so benchmarks and other test files can reuse it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

SPECIAL_TOKENS = ["<pad>", "<s>", "</s>"]
VOCAB_SIZE = 256 + len(SPECIAL_TOKENS)


@dataclass
class TinyFamily:
    """Paths of one family: `base` plus `experts` (fine-tune-like variants of it)."""

    root: Path
    arch: str
    base: Path
    experts: list[Path] = field(default_factory=list)

    @property
    def all(self) -> list[Path]:
        return [self.base, *self.experts]


def save_tokenizer(out: str | os.PathLike, model_max_length: int = 256):
    """Byte-level BPE with no merges (256 bytes + <pad>, <s>, </s>), saved for AutoTokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for ch in sorted(alphabet):
        vocab[ch] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        model_max_length=model_max_length,
    )
    fast.save_pretrained(str(out))
    return fast


def model_config(arch: str = "llama", *, hidden: int = 32, layers: int = 4, intermediate: int = 64,
                 heads: int = 4, kv_heads: int = 2, vocab: int = VOCAB_SIZE, tie: bool = False,
                 dtype: str = "float32", **extra):
    """A transformers config for a tiny Llama- or Mistral-style causal LM (`extra`: more config fields)."""
    from transformers import LlamaConfig, MistralConfig

    kwargs = dict(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate,
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
        max_position_embeddings=256, tie_word_embeddings=tie,
        bos_token_id=1, eos_token_id=2, pad_token_id=0, **extra,
    )
    if arch == "llama":
        cfg = LlamaConfig(**kwargs)
    elif arch == "mistral":
        cfg = MistralConfig(sliding_window=None, **kwargs)
    else:
        raise ValueError(f"unknown arch {arch!r} (llama or mistral)")
    cfg.dtype = dtype
    return cfg


def build_family(root: str | os.PathLike, *, arch: str = "llama", n_experts: int = 2, seed: int = 0,
                 noise: float = 0.02, dtype: str = "float32", tokenizer: bool = True,
                 **config_kwargs) -> TinyFamily:
    """Build base + `n_experts` variants under `root` (folders base, expert0, expert1, ...)."""
    import torch
    from transformers import AutoModelForCausalLM

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    torch_dtype = getattr(torch, dtype)
    cfg = model_config(arch, dtype=dtype, **config_kwargs)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg).to(torch_dtype)
    # Random init leaves the norms at exactly 1; perturb them so merges of norms are not trivial.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    base_state = {k: v.detach().clone() for k, v in model.state_dict().items()}

    fam = TinyFamily(root=root, arch=arch, base=root / "base")
    _save(model, fam.base, tokenizer)
    for i in range(n_experts):
        gen = torch.Generator().manual_seed(seed * 1000 + i + 1)
        with torch.no_grad():
            for name, p in model.named_parameters():
                base = base_state[name]
                delta = torch.randn(base.shape, generator=gen, dtype=torch.float32) * noise
                p.copy_((base.float() + delta).to(base.dtype))
        path = root / f"expert{i}"
        _save(model, path, tokenizer)
        fam.experts.append(path)
    return fam


def _save(model, path: Path, tokenizer: bool) -> None:
    import contextlib
    import io

    with contextlib.redirect_stderr(io.StringIO()):
        model.save_pretrained(str(path))
    if tokenizer:
        save_tokenizer(path)


def with_new_tokens(src: str | os.PathLike, dst: str | os.PathLike, *, plain: tuple[str, ...] = (),
                    added: tuple[str, ...] = (), seed: int = 0) -> Path:
    """A copy of model folder `src` whose tokenizer has more tokens, as a fine-tune that extended its
    vocabulary: `plain` tokens in the BPE vocabulary, then `added` special tokens, each with a new random
    row in every matrix indexed by token (embeddings, lm_head) and the config's vocab_size raised."""
    import json
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    src, dst = Path(src), Path(dst)
    shutil.copytree(src, dst)
    tj = json.loads((dst / "tokenizer.json").read_text())
    vocab = tj["model"]["vocab"]
    n = max(max(vocab.values()), max(t["id"] for t in tj["added_tokens"])) + 1
    for tok in plain:
        vocab[tok], n = n, n + 1
    for tok in added:
        tj["added_tokens"].append({"id": n, "content": tok, "single_word": False, "lstrip": False, "rstrip": False,
                                   "normalized": False, "special": True})
        n += 1
    (dst / "tokenizer.json").write_text(json.dumps(tj))
    cfg = json.loads((dst / "config.json").read_text())
    old, cfg["vocab_size"] = cfg["vocab_size"], n
    (dst / "config.json").write_text(json.dumps(cfg))
    state = load_file(str(dst / "model.safetensors"))
    gen = torch.Generator().manual_seed(seed)
    for key, t in state.items():
        if t.ndim == 2 and t.shape[0] == old:
            state[key] = torch.cat([t, torch.randn((n - old, t.shape[1]), generator=gen).to(t.dtype)])
    save_file(state, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst
