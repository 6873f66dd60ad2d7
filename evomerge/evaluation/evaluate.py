"""Evaluation of a live model with lm-eval, in memory, cheap enough to run every trial.

The search scores every candidate by writing merged weights into one resident model and evaluating
it. `LMEvalEvaluator` wraps that model in lm-eval's `HFLM` once (HFLM keeps a reference, it does not
copy, so in-place merges are seen) and builds each split's tasks once (`TaskManager.load`), then
calls `lm_eval.evaluator.evaluate` per trial: no per-call environment collection or template
re-rendering as `simple_evaluate` would do. A `limit` selects a seeded random subset of each task
(the same subset for the same seed, so trials are compared on the same items), never the first N.

Task `T` on split `S` is the lm-eval task `T_S` (`toy_rev` + `search` -> `toy_rev_search`).
Metrics come back keyed by that full task name; the filter suffix `,none` is dropped
(`exact_match`), other filters keep theirs (`exact_match,strict`); stderr entries are left out.
"""

from __future__ import annotations

import contextlib
import functools
import io
import logging
import os
import random
import sys
import time
from dataclasses import dataclass
from typing import Any, Protocol

from evomerge.errors import ConfigError


@dataclass(frozen=True)
class EvalResult:
    """Raw lm-eval metrics per task, the number of items scored per task, and the wall time.

    `items` (only when asked for, `per_item=True`): per task and metric, the score of every item in
    document order, for paired comparisons of two models on the same items."""

    metrics: dict[str, dict[str, float]]
    samples: dict[str, int]
    seconds: float
    items: dict[str, dict[str, list[float]]] | None = None


class Evaluator(Protocol):
    """Anything that scores a model on a split (the search only relies on this)."""

    def evaluate(self, model: Any, split: str, *, limit: int | None = None, seed: int = 0) -> EvalResult: ...


def task_name(task: str, split: str) -> str:
    """The lm-eval task of `task` on `split`."""
    return f"{task}_{split}"


def subset(size: int, limit: int | None, seed: int, task: str) -> list[int] | None:
    """Seeded random indices (sorted) of `limit` items out of `size`; None means all of them."""
    if limit is None or limit >= size:
        return None
    if limit <= 0:
        raise ConfigError(f"limit must be positive, got {limit}", where="evaluate", fix="use limit >= 1 or None")
    rng = random.Random(f"{seed}/{task}")
    return sorted(rng.sample(range(size), limit))


def _metric_rows(results: dict[str, dict], names: list[str]) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    for name in names:
        row: dict[str, float] = {}
        for key, value in results.get(name, {}).items():
            if isinstance(value, bool) or not isinstance(value, (int, float)) or "_stderr" in key:
                continue
            metric, _, filt = key.partition(",")
            row[metric if filt in ("", "none") else key] = float(value)
        out[name] = row
    return out


def _item_rows(logged: dict[str, list[dict]], names: list[str], metrics: dict) -> dict[str, dict[str, list[float]]]:
    """Per task and metric, every logged item's score in document order."""
    rows: dict[str, dict[str, list[float]]] = {}
    for name in names:
        docs = sorted(logged[name], key=lambda d: d["doc_id"])
        rows[name] = {m: [float(d[m]) for d in docs] for m in metrics[name] if docs and m in docs[0]}
    return rows


@contextlib.contextmanager
def _quiet_lm_eval():
    """lm-eval logs warnings per call (custom dataset hook, model passed as an object): hide them."""
    logger = logging.getLogger("lm_eval")
    previous = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(previous)


@functools.cache
def _quiet_hflm():
    """HFLM without its per-call progress bars (one per trial would flood the search's output)."""
    from lm_eval.models.huggingface import HFLM

    class QuietHFLM(HFLM):
        def generate_until(self, requests, disable_tqdm: bool = True):
            return super().generate_until(requests, disable_tqdm=True)

        def loglikelihood(self, requests, disable_tqdm: bool = True):
            return super().loglikelihood(requests, disable_tqdm=True)

        def loglikelihood_rolling(self, requests, disable_tqdm: bool = True):
            return super().loglikelihood_rolling(requests, disable_tqdm=True)

    return QuietHFLM


class LMEvalEvaluator:
    """lm-eval over a resident model: tasks built once per split, HFLM built once per model object."""

    def __init__(
        self,
        tokenizer: Any,
        tasks: list[str],
        include_path: str | None,
        batch_size: int = 64,
        device: str = "cpu",
        *,
        progress: bool = False,
    ):
        if not tasks:
            raise ConfigError("no tasks to evaluate", where="evaluator", fix="name at least one task")
        self.tokenizer = tokenizer
        self.tasks = list(tasks)
        self.include_path = str(include_path) if include_path else None
        self.batch_size = batch_size
        self.device = device
        self.progress = progress
        self._manager = None
        self._task_dicts: dict[str, Any] = {}
        self._sizes: dict[str, dict[str, int]] = {}
        self._lm = None
        self._lm_model_id: int | None = None

    # -- built once -------------------------------------------------------------------------------
    def _task_manager(self):
        if self._manager is None:
            from lm_eval.tasks import TaskManager

            if self.include_path and not os.path.isdir(self.include_path):
                raise ConfigError(
                    "task include path is not a folder", where=self.include_path, fix="point it at a folder of task YAML"
                )
            # Without built-in tasks indexing takes milliseconds instead of 10+ seconds.
            self._manager = TaskManager(
                include_path=self.include_path, include_defaults=self.include_path is None
            )
        return self._manager

    def tasks_for(self, split: str):
        """The lm-eval task dict of one split (built on first use, then reused)."""
        if split not in self._task_dicts:
            manager = self._task_manager()
            names = [task_name(t, split) for t in self.tasks]
            known = set(manager.all_tasks)
            missing = [n for n in names if n not in known]
            if missing:
                import difflib

                hint = difflib.get_close_matches(missing[0], sorted(known), n=1)
                raise ConfigError(
                    f"unknown lm-eval task {missing[0]!r}" + (f" (did you mean {hint[0]!r}?)" if hint else ""),
                    where=self.include_path or "lm-eval built-in tasks",
                    fix="tasks are named <task>_<split>; check the task list and the include path",
                )
            with _quiet_lm_eval():
                task_dict = manager.load(names)
            self._task_dicts[split] = task_dict
            self._sizes[split] = {n: len(self._docs(task_dict, n)) for n in names}
        return self._task_dicts[split]

    @staticmethod
    def _docs(task_dict, name: str):
        tasks = task_dict["tasks"] if isinstance(task_dict, dict) and "tasks" in task_dict else task_dict
        task = tasks[name]
        return task.eval_docs

    def _wrap(self, model):
        # The wrapper holds the model, so the id cannot be reused by another object while cached.
        if self._lm is None or self._lm_model_id != id(model):
            with _quiet_lm_eval():
                self._lm = _quiet_hflm()(
                    pretrained=model,
                    tokenizer=self.tokenizer,
                    batch_size=self.batch_size,
                    device=self.device,
                )
            self._lm_model_id = id(model)
        return self._lm

    # -- per call ---------------------------------------------------------------------------------
    def sizes(self, split: str) -> dict[str, int]:
        """Items per task of `split` (builds the split's tasks if needed)."""
        self.tasks_for(split)
        return dict(self._sizes[split])

    def evaluate(
        self, model: Any, split: str, *, limit: int | None = None, seed: int = 0, per_item: bool = False
    ) -> EvalResult:
        """Score `model` (evaluated as it is now) on every task of `split` (`per_item`: keep each
        item's score too, in `EvalResult.items`)."""
        from lm_eval import evaluator as lm_evaluator

        t0 = time.perf_counter()
        task_dict = self.tasks_for(split)
        lm = self._wrap(model)
        names = [task_name(t, split) for t in self.tasks]
        picks = {n: subset(self._sizes[split][n], limit, seed, n) for n in names}
        samples = {n: p for n, p in picks.items() if p is not None} or None
        if samples is not None:  # lm-eval takes indices for every task or none
            samples = {n: (p if p is not None else list(range(self._sizes[split][n]))) for n, p in picks.items()}
        # lm-eval draws one progress bar per task per call while building requests; a search would
        # print thousands. Unless `progress`, stderr is captured and replayed only if evaluation fails.
        captured = io.StringIO()
        redirect = contextlib.nullcontext() if self.progress else contextlib.redirect_stderr(captured)
        try:
            with _quiet_lm_eval(), redirect:
                out = lm_evaluator.evaluate(
                    lm, task_dict, samples=samples, bootstrap_iters=0, log_samples=per_item, verbosity="ERROR"
                )
        except BaseException:
            sys.stderr.write(captured.getvalue())
            raise
        metrics = _metric_rows(out["results"], names)
        counts = {n: (len(samples[n]) if samples else self._sizes[split][n]) for n in names}
        items = _item_rows(out["samples"], names, metrics) if per_item else None
        return EvalResult(metrics=metrics, samples=counts, seconds=time.perf_counter() - t0, items=items)
