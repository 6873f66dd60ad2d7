"""Carving a task's evaluation documents into disjoint search / select / report splits.

Why it exists: the split discipline of a search (optimise on `search`, choose on `select`, report once
on `report`) must hold by construction for any lm-eval task, not by a naming convention. So each
document goes to a split by a keyed hash of its normalized content (what the model sees plus the
target): the same item always lands in the same split, whatever the order of the file, the `limit`
or the items added later, and items with the same normalized content always share a split. Nothing
is copied or rewritten: the result is a list of document indices per split, handed to lm-eval as its
`samples` argument.

The keyed hash is BLAKE2b keyed with the carving seed (not the task name), so one item that occurs in
two tasks of a mixture lands in the same split in both. Its first 8 bytes, as a number in [0, 1), are
compared with the cumulative split fractions (search, then select, then report).

A few-shot pool (`fewshot_pool`) is carved out of the search split when a task has no few-shot source
of its own: those items are then never evaluated, so no item is ever shown as its own example and no
select or report item is ever shown at all.
"""

from __future__ import annotations

import hashlib
import json
import re
import unicodedata
from dataclasses import dataclass
from typing import Any, Sequence

ROLES = ("search", "select", "report")
_SPACE = re.compile(r"\s+")


def normalize(text: Any) -> str:
    """Unicode NFKC, case-folded, whitespace runs collapsed to one space, stripped."""
    return _SPACE.sub(" ", unicodedata.normalize("NFKC", str(text)).casefold()).strip()


def content_key(prompt: Any, target: Any, choices: Sequence[Any] | None = None) -> str:
    """The normalized content of one item: prompt, choices (multiple choice) and target.

    A target given as an index into `choices` (lm-eval's multiple-choice form) is replaced by that
    choice, so the same question is the same item whether its answer is stored as a letter or a number."""
    if choices is not None and isinstance(target, int) and not isinstance(target, bool) and 0 <= target < len(choices):
        target = choices[target]
    if isinstance(target, (list, tuple)):
        target = [normalize(t) for t in target]
    else:
        target = normalize(target)
    return json.dumps([normalize(prompt), [normalize(c) for c in choices] if choices is not None else None, target],
                      ensure_ascii=False)


def digest(key: str, seed: int) -> bytes:
    """The keyed hash of one item's content."""
    return hashlib.blake2b(key.encode("utf-8"), key=f"evomerge-carve:{seed}".encode(), digest_size=16).digest()


def unit(key: str, seed: int) -> float:
    """The item's position in [0, 1), uniform over items."""
    return int.from_bytes(digest(key, seed)[:8], "big") / 2.0**64


@dataclass(frozen=True)
class Carving:
    """One task's carved splits: document indices per split (sorted) and the keys behind them."""

    indices: dict[str, tuple[int, ...]]
    keys: tuple[str, ...]  # content key of every document, in document order
    fewshot: tuple[int, ...] = ()  # indices carved out of search as the few-shot pool

    def sizes(self) -> dict[str, int]:
        out = {role: len(self.indices[role]) for role in self.indices}
        if self.fewshot:
            out["fewshot"] = len(self.fewshot)
        return out

    def ids_hash(self, role: str) -> str:
        """Order-independent hash of a split's items (their content digests, sorted)."""
        picked = self.fewshot if role == "fewshot" else self.indices[role]
        h = hashlib.sha256()
        for d in sorted(hashlib.sha256(self.keys[i].encode()).hexdigest() for i in picked):
            h.update(d.encode())
        return h.hexdigest()[:16]


def carve(keys: Sequence[str], fractions: dict[str, float], seed: int) -> Carving:
    """Assign each item (by its content key) to a split. `fractions` maps every role to its share."""
    bounds, acc = [], 0.0
    for role in ROLES:
        acc += fractions[role]
        bounds.append((role, acc))
    out: dict[str, list[int]] = {role: [] for role in ROLES}
    for i, key in enumerate(keys):
        u = unit(key, seed)
        role = next((r for r, b in bounds if u < b), ROLES[-1])
        out[role].append(i)
    return Carving(indices={r: tuple(v) for r, v in out.items()}, keys=tuple(keys))


def named(keys: Sequence[str], role: str) -> Carving:
    """A task that already is one split (the explicit `T_<split>` form): all its items are `role`."""
    return Carving(indices={r: (tuple(range(len(keys))) if r == role else ()) for r in ROLES}, keys=tuple(keys))


def fewshot_pool(carving: Carving, size: int, seed: int) -> Carving:
    """Move the `size` search items with the smallest keyed hash into a few-shot pool (deterministic,
    stable under appends like the carving itself). They are not evaluated afterwards."""
    search = carving.indices["search"]
    ranked = sorted(search, key=lambda i: (digest("fewshot:" + carving.keys[i], seed), i))
    chosen_keys = {carving.keys[i] for i in ranked[:size]}
    # items with the same content as a chosen one go with it (duplicates never straddle)
    pool = tuple(i for i in search if carving.keys[i] in chosen_keys)
    rest = tuple(i for i in search if carving.keys[i] not in chosen_keys)
    return Carving(indices={**carving.indices, "search": rest}, keys=carving.keys, fewshot=pool)
