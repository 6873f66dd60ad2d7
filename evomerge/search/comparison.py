"""`evomerge eval`: score merged models and their parents under one protocol, with intervals and paired tests.

Why it exists: after a merge people score it beside its parents (the AutoEval notebooks). Done by hand,
the models often get different settings (one published "+10 points" vanished once the generation
length was the same for all). Here every model is scored by the same evaluator on the same items:
either a search space's objective (its tasks, weights, splits and protocol; by default its report
split) or plain lm-eval tasks (`--tasks`, whole tasks). The result is a models x tasks table with each
mixture's bootstrap 95% interval and each model's paired difference from the first model (interval,
paired-bootstrap p, McNemar for 0/1 metrics), printed and written as markdown, JSON and a bar chart.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from evomerge.errors import ConfigError
from evomerge.search.progress import Progress


def _objective(space_path, tasks, tasks_dir, metric):
    from evomerge.search.space import Objective, Task
    from evomerge.search.spacefile import load_space

    if space_path:
        if tasks:
            raise ConfigError("give either --space or --tasks, not both", where="--tasks",
                              fix="--space scores the space's objective; --tasks scores plain lm-eval tasks")
        space = load_space(space_path)
        return space.objective, space
    if not tasks:
        raise ConfigError("nothing to score", where="evomerge eval", fix="give --space SPACE or --tasks TASK [TASK ...]")
    from evomerge.evaluation.protocol import SplitSpec

    entries = []
    for t in tasks:
        name, _, m = t.partition(":")
        entries.append(Task(task=name, metric=m or metric))
    tdir = str(Path(tasks_dir).resolve()) if tasks_dir else None
    if tdir and not Path(tdir).is_dir():
        raise ConfigError(f"task folder {tasks_dir!r} not found", where="--tasks-dir", fix="give a folder of lm-eval task YAML")
    return Objective(tasks=tuple(entries), tasks_dir=tdir, splits=SplitSpec(mode="whole")), None


def _labels(models: list[str]) -> list[str]:
    out: list[str] = []
    for m in models:
        name = Path(m.rstrip("/")).name or m
        label, i = name, 2
        while label in out:
            label, i = f"{name}#{i}", i + 1
        out.append(label)
    return out


def eval_models(models: list[str], *, space: str | None = None, tasks: list[str] | None = None,
                tasks_dir: str | None = None, metric: str = "exact_match", split: str = "report",
                limit: int | None = None, out: str | os.PathLike | None = None, device: str = "cpu",
                dtype: str = "float32", trust_remote_code: bool = False, log=print, progress: bool = True) -> dict:
    """Score every model on the same items; returns (and writes under `out`) the table as data."""
    from evomerge.engine.checkpoints import Sources
    from evomerge.engine.execution import resolve_device
    from evomerge.evaluation.splits import ROLES

    if not models:
        raise ConfigError("no models given", where="evomerge eval", fix="name one or more model folders")
    if split not in ROLES:
        raise ConfigError(f"unknown split {split!r}", where="--split", fix=f"use one of {', '.join(ROLES)}")
    if limit is not None and limit < 1:
        raise ConfigError(f"--limit must be at least 1, got {limit}", where="--limit", fix="omit it for every item")
    objective, sp = _objective(space, tasks, tasks_dir, metric)
    from evomerge.evaluation.evaluate import task_manager

    task_manager([objective.splits.task_name(t.task, split) for t in objective.tasks], objective.tasks_dir,
                 objective.splits, builtins=False)  # a typo is refused before any model is opened
    if dtype not in ("float32", "bfloat16", "float16"):
        raise ConfigError(f"unknown dtype {dtype!r}", where="--dtype", fix="use float32, bfloat16 or float16")
    device = resolve_device(device)
    sources = Sources.open({m: f"models[{i}]" for i, m in enumerate(models)})
    try:
        sources.check_custom_code(allowed=trust_remote_code, flag="--trust-remote-code")
    finally:
        sources.close()
    out_dir = Path(out) if out else None
    if out_dir is not None:  # before any model is scored
        from evomerge.engine.output import check_creatable

        check_creatable(out_dir, "--out", "choose another --out")
    comparison = _Comparison(objective, sp, split, limit, device, dtype, trust_remote_code,
                             where="--tasks" if tasks else f"{space}: objective.tasks", log=log, progress=progress)
    result = comparison.run(models)
    text = markdown(result)
    log(text)
    if out_dir is not None:
        _write(out_dir, result, text, log)
    return result


@dataclass
class _Comparison:
    """One `evomerge eval`: the objective and how every model is loaded and scored on it."""

    objective: Any
    space: Any  # the SearchSpace with --space, else None
    split: str
    limit: int | None
    device: str
    dtype: str
    trust_remote_code: bool
    where: str  # what a metric the tasks do not report points at
    log: Callable = print
    progress: bool = True  # one bar over the models (done / total, ETA)

    def run(self, models: list[str]) -> dict:
        """Every model scored (per item) on the same items; intervals and paired tests against the first."""
        from evomerge.evaluation import stats
        from evomerge.search.score import weights as mixture_weights

        objective = self.objective
        evaluator = self._evaluator(models[0])
        labels = _labels(models)
        w = mixture_weights(objective)
        rows: dict[str, Any] = {}
        items: dict[str, dict] = {}
        bar = Progress(self.progress, len(models), 0, desc="eval", unit="model")
        try:
            for label, path in zip(labels, models):
                bar.name(label)
                rows[label], items[label] = self._score(evaluator, label, path)
                rows[label]["mixture"] = stats.mixture_ci(items[label], w).as_dict()
                bar.step()
        finally:
            bar.close()
        first = labels[0]
        paired = {}
        for label in labels[1:]:
            paired[label] = stats.paired(items[label], items[first], w).as_dict()
        return {"split": self.split if objective.splits.mode != "whole" else "all items", "reference": first,
                "objective": [{"task": t.task, "metric": t.metric, "weight": t.weight, "direction": t.direction}
                              for t in objective.tasks],
                "protocol": objective.protocol.model_dump(mode="json"), "models": rows, "paired_vs_first": paired,
                "method": f"stratified bootstrap, {stats.BOOTSTRAP_RESAMPLES} resamples, 95%; McNemar exact for 0/1"}

    def _evaluator(self, first_model: str):
        """lm-eval over the objective's tasks, with the space's tokenizer (else the first model's)."""
        from transformers import AutoTokenizer
        from transformers.utils import logging as hf_logging

        from evomerge.evaluation.evaluate import LMEvalEvaluator

        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()
        sp, objective = self.space, self.objective
        tok_dir = sp.tokenizer if sp is not None and sp.tokenizer else first_model
        tokenizer = AutoTokenizer.from_pretrained(tok_dir, trust_remote_code=self.trust_remote_code)
        return LMEvalEvaluator(tokenizer, [t.task for t in objective.tasks], objective.tasks_dir, device=self.device,
                               splits=objective.splits, protocol=objective.protocol)

    def _score(self, evaluator, label: str, path: str) -> tuple[dict, dict]:
        """One model loaded and scored: its row (path, task values, truncation, item counts) and its items."""
        import torch
        from transformers import AutoModelForCausalLM

        from evomerge.search.score import ScoreError, task_items, task_values

        objective, split = self.objective, self.split
        self.log(f"evomerge: scoring {label} on the {split!r} split" if objective.splits.mode != "whole"
                 else f"evomerge: scoring {label}")
        model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, self.dtype),
                                                     trust_remote_code=self.trust_remote_code).to(self.device).eval()
        try:
            res = evaluator.evaluate(model, split, limit=self.limit, seed=self.space.budget.seed if self.space else 0,
                                     per_item=True)
            values = task_values(res.metrics, objective, split)
            items = task_items(res.items, objective, split)
        except ScoreError as exc:
            raise ConfigError(str(exc), where=self.where,
                              fix="name a metric the task reports (task:metric, or --metric)") from None
        return {"model": str(path), "tasks": values, "mixture": None, "truncated": res.truncated,
                "items": res.samples}, items


def _write(out_dir: Path, result: dict, text: str, log: Callable) -> None:
    """eval.md, eval.json (models in the order given) and eval.png (the mixtures with their intervals)."""
    import io

    import matplotlib

    from evomerge.engine.output import atomic_write
    from evomerge.search.plots import score_chart

    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write(out_dir / "eval.md", text)
    atomic_write(out_dir / "eval.json", json.dumps(result, indent=1) + "\n")  # models in the order given
    rows = result["models"]
    chart = {"models": {k: {"report": v["mixture"]} for k, v in rows.items()}, "winner": result["reference"]}
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig = score_chart(chart, f"{result['split']}: mixture with 95% intervals (first model green)")
    fig.set_size_inches(8, 2 + 0.5 * len(rows))
    fig.tight_layout()  # again at the final size, so the title and the axis label stay inside
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    plt.close(fig)
    atomic_write(out_dir / "eval.png", buf.getvalue())
    log(f"wrote {out_dir / 'eval.md'}, eval.json, eval.png")


def markdown(result: dict) -> str:
    tasks = [t["task"] for t in result["objective"]]
    first = result["reference"]
    lines = [f"| model | {' | '.join(tasks)} | mixture | 95% interval | minus {first} | 95% interval | p (paired) | "
             "p (McNemar) |", "|---|" + "---|" * (len(tasks) + 6)]
    for label, row in result["models"].items():
        m = row["mixture"]
        p = result["paired_vs_first"].get(label)
        d = (p or {}).get("delta") or {}

        def f(x):
            return "-" if x is None else f"{x:.3f}"

        def pv(x):
            return "-" if x is None else ("<0.001" if x < 0.001 else f"{x:.3f}")

        lines.append(f"| {label} | " + " | ".join(f(row["tasks"][t]) for t in tasks)
                     + f" | {f(m['point'])} | {f(m['low'])} to {f(m['high'])} | {f(d.get('point'))} | "
                     + (f"{f(d['low'])} to {f(d['high'])}" if d else "-")
                     + f" | {pv((p or {}).get('p_bootstrap'))} | {pv((p or {}).get('p_mcnemar'))} |")
    lines.append("")
    lines.append(f"Scored on {result['split']}; intervals: {result['method']}; protocol {result['protocol']}.")
    return "\n".join(lines) + "\n"


__all__ = ["eval_models", "markdown"]
