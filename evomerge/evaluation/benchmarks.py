"""Benchmark lint: an objective that searches on a well-known public benchmark's items.

Why it exists: searching merge recipes on a public test set (mmlu, gsm8k, hellaswag, arc, truthfulqa,
winogrande, the Open LLM Leaderboard tasks) overfits that test set, and the parents may have seen its
items already; a number found that way says little about the merge. The search refuses such an
objective unless the user names a loud flag, and the report then marks the run. Matching is on lm-eval
task names (a task, a group, or a variant such as `mmlu_abstract_algebra` or `arc_challenge_chat`).
"""

from __future__ import annotations

import re

# family -> lm-eval task-name pattern
PUBLIC = {
    "MMLU": r"mmlu(_|$)|mmlu_pro|mmmlu|global_mmlu",
    "GSM8K": r"gsm8k|gsm_plus",
    "HellaSwag": r"hellaswag",
    "ARC": r"arc_(easy|challenge)|ai2_arc",
    "TruthfulQA": r"truthfulqa",
    "WinoGrande": r"winogrande",
    "Open LLM Leaderboard": r"leaderboard(_|$)|bbh(_|$)|gpqa|ifeval|musr|math_hard|minerva_math",
}
_COMPILED = {k: re.compile(rf"^(?:{v})") for k, v in PUBLIC.items()}


def public_benchmarks(tasks: list[str]) -> list[tuple[str, str]]:
    """(task, benchmark family) for every task name that is a public benchmark's."""
    out = []
    for task in tasks:
        name = task.lower()
        for family, pattern in _COMPILED.items():
            if pattern.search(name):
                out.append((task, family))
                break
    return out


__all__ = ["PUBLIC", "public_benchmarks"]
