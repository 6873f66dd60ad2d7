"""Overlap audit: items that occur (or nearly occur) in two splits, or in two tasks of the mixture.

Why it exists: a report split is only held out if none of its items is also a search or select item.
Carving by content hash puts identical items into one split, but pre-split tasks, near-duplicates (one
word changed) and items shared by two tasks of the mixture slip through. Before a search starts, every
item's normalized content (`splits.content_key`: prompt, choices and target) is compared:

- `duplicate`: the same normalized content in two places (another split, or another task);
- `near-duplicate`: a shared run of at least `n` words (default 8) of prompt + target text.

Two places are different when task or split differs; repeats inside one split of one task are not
leakage and are not reported. Word n-grams are hashed once per item, so the audit is linear in the
number of words.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Iterable

NGRAM = 8


@dataclass(frozen=True)
class Item:
    task: str
    split: str
    index: int  # document index in the task
    key: str  # splits.content_key


@dataclass(frozen=True)
class Finding:
    kind: str  # "duplicate" | "near-duplicate"
    a: Item
    b: Item
    shared: str  # the shared text (shortened)

    def as_dict(self) -> dict:
        return {"kind": self.kind, "a": f"{self.a.task}/{self.a.split}#{self.a.index}",
                "b": f"{self.b.task}/{self.b.split}#{self.b.index}", "shared": self.shared}


def _words(key: str) -> list[str]:
    try:
        prompt, choices, target = json.loads(key)
    except (ValueError, TypeError):
        return key.split()
    parts = [str(prompt)] + [str(c) for c in (choices or [])]
    parts += [str(t) for t in target] if isinstance(target, list) else [str(target)]
    return " ".join(parts).split()


def find(items: Iterable[Item], n: int = NGRAM, limit: int = 100) -> list[Finding]:
    """Duplicates and near-duplicates across (task, split) places, at most `limit` of them."""
    out: list[Finding] = []
    seen_pairs: set[tuple] = set()
    by_key: dict[str, Item] = {}
    by_gram: dict[str, Item] = {}

    def add(kind: str, a: Item, b: Item, shared: str) -> bool:
        pair = tuple(sorted([(a.task, a.split, a.index), (b.task, b.split, b.index)]))
        if pair in seen_pairs:
            return False
        seen_pairs.add(pair)
        out.append(Finding(kind, a, b, shared if len(shared) <= 120 else shared[:117] + "..."))
        return len(out) >= limit

    for item in items:
        place = (item.task, item.split)
        first = by_key.get(item.key)
        if first is None:
            by_key[item.key] = item
        elif (first.task, first.split) != place:
            if add("duplicate", first, item, " ".join(_words(item.key))):
                return out
            continue
        words = _words(item.key)
        for i in range(len(words) - n + 1):
            gram = " ".join(words[i:i + n])
            other = by_gram.get(gram)
            if other is None:
                by_gram[gram] = item
            elif (other.task, other.split) != place and other.key != item.key:
                if add("near-duplicate", other, item, gram):
                    return out
                break
    return out


def table(findings: list[Finding], shown: int = 10) -> str:
    """The offending items as a short text table (for the error message and the report)."""
    lines = [f"{f.kind:14}  {f.a.task}/{f.a.split}#{f.a.index}  ~  {f.b.task}/{f.b.split}#{f.b.index}  {f.shared!r}"
             for f in findings[:shown]]
    if len(findings) > shown:
        lines.append(f"... and {len(findings) - shown} more")
    return "\n".join(lines)


__all__ = ["Item", "Finding", "find", "table", "NGRAM"]
