"""The evaluation protocol and the split rule: how every model of a run is scored, frozen for the run.

Why it exists: a merge score is only worth its protocol. Every trial, baseline and parent of one run
is scored with the same few-shot count, chat template, system instruction, generation settings and
batch size, on splits carved the same way; `record()` writes all of it (plus the lm-eval version and
hashes of the task files and items) into the run record, and a resumed run that differs in any of it
is refused with the names of what changed (`differences`).

Both models are pydantic with `extra="forbid"`, so a typo in the space file fails loudly; the search
space (`search/space.py`, read by `search/spacefile.py`) embeds them under `objective.splits` and
`objective.protocol`.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from evomerge.evaluation.splits import ROLES


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Carve(_Strict):
    """The share of each task's items that goes to each split."""

    search: float = Field(0.6, gt=0, lt=1)
    select: float = Field(0.2, gt=0, lt=1)
    report: float = Field(0.2, gt=0, lt=1)

    @model_validator(mode="after")
    def _sums_to_one(self) -> "Carve":
        total = self.search + self.select + self.report
        if abs(total - 1.0) > 1e-6:
            raise ValueError(f"the split fractions sum to {total:g}, not 1 (search {self.search:g}, "
                             f"select {self.select:g}, report {self.report:g})")
        return self


class SplitSpec(_Strict):
    """How a task's items are split.

    `carve` (the default): evomerge carves each task's evaluation documents by content hash
    (`evaluation/splits.py`) with `fractions` and `seed`. `named`: the tasks are already split, and
    task `T` on split role `r` is the lm-eval task `T_<names[r]>` (the toy family's form). `whole`
    (`evomerge eval --tasks`): no split, every role is all of the task's evaluation items."""

    mode: Literal["carve", "named", "whole"] = "carve"
    fractions: Carve = Carve()
    seed: int = 0
    names: dict[str, str] = Field(default_factory=lambda: {r: r for r in ROLES})

    def task_name(self, task: str, role: str) -> str:
        """The lm-eval task that holds `task`'s items of split `role`."""
        return f"{task}_{self.names[role]}" if self.mode == "named" else task


class ScoringProtocol(_Strict):
    """Applied identically to every trial, baseline and parent of a run."""

    num_fewshot: int = Field(0, ge=0)
    apply_chat_template: bool | str = False  # true, or the name of one of the tokenizer's templates
    fewshot_as_multiturn: bool = False
    system_instruction: str | None = None
    gen_kwargs: dict[str, Any] = Field(default_factory=dict)  # merged into generate_until tasks' settings
    batch_size: int | Literal["auto"] = 64

    @model_validator(mode="after")
    def _consistent(self) -> "ScoringProtocol":
        if self.fewshot_as_multiturn and not self.apply_chat_template:
            raise ValueError("fewshot_as_multiturn needs apply_chat_template: true")
        if isinstance(self.batch_size, int) and self.batch_size < 1:
            raise ValueError(f"batch_size must be at least 1 or 'auto', got {self.batch_size}")
        bad = [k for k in self.gen_kwargs if not isinstance(k, str)]
        if bad:
            raise ValueError(f"gen_kwargs keys must be names, got {bad[0]!r}")
        for key, value in self.gen_kwargs.items():
            _check_gen_value(key, value)
        return self


# the value each common generation setting takes (checked where the protocol is read, so that a wrong
# type fails before the first trial, not inside lm-eval's or transformers' generate)
_WHOLE = ("max_gen_toks", "max_new_tokens", "min_new_tokens", "num_beams", "top_k", "no_repeat_ngram_size")
_NUMBER = ("temperature", "top_p", "repetition_penalty", "length_penalty")


def _check_gen_value(key: str, value: Any) -> None:
    def wrong(want: str) -> ValueError:
        return ValueError(f"gen_kwargs.{key} must be {want}, got {value!r}")

    if key in _WHOLE and (isinstance(value, bool) or not isinstance(value, int) or value < (0 if key == "top_k" else 1)):
        raise wrong("a whole number" + (" >= 0" if key == "top_k" else " >= 1"))
    if key in _NUMBER and (isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0):
        raise wrong("a number >= 0")
    if key == "do_sample" and not isinstance(value, bool):
        raise wrong("true or false")
    if key == "until" and not (isinstance(value, str) or (isinstance(value, list) and value
                                                          and all(isinstance(v, str) for v in value))):
        raise wrong("a string or a list of strings")


def differences(stored: dict, current: dict, prefix: str = "") -> list[str]:
    """Dotted names of every entry that differs between two protocol records, with both values."""
    out = []
    for key in sorted(set(stored) | set(current)):
        a, b = stored.get(key, "<absent>"), current.get(key, "<absent>")
        name = f"{prefix}{key}"
        if isinstance(a, dict) and isinstance(b, dict):
            out += differences(a, b, name + ".")
        elif a != b:
            out.append(f"{name}: {_short(a)} -> {_short(b)}")
    return out


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
