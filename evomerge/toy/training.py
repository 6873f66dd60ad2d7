"""Training of the toy family's tiny Llama models, deterministic on CPU.

`evomerge.toy.build` trains a base on a mixed corpus of every skill and then fine-tunes one expert
per skill from it. This module owns how: the byte-level tokenizer, the model shape, batches of
skill instances (loss on the answer only), and a seeded AdamW loop that gives bit-identical weights
for the same seed and thread count (`torch.use_deterministic_algorithms`).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch

from evomerge.toy.skills import drawer, line, normalize

SPECIALS = ("<pad>", "<s>", "</s>")
PAD_ID, BOS_ID, EOS_ID = 0, 1, 2
BYTE_OFFSET = len(SPECIALS)
VOCAB_SIZE = 256 + BYTE_OFFSET


@dataclass(frozen=True)
class ModelShape:
    """The Llama shape of every member of a family (they must agree to be merged)."""

    hidden: int = 128
    intermediate: int = 256
    layers: int = 4
    heads: int = 4
    max_positions: int = 64


@dataclass(frozen=True)
class Schedule:
    """One training run: steps, batch size, peak learning rate and the skills it draws from."""

    steps: int
    lr: float
    mixture: dict[str, float]
    batch: int = 64
    warmup: int = 20
    weight_decay: float = 0.0
    optimizer: str = "adamw"  # or "sgd" (momentum 0.9)


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character map (what `tokenizers`' ByteLevel pre-tokenizer emits)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    bs += list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


def build_tokenizer():
    """A byte-level tokenizer with no merges: token id = byte + 3; `<pad>`, `<s>`, `</s>` first."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIALS)}
    for b, ch in _bytes_to_unicode().items():
        vocab[ch] = b + BYTE_OFFSET
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>", model_max_length=64
    )


def encode(text: str) -> list[int]:
    """Token ids of `text` without the tokenizer object (equal to it; a test pins that)."""
    return [b + BYTE_OFFSET for b in text.encode("utf-8")]


def new_model(shape: ModelShape, seed: int):
    """A freshly initialised LlamaForCausalLM of `shape` (seeded)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=shape.hidden,
        intermediate_size=shape.intermediate,
        num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.heads,
        max_position_embeddings=shape.max_positions,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        pad_token_id=PAD_ID,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def instances(
    mixture: dict[str, float], seed: int, exclude: set[str]
) -> Iterator[tuple[str, str, str]]:
    """An endless seeded stream of (corpus entry, prompt, answer) drawn by `mixture`, skipping
    held-out prompts."""
    rng = random.Random(seed)
    names = list(mixture)
    weights = [mixture[n] for n in names]
    draw = {n: drawer(n) for n in names}
    while True:
        name = rng.choices(names, weights)[0]
        prompt, answer = draw[name](rng)
        if normalize(prompt) in exclude:
            continue
        yield name, prompt, answer


def collate(pairs: list[tuple[str, str]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded input ids, attention mask, labels (-100 everywhere but the answer and newline)."""
    rows, labels = [], []
    for prompt, answer in pairs:
        p = encode(prompt)
        a = encode(line("", answer))
        rows.append(p + a)
        labels.append([-100] * len(p) + a)
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), PAD_ID, dtype=torch.long)
    lab = torch.full((len(rows), width), -100, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (r, l) in enumerate(zip(rows, labels)):
        ids[i, : len(r)] = torch.tensor(r)
        lab[i, : len(l)] = torch.tensor(l)
        mask[i, : len(r)] = 1
    return ids, mask, lab


def replay_targets(
    batch: list[tuple[str, str, str]], own: tuple[str, ...], answer: Callable[[list[str]], list[str]]
) -> list[tuple[str, str]]:
    """(prompt, target) pairs of a batch: instances of the `own` skills keep their true answer, the
    others (replay) get `answer(prompts)`, e.g. the base's greedy answers."""
    pairs = [(prompt, truth) for _, prompt, truth in batch]
    replay = [i for i, (name, _, _) in enumerate(batch) if name.partition(":")[0] not in own]
    for i, target in zip(replay, answer([pairs[i][0] for i in replay]), strict=True):
        pairs[i] = (pairs[i][0], target)
    return pairs


def train(
    model,
    schedule: Schedule,
    *,
    seed: int,
    exclude: set[str],
    log: Callable[[str], None] | None = None,
    trainable: Callable[[str], bool] | None = None,
    teacher=None,
    own: tuple[str, ...] = (),
) -> float:
    """Train `model` in place on `schedule`; return the mean loss of the last 20 steps.

    `trainable(name)` picks the parameters that move (default: all); the others stay exactly as
    they are (they are not given to the optimizer, so not even weight decay touches them).
    `teacher`: instances of skills not in `own` are answered by the teacher's greedy output instead
    of the true answer (replay labelled by the base: the fine-tune keeps the base's behaviour on the
    other skills, errors included, rather than learning them)."""
    torch.manual_seed(seed)
    params = [p for n, p in model.named_parameters() if trainable is None or trainable(n)]
    if not params:
        raise ValueError("no trainable parameters")
    if schedule.optimizer == "sgd":
        opt = torch.optim.SGD(params, lr=schedule.lr, momentum=0.9, weight_decay=schedule.weight_decay)
    else:
        opt = torch.optim.AdamW(params, lr=schedule.lr, betas=(0.9, 0.98), weight_decay=schedule.weight_decay)

    def lr_at(step: int) -> float:
        if step < schedule.warmup:
            return (step + 1) / schedule.warmup
        progress = (step - schedule.warmup) / max(1, schedule.steps - schedule.warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    stream = instances(schedule.mixture, seed, exclude)
    model.train()
    recent: list[float] = []
    for step in range(schedule.steps):
        batch = [next(stream) for _ in range(schedule.batch)]
        if teacher is not None:
            pairs = replay_targets(batch, own, lambda prompts: greedy_answers(teacher, prompts))
        else:
            pairs = [(prompt, answer) for _, prompt, answer in batch]
        ids, mask, lab = collate(pairs)
        out = model(input_ids=ids, attention_mask=mask, labels=lab)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        recent = (recent + [out.loss.item()])[-20:]
        if log and (step % 100 == 0 or step == schedule.steps - 1):
            log(f"step {step:4d} loss {out.loss.item():.4f}")
    model.eval()
    return sum(recent) / max(1, len(recent))


@torch.no_grad()
def greedy_answers(model, prompts: list[str], max_new_tokens: int = 9, batch: int = 128) -> list[str]:
    """The model's greedy answer to each prompt (up to the first newline)."""
    model.eval()
    answers: list[str] = []
    for start in range(0, len(prompts), batch):
        chunk = [encode(p) for p in prompts[start : start + batch]]
        width = max(len(p) for p in chunk)
        ids = torch.full((len(chunk), width), PAD_ID, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for i, p in enumerate(chunk):  # left padding
            ids[i, width - len(p) :] = torch.tensor(p)
            mask[i, width - len(p) :] = 1
        out = model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=PAD_ID,
        )
        for row in out[:, width:].tolist():
            text = bytes(t - BYTE_OFFSET for t in row if t >= BYTE_OFFSET).decode("utf-8", "replace")
            answers.append(text.split("\n")[0])
    return answers


def greedy_accuracy(model, pairs: list[tuple[str, str]], batch: int = 128) -> float:
    """Exact-match accuracy of greedy answers (a fast check used while building; lm-eval is the judge)."""
    steps = max((len(a) for _, a in pairs), default=0) + 1
    answers = greedy_answers(model, [p for p, _ in pairs], max_new_tokens=steps, batch=batch)
    return sum(got == want for got, (_, want) in zip(answers, pairs)) / max(1, len(pairs))


def load_model(path: Path):
    """A saved family member as a float32 LlamaForCausalLM."""
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained(path, dtype=torch.float32)


def save(model, tokenizer, out: Path, *, storage_dtype: torch.dtype = torch.float16) -> None:
    """Save as a Hugging Face folder: safetensors in `storage_dtype`, config asking for float32."""
    out.mkdir(parents=True, exist_ok=True)
    model.to(storage_dtype)
    model.save_pretrained(out, safe_serialization=True)
    model.to(torch.float32)
    # Stored small, computed in float32: `dtype="auto"` loaders read this and upcast losslessly.
    model.config.dtype = torch.float32
    model.config.save_pretrained(out)
    model.generation_config.save_pretrained(out)
    tokenizer.save_pretrained(out)
