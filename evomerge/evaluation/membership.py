"""Membership evidence: Min-K%++ scores of a model on items, and the parents' lineage from their files.

Why it exists: a merge inherits its parents' contamination (the Open LLM Leaderboard had to flag merged
models for it). Two pieces of evidence, neither a verdict:

- Lineage (`lineage`): what a model folder declares about itself: the base model and data sets in its
  model card's front matter, "merge" tags, the config's `_name_or_path`.
- Min-K%++ (Zhang et al., 2024, "Min-K%++: Improved baseline for detecting pre-training data"): for
  each token of an item, how much more likely the model finds it than the typical token at that
  position, `(log p(x_t) - mu_t) / sigma_t` with mu_t and sigma_t the mean and standard deviation of
  log p over the vocabulary under the model's own next-token distribution; the item's score is the
  mean of its lowest k% (default 20%) token scores. Seen items score higher. The AUROC of the report
  items' scores against reference items of the same task that the model cannot have seen (freshly
  generated, or given by the user) is the evidence: about 0.5 means no sign of having seen the report
  items; near 1 means they look memorized.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

K = 0.2


def min_k_pp(model: Any, tokenizer: Any, texts: Sequence[str], *, k: float = K, batch: int = 32) -> list[float]:
    """Min-K%++ score of every text (higher: more likely seen in training)."""
    import torch

    out: list[float] = []
    bos = tokenizer.bos_token_id
    device = next(model.parameters()).device
    for start in range(0, len(texts), batch):
        chunk = texts[start:start + batch]
        ids = [([bos] if bos is not None else []) + tokenizer(t, add_special_tokens=False)["input_ids"] for t in chunk]
        width = max(len(x) for x in ids)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        input_ids = torch.full((len(ids), width), pad, dtype=torch.long)
        mask = torch.zeros((len(ids), width), dtype=torch.long)
        for i, x in enumerate(ids):  # right padding: positions are those of the unpadded text
            input_ids[i, :len(x)] = torch.tensor(x)
            mask[i, :len(x)] = 1
        with torch.no_grad():
            logits = model(input_ids=input_ids.to(device), attention_mask=mask.to(device)).logits.float()
        logp = torch.log_softmax(logits[:, :-1], dim=-1)
        probs = logp.exp()
        mu = (probs * logp).sum(-1)
        sigma = ((probs * logp.pow(2)).sum(-1) - mu.pow(2)).clamp(min=1e-12).sqrt()
        target = input_ids[:, 1:].to(device)
        tok = logp.gather(-1, target.unsqueeze(-1)).squeeze(-1)
        scores = ((tok - mu) / sigma).cpu()
        valid = mask[:, 1:].bool()
        for i in range(len(ids)):
            s = scores[i][valid[i]]
            if s.numel() == 0:
                out.append(0.0)
                continue
            n = max(1, int(round(k * s.numel())))
            out.append(float(torch.sort(s).values[:n].mean()))
    return out


def item_text(key: str) -> str:
    """An item's text as a model would have seen it in training: prompt followed by the target."""
    try:
        prompt, choices, target = json.loads(key)
    except (ValueError, TypeError):
        return key
    target = target[0] if isinstance(target, list) and target else target
    return f"{prompt}{target}" if isinstance(target, str) else str(prompt)


def lineage(folder: str | Path) -> dict:
    """What a model folder declares: base model(s), merge tags, data sets, the config's name."""
    import yaml

    folder = Path(folder)
    out: dict[str, Any] = {"base_model": None, "merge": False, "datasets": [], "name_or_path": None}
    try:
        cfg = json.loads((folder / "config.json").read_text(encoding="utf-8"))
        out["name_or_path"] = cfg.get("_name_or_path") or None
    except (OSError, ValueError):
        pass
    card = folder / "README.md"
    if card.is_file():
        text = card.read_text(encoding="utf-8", errors="replace")
        if text.startswith("---"):
            end = text.find("\n---", 3)
            try:
                front = yaml.safe_load(text[3:end]) if end > 0 else None
            except yaml.YAMLError:
                front = None
            if isinstance(front, dict):
                base = front.get("base_model")
                out["base_model"] = ", ".join(map(str, base)) if isinstance(base, list) else base
                tags = [str(t).lower() for t in (front.get("tags") or []) if t is not None]
                out["merge"] = any("merge" in t for t in tags)
                ds = front.get("datasets") or []
                out["datasets"] = [str(d) for d in (ds if isinstance(ds, list) else [ds])]
        if "mergekit" in text.lower():
            out["merge"] = True
    return out


__all__ = ["min_k_pp", "item_text", "lineage", "K"]
