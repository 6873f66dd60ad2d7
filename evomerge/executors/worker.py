"""One trial's work, in one process: merge a recipe into a resident model and evaluate it.

Why a plain class: the search runs it in-process (`executors/local.py`) or wraps it in a Ray actor
(`executors/ray_pool.py`); either way the expensive state (memory-mapped sources, the resident model,
the evaluator with its tasks built once) is created once per process and reused for every trial. Only
a `TrialJob` (a recipe as a plain dict, kilobytes) comes in and a `TrialOutcome` (metrics and timings)
goes out, so both are small and picklable. This module imports no Ray and no Optuna.

Contract (ARCHITECTURE.md, keep stable):
- `WorkerSpec` is picklable and fully describes how to build a worker.
- `Worker(spec).run(job) -> TrialOutcome` never raises: any exception becomes `outcome.error`.
- `Worker.setup()` builds the heavy state eagerly (idempotent; `run` calls it lazily).
"""

from __future__ import annotations

import copy
import importlib
import math
import os
import socket
import time
import traceback
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class WorkerSpec:
    """Everything a process needs to build a worker. Plain data: picklable, hashable.

    sources: every model path a recipe may name (as written in the recipe), base included.
    base: the checkpoint whose architecture and config the resident model takes (normally the base
      model, else the first source); its weights are overwritten by every merge.
    dtype: torch dtype name of the resident model ("float32", "bfloat16", ...).
    tokenizer: path of the tokenizer used by the evaluator (defaults to `base`).
    tasks: evaluator task names (without split suffix); include_path: a folder of local task YAML.
    splits, protocol: how the tasks' items are split and scored (`evaluation.protocol`, as dicts);
      None: the tasks are already split (`T_<split>`) and scored zero-shot.
    threads: torch intra-op threads for this process (None: leave torch's default).
    evaluator: optional "module:callable" import path; the callable takes this spec and returns an
      object with `evaluate(model, split, *, limit=None, seed=0) -> EvalResult`. None means
      `evomerge.evaluation.evaluate.LMEvalEvaluator`. Lets users (and tests) plug in their own scorer.
    """

    sources: tuple[str, ...]
    base: str
    dtype: str = "float32"
    tokenizer: str | None = None
    tasks: tuple[str, ...] = ()
    include_path: str | None = None
    device: str = "cpu"
    threads: int | None = None
    batch_size: int = 64
    evaluator: str | None = None
    options: tuple[tuple[str, Any], ...] = field(default=())
    splits: dict | None = field(default=None, hash=False)  # evaluation.protocol.SplitSpec as a dict
    protocol: dict | None = field(default=None, hash=False)  # evaluation.protocol.ScoringProtocol as a dict
    trust_remote_code: bool = False  # the user accepted sources with their own code (auto_map)
    verbose: bool = False  # show transformers', datasets' and lm-eval's own bars and warnings

    def option(self, name: str, default: Any = None) -> Any:
        return dict(self.options).get(name, default)


@dataclass(frozen=True)
class TrialJob:
    """One candidate to score: the Optuna trial number, the recipe (MergeRecipe as a plain dict),
    the split to evaluate on, an optional seeded subset size, and the subset seed."""

    number: int
    recipe: dict
    split: str
    limit: int | None = None
    seed: int = 0
    tag: str = ""  # free text the caller uses to route outcomes (e.g. "search", "select", "report:x")
    per_item: bool = False  # also return every item's score (the report's paired statistics)
    reference: tuple[str, ...] = ()  # split "membership": texts the model cannot have seen (the audit's reference)
    # only some items of the limit subset (search/fitness.py): a fidelity rung's ranks, or anchor picks
    ranks: tuple[int, int | None] | None = None
    picks: dict[str, tuple[int, ...]] | None = None


@dataclass(frozen=True)
class TrialOutcome:
    """What came back: raw metrics {task: {metric: value}} or an error string (never both)."""

    number: int
    metrics: dict[str, dict[str, float]] | None
    error: str | None
    timings: dict[str, float]
    node: str
    pid: int
    tag: str = ""
    samples: dict[str, int] | None = None
    items: dict[str, dict[str, list[float]]] | None = None  # per task and metric, each item (per_item jobs)
    truncated: dict[str, float] | None = None  # per generation task, the share that hit the length limit
    positions: dict[str, list[int]] | None = None  # per task, the limit-subset position of each item (ranks/picks)

    @property
    def ok(self) -> bool:
        return self.error is None and self.metrics is not None


def _load_callable(path: str):
    module, _, attr = path.partition(":")
    if not module or not attr:
        raise ValueError(f"evaluator {path!r} must look like 'package.module:callable'")
    return getattr(importlib.import_module(module), attr)


def _accepts(fn, name: str) -> bool:
    import inspect

    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    return name in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


def _finite_metrics(metrics: dict) -> dict[str, dict[str, float]]:
    """Keep numeric metrics as floats; lm-eval also returns strings and stderr entries."""
    out: dict[str, dict[str, float]] = {}
    for task, values in metrics.items():
        row: dict[str, float] = {}
        for name, value in values.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            row[str(name)] = float(value)
        out[str(task)] = row
    return out


class Worker:
    """Sources + resident model + evaluator, created once; `run(job)` per trial."""

    def __init__(self, spec: WorkerSpec):
        self.spec = spec
        self.sources = None
        self.model = None
        self.evaluator = None
        self.setup_seconds = 0.0
        self._setup_error: str | None = None
        self.moe_model = None  # the resident MoE (method: moe), rebuilt when a candidate's structure changes
        self._moe_key = None
        self._gates = None
        self._merged: tuple[dict, Any] | None = None  # the recipe the resident model holds now, and that model
        self.paths = None  # ResidentPath: a layer path's model over shared source layers (passthrough slices)

    # -- heavy state ------------------------------------------------------------------------------
    def setup(self) -> None:
        """Open sources, load the resident model and build the evaluator (once per process)."""
        if self.model is not None:
            return
        t0 = time.perf_counter()
        import torch
        from transformers import AutoModelForCausalLM

        from evomerge.engine.checkpoints import Sources

        spec = self.spec
        if spec.threads:
            torch.set_num_threads(int(spec.threads))
        if not spec.verbose:  # one clean display: the search's own progress, not each library's
            from transformers.utils import logging as hf_logging

            hf_logging.disable_progress_bar()
            hf_logging.set_verbosity_error()
        self.sources = Sources.open(list(spec.sources), device=spec.device)
        dtype = getattr(torch, spec.dtype)
        model = AutoModelForCausalLM.from_pretrained(spec.base, dtype=dtype,
                                                     trust_remote_code=spec.trust_remote_code)
        model.to(spec.device)
        model.eval()
        model.requires_grad_(False)  # inference only; merges write weights under no_grad
        if spec.evaluator:
            self.evaluator = _load_callable(spec.evaluator)(spec)
        else:
            from transformers import AutoTokenizer

            from evomerge.evaluation.evaluate import LMEvalEvaluator
            from evomerge.evaluation.protocol import ScoringProtocol, SplitSpec

            tokenizer = AutoTokenizer.from_pretrained(spec.tokenizer or spec.base,
                                                      trust_remote_code=spec.trust_remote_code)
            self.evaluator = LMEvalEvaluator(
                tokenizer,
                list(spec.tasks),
                spec.include_path,
                batch_size=spec.batch_size,
                device=spec.device,
                progress=spec.verbose,
                splits=SplitSpec.model_validate(spec.splits) if spec.splits else None,
                protocol=ScoringProtocol.model_validate(spec.protocol) if spec.protocol else None,
            )
        self.model = model
        self.setup_seconds = time.perf_counter() - t0

    def merge(self, recipe_dict: dict) -> Any:
        """Write the recipe's merged tensors into the resident model (no disk); returns the model to
        score: the resident dense model, for an MoE config the resident MoE, for a frankenmerge (a
        passthrough `slices:` recipe, a layer path) a model over shared resident layers
        (`resident_path.py`). The same recipe as the last one is not merged again (the model holds it)."""
        from evomerge.engine.layer_path import is_path_recipe
        from evomerge.moe.config import is_moe_config

        if self._merged is not None and self._merged[0] == recipe_dict:  # e.g. the next fidelity rung
            return self._merged[1]
        self._merged = None  # a failed merge leaves the resident weights half-written
        if is_moe_config(recipe_dict):
            model = self._build_moe(recipe_dict)
        elif is_path_recipe(recipe_dict):
            model = self._build_path(recipe_dict)
        else:
            from evomerge.engine.execution import merge_into
            from evomerge.engine.recipe import MergeRecipe
            from evomerge.engine.sinks import ModelSink

            from evomerge.engine.memory import give_back_freed

            recipe = MergeRecipe.model_validate(recipe_dict)
            merge_into(ModelSink(self.model), recipe, self.sources)
            give_back_freed()  # else each trial's working set stays in the threads' arenas (engine/memory.py)
            model = self.model
        self._merged = (copy.deepcopy(recipe_dict), model)
        return model

    def _build_moe(self, config_dict: dict) -> Any:
        """Build the MoE in memory: a resident transformers MoE model of the candidate's structure
        (made again only when the expert count, top-k or architecture changes), written in place."""
        from evomerge.moe.build import GateSource, ResidentMoESink, plan_moe, resident_model, write_moe
        from evomerge.moe.config import MoEConfig

        config = MoEConfig.model_validate(config_dict)
        p = plan_moe(config, self.sources)
        key = (p.layout.arch, len(config.experts), config.experts_per_token, p.dtype)
        if self._moe_key != key:
            self.moe_model = None  # free the previous structure before building the next
            self.moe_model = resident_model(p, dtype=self.spec.dtype, device=self.spec.device)
            self._moe_key = key
        if self._gates is None or self._gates.base != config.base_model:
            self._gates = GateSource(config.base_model, self.sources, config.base_model,
                                     trust_remote_code=self.spec.trust_remote_code, device=self.spec.device)
        write_moe(ResidentMoESink(self.moe_model), p, self.sources, self._gates)
        return self.moe_model

    def _build_path(self, recipe_dict: dict) -> Any:
        """A frankenmerge scored without copying layers: the sources' layers shared, one cache slot per
        position, only scaled projections materialised (executors/resident_path.py)."""
        from evomerge.engine.recipe import MergeRecipe
        from evomerge.executors.resident_path import ResidentPath

        if self.paths is None:
            self.paths = ResidentPath(self.sources, dtype=self.spec.dtype, device=self.spec.device,
                                      trust_remote_code=self.spec.trust_remote_code)
        return self.paths.build(MergeRecipe.model_validate(recipe_dict))

    def _membership(self, model, reference: tuple[str, ...]):
        """Min-K%++ of `model` on the report items and on the reference texts, and their AUROC."""
        from evomerge.evaluation.membership import min_k_pp
        from evomerge.evaluation.stats import auroc

        if not hasattr(self.evaluator, "item_texts"):
            raise ValueError("this evaluator cannot list its items (no item_texts): no membership audit")
        texts = self.evaluator.item_texts("report")
        tok = self.evaluator.tokenizer
        seen, fresh = min_k_pp(model, tok, texts), min_k_pp(model, tok, list(reference))
        return {"membership": {"auroc": auroc(seen, fresh), "report_items": float(len(seen)),
                               "reference_items": float(len(fresh))}}

    # -- per trial --------------------------------------------------------------------------------
    def run(self, job: TrialJob) -> TrialOutcome:
        """Merge and evaluate one candidate. Never raises: errors come back in `outcome.error`."""
        timings: dict[str, float] = {}
        t_start = time.perf_counter()
        metrics = None
        samples = None
        extras: dict[str, Any] = {}  # per item: items, truncated, positions
        error = None
        stage = "setup"
        try:
            if self.model is None:
                t0 = time.perf_counter()
                self.setup()
                timings["setup"] = time.perf_counter() - t0
            stage = "merge"
            t0 = time.perf_counter()
            model = self.merge(job.recipe)
            timings["merge"] = time.perf_counter() - t0
            stage = "evaluate"
            t0 = time.perf_counter()
            if job.split == "membership":  # the parent audit: Min-K%++ on the report items vs the reference
                metrics = self._membership(model, job.reference)
            else:
                metrics, samples, extras = self._evaluate(model, job)
            timings["eval"] = time.perf_counter() - t0
            bad = [
                f"{t}/{m}" for t, row in metrics.items() for m, v in row.items() if not math.isfinite(v)
            ]
            if bad:
                error = f"evaluate: non-finite metric {', '.join(bad)}"
                metrics = None
        except BaseException as exc:  # noqa: BLE001 - a trial must never take the search down
            if isinstance(exc, KeyboardInterrupt):
                raise
            tb = traceback.format_exc(limit=3)
            error = f"{stage}: {type(exc).__name__}: {exc}"
            if len(error) < 200:
                error = f"{error}\n{tb[-800:]}"
            metrics = None
        timings["total"] = time.perf_counter() - t_start
        kept = extras if metrics is not None else {}
        return TrialOutcome(
            number=job.number,
            metrics=metrics,
            error=error,
            timings=timings,
            node=socket.gethostname(),
            pid=os.getpid(),
            tag=job.tag,
            samples=samples,
            items=kept.get("items"),
            truncated=kept.get("truncated"),
            positions=kept.get("positions"),
        )

    def _evaluate(self, model, job: TrialJob) -> tuple[dict, dict, dict[str, Any]]:
        """Score the job's split (its limit and seed, and only the ranks or picks it names): the metrics,
        the items scored per task, and with per-item scores the result's items, truncation rates and
        positions."""
        per_item = job.per_item and _accepts(self.evaluator.evaluate, "per_item")  # plug-ins may not
        some = {k: v for k, v in (("ranks", job.ranks), ("picks", job.picks)) if v is not None}
        if some and not _accepts(self.evaluator.evaluate, next(iter(some))):
            raise ValueError(f"this evaluator cannot score a subset of items ({next(iter(some))}=): "
                             "use search.fitness: full")
        result = self.evaluator.evaluate(model, job.split, limit=job.limit, seed=job.seed,
                                         **({"per_item": True} if per_item else {}), **some)
        extras = {k: getattr(result, k, None) for k in ("items", "truncated", "positions")} if per_item else {}
        metrics = _finite_metrics(result.metrics)
        return metrics, dict(getattr(result, "samples", {}) or {}), extras
