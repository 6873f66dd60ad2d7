"""The toy family's skills: synthetic prompt/answer generators, one per skill.

The embedded toy family (see `evomerge.toy`) is a base model plus one expert per skill of its build plan
(`toy.FULL.skills`: rev, sort, up, next; add and sub are here for plan variants). This module owns
what a skill *is*: how an instance is drawn from a seeded `random.Random`, its prompt and its exact
answer. Training corpora and the lm-eval splits are both drawn from here, so the text format lives in
one place. Pure Python on purpose (no torch), so tests and the task builder can use it cheaply.

Every instance is one line: `prompt + answer + "\\n"`; the newline is the stop sequence.
"""

from __future__ import annotations

import random
import string
from dataclasses import dataclass
from typing import Callable

LETTERS = string.ascii_lowercase


@dataclass(frozen=True)
class Skill:
    """One skill: a name, a generator of (prompt, answer) pairs, and the longest answer it can give."""

    name: str
    draw: Callable[[random.Random], tuple[str, str]]
    max_answer_chars: int
    description: str
    draw_easy: Callable[[random.Random], tuple[str, str]] | None = None  # the base's narrow range


def _word(rng: random.Random, low: int, high: int) -> str:
    return "".join(rng.choice(LETTERS) for _ in range(rng.randint(low, high)))


def _add(rng: random.Random, top: int = 99) -> tuple[str, str]:
    a, b = rng.randint(0, top), rng.randint(0, top)
    return f"{a}+{b}=", str(a + b)


def _sub(rng: random.Random, top: int = 99) -> tuple[str, str]:
    a, b = rng.randint(0, top), rng.randint(0, top)
    a, b = max(a, b), min(a, b)
    return f"{a}-{b}=", str(a - b)


def _rev(rng: random.Random, longest: int = 7) -> tuple[str, str]:
    w = _word(rng, 3, longest)
    return f"rev {w}=", w[::-1]


def _sort(rng: random.Random, longest: int = 7) -> tuple[str, str]:
    w = _word(rng, 3, longest)
    return f"sort {w}=", "".join(sorted(w))


def _up(rng: random.Random) -> tuple[str, str]:
    w = _word(rng, 3, 7)
    return f"up {w}=", w.upper()


def _next(rng: random.Random) -> tuple[str, str]:
    w = _word(rng, 3, 7)
    return f"next {w}=", "".join(LETTERS[(LETTERS.index(c) + 1) % len(LETTERS)] for c in w)


SKILLS: dict[str, Skill] = {
    "add": Skill("add", _add, 3, "add two numbers of up to two digits: `23+45=` -> `68`",
                 lambda rng: _add(rng, 49)),
    "sub": Skill("sub", _sub, 2, "subtract a smaller number of up to two digits: `73-45=` -> `28`",
                 lambda rng: _sub(rng, 49)),
    "rev": Skill("rev", _rev, 7, "reverse a word of 3-7 letters: `rev abcd=` -> `dcba`",
                 lambda rng: _rev(rng, 4)),
    "sort": Skill("sort", _sort, 7, "sort the letters of a word: `sort dcba=` -> `abcd`",
                 lambda rng: _sort(rng, 4)),
    "up": Skill("up", _up, 7, "upper-case a word of 3-7 letters: `up abcd=` -> `ABCD`"),
    "next": Skill("next", _next, 7, "replace each letter by the next one (z -> a): `next abcz=` -> `bcda`"),
}


def drawer(name: str) -> Callable[[random.Random], tuple[str, str]]:
    """The generator of a corpus entry: `add` draws the full range, `add:easy` the narrow one
    (numbers up to 49, words up to 4 letters) that the base is trained on."""
    skill, _, variant = name.partition(":")
    if variant == "easy" and SKILLS[skill].draw_easy is not None:
        return SKILLS[skill].draw_easy
    if variant not in ("", "easy"):
        raise KeyError(name)
    return SKILLS[skill].draw


def normalize(prompt: str) -> str:
    """The identity of an instance for disjointness checks (whitespace and case folded)."""
    return " ".join(prompt.split()).lower()


def line(prompt: str, answer: str) -> str:
    """The training text of one instance."""
    return f"{prompt}{answer}\n"
