"""Evaluation of a live model with lm-eval, in memory, cheap enough to run every trial.

The search scores every candidate by writing merged weights into one resident model and evaluating
it. `LMEvalEvaluator` wraps that model in lm-eval's `HFLM` once (HFLM keeps a reference, it does not
copy, so in-place merges are seen) and builds the tasks once (`TaskManager.load`), then calls
`lm_eval.evaluator.evaluate` per trial: no per-call environment collection or template re-rendering
as `simple_evaluate` would do. A `limit` selects a seeded random subset of a split's items of each task
(the same subset for the same seed, so trials are compared on the same items), never the first N.

Splits (`protocol.SplitSpec`): with `carve`, each task (any lm-eval task or group, not pre-split) is
loaded once and its evaluation documents are carved by content hash (`splits.py`); a split is a list
of document indices handed to lm-eval as `samples`. With `named`, task `T` on split `S` is the
lm-eval task `T_S` (`toy_rev` + `search` -> `toy_rev_search`). Either way `evaluate(model, split)`
takes the split's role (`search`, `select`, `report`) and returns metrics keyed by the objective's
lm-eval task name; the filter suffix `,none` is dropped (`exact_match`), other filters keep theirs
(`exact_match,strict`); stderr entries are left out.

The protocol (`protocol.ScoringProtocol`: few-shot count, chat template, system instruction, generation
settings, batch size) is applied to every call alike. Few-shot examples never come from the select or
report items: they are drawn from the task's own few-shot source with every evaluation item removed
from it, or, when that leaves too few, from a pool carved out of the search split (`splits.fewshot_pool`).
"""

from __future__ import annotations

import contextlib
import functools
import io
import logging
import os
import sys
import time
from dataclasses import dataclass
from typing import Any, Protocol

from evomerge.errors import ConfigError, user_errors
from evomerge.evaluation import splits as carving
from evomerge.evaluation.protocol import ScoringProtocol, SplitSpec
from evomerge.evaluation.results import item_rows, metric_rows, prompts
from evomerge.evaluation.subsets import chosen_positions, subset
from evomerge.evaluation.taskfiles import task_files


def task_manager(names: list[str], include_path: str | None, splits: SplitSpec, manager=None, *,
                 builtins: bool = True):
    """A TaskManager (reusing `manager`) that knows every lm-eval task in `names`: the include path alone
    first (milliseconds), and lm-eval's built-in tasks as well only when a name is not found there
    (indexing them takes seconds, so a name that no built-in task file even mentions is refused before:
    `taskindex.surely_unknown`). An unknown name is a ConfigError with the closest known one. With
    `builtins` false, only those quick checks: a name the built-in files mention is not looked up."""
    from lm_eval.tasks import TaskManager

    from evomerge.evaluation.taskindex import surely_unknown

    if include_path and not os.path.isdir(include_path):
        raise ConfigError("task include path is not a folder", where=include_path,
                          fix="point it at a folder of task YAML")
    if manager is None and include_path:
        manager = TaskManager(include_path=include_path, include_defaults=False)
    known = set(manager.all_tasks) if manager is not None else set()
    missing = [n for n in names if n not in known]
    if missing:
        unknown = surely_unknown(missing)
        if unknown is not None:
            raise _unknown_task(unknown[0], known, include_path, splits, unknown[1])
        if not builtins:
            return manager
        manager = TaskManager(include_path=include_path, include_defaults=True)
        known = set(manager.all_tasks)
    missing = [n for n in names if n not in known]
    if missing:
        raise _unknown_task(missing[0], known, include_path, splits)
    return manager


def _unknown_task(name: str, known: set[str], include_path: str | None, splits: SplitSpec,
                  hint: str | None = None) -> ConfigError:
    import difflib

    # a close name among the tasks at hand (the include path's) first, then lm-eval's own
    hint = next(iter(difflib.get_close_matches(name, sorted(known), n=1)), None) or hint
    form = "tasks are named <task>_<split> with splits given by name" if splits.mode == "named" else \
        "name an lm-eval task or group"
    if splits.mode == "carve" and f"{name}_search" in known:
        form = (f"{name!r} is already split into {name}_<split> tasks: add "
                "objective.splits: {search: search, select: select, report: report}")
    return ConfigError(f"unknown lm-eval task {name!r}" + (f" (did you mean {hint!r}?)" if hint else ""),
                       where=include_path or "lm-eval built-in tasks",
                       fix=f"{form}; check the task list and objective.tasks_dir")


@dataclass(frozen=True)
class EvalResult:
    """Raw lm-eval metrics per task, the number of items scored per task, and the wall time.

    `items` (only when asked for, `per_item=True`): per task and metric, the score of every item in
    document order, for paired comparisons of two models on the same items."""

    metrics: dict[str, dict[str, float]]
    samples: dict[str, int]
    seconds: float
    items: dict[str, dict[str, list[float]]] | None = None
    prompts: dict[str, dict[int, list[str]]] | None = None  # per task, what each item's prompt was (per_item)
    # per task, the position in the limit subset of each entry of `items` (per_item with ranks or picks)
    positions: dict[str, list[int]] | None = None
    truncated: dict[str, float] | None = None  # per generation task, share of generations at the length limit


class Evaluator(Protocol):
    """Anything that scores a model on a split (the search only relies on this)."""

    def evaluate(self, model: Any, split: str, *, limit: int | None = None, seed: int = 0) -> EvalResult: ...


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


def _check_gen_kwargs(gen_kwargs: dict) -> None:
    """Every generation setting is one lm-eval (`until`, `max_gen_toks`) or transformers' `generate`
    knows: a typo would otherwise fail every trial inside `generate`."""
    if not gen_kwargs:
        return
    import difflib

    from transformers import GenerationConfig

    known = (set(GenerationConfig().to_dict()) - {"transformers_version"}) | {"until", "max_gen_toks"}
    for key in gen_kwargs:
        if key not in known:
            hint = difflib.get_close_matches(key, sorted(known), n=1)
            raise ConfigError(
                f"unknown generation setting {key!r}" + (f" (did you mean {hint[0]!r}?)" if hint else ""),
                where=f"objective.protocol.gen_kwargs.{key}",
                fix="use lm-eval's until / max_gen_toks, or a transformers GenerationConfig field")


@contextlib.contextmanager
def _quiet_datasets(quiet: bool):
    """Hide the datasets library's "Generating test split" bars while tasks load (one per data file)."""
    if not quiet:
        yield
        return
    import datasets

    was = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if was:
            datasets.enable_progress_bars()


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


@dataclass
class _Leaf:
    """One lm-eval task (a group's member, or a task of its own) with its carved splits."""

    name: str
    task: Any
    carving: "carving.Carving"
    fewshot_source: str = "none"  # where few-shot examples come from: none / task / search-pool


@dataclass
class _View:
    """What one split role evaluates: a task dict and its leaves, and the objective's names in it."""

    task_dict: Any
    names: list[str]  # lm-eval names of the objective's tasks (T, or T_<split> when named)
    leaves: dict[str, _Leaf]


class LMEvalEvaluator:
    """lm-eval over a resident model: tasks built once, HFLM built once per model object.

    `splits` says how items are split (default: the `named` form, `T_<split>` tasks); `protocol` how
    every call is run (default: zero-shot, no chat template, `batch_size`)."""

    def __init__(
        self,
        tokenizer: Any,
        tasks: list[str],
        include_path: str | None,
        batch_size: int | str = 64,
        device: str = "cpu",
        *,
        progress: bool = False,
        splits: SplitSpec | None = None,
        protocol: ScoringProtocol | None = None,
    ):
        if not tasks:
            raise ConfigError("no tasks to evaluate", where="evaluator", fix="name at least one task")
        self.tokenizer = tokenizer
        self.tasks = list(tasks)
        self.include_path = str(include_path) if include_path else None
        self.splits = splits or SplitSpec(mode="named")
        self.protocol = protocol or ScoringProtocol(batch_size=batch_size)
        _check_gen_kwargs(self.protocol.gen_kwargs)
        if self.protocol.apply_chat_template and not getattr(tokenizer, "chat_template", None):
            raise ConfigError(
                f"apply_chat_template is true but the tokenizer {getattr(tokenizer, 'name_or_path', '')!r} "
                "has no chat template", where="objective.protocol.apply_chat_template",
                fix="set apply_chat_template: false, or name a tokenizer with a chat template (the space's "
                    "`tokenizer:`)")
        self.batch_size = self.protocol.batch_size
        self.device = device
        self.progress = progress
        self._manager = None
        self._views: dict[str, _View] = {}
        self._lm = None
        self._lm_model_id: int | None = None

    # -- built once -------------------------------------------------------------------------------
    def _task_manager(self, names: list[str]):
        """A TaskManager that knows `names` (see `task_manager`), kept for the next call."""
        self._manager = task_manager(names, self.include_path, self.splits, self._manager)
        return self._manager

    def view(self, split: str) -> _View:
        """The tasks and carved items of one split role (built on first use, then reused)."""
        if split not in carving.ROLES:
            raise ConfigError(f"unknown split {split!r}", where="evaluate", fix=f"use one of {', '.join(carving.ROLES)}")
        if split in self._views:
            return self._views[split]
        names = [self.splits.task_name(t, split) for t in self.tasks]
        if self.splits.mode == "carve":  # one load serves every split
            self._views.update(dict.fromkeys(carving.ROLES, self._load(names, None)))
        else:
            self._views[split] = self._load(names, split)
        return self._views[split]

    def _load(self, names: list[str], role: str | None) -> _View:
        manager = self._task_manager(names)
        # the task's data could not be read: a missing or malformed JSONL line, an empty file (datasets
        # raises a bare StopIteration), a hub data set not in the cache
        def unreadable():
            return user_errors(
                where=self.include_path or "lm-eval built-in tasks", what=f"lm-eval could not load task(s) "
                f"{', '.join(names)}: ", also=(OSError, ValueError, KeyError, StopIteration),
                fix="check the task's data files (one JSON object per line, at least one item; relative "
                    "data_files are read from the current folder); offline, a hub data set must already be in "
                    "the HF cache")

        with unreadable(), _quiet_lm_eval(), _quiet_datasets(not self.progress):
            task_dict = manager.load(names)
        tasks = task_dict["tasks"] if isinstance(task_dict, dict) and "tasks" in task_dict else task_dict
        leaves = {}
        for name, task in tasks.items():
            with unreadable():
                docs = list(task.eval_docs)
            if not docs:
                raise ConfigError(f"task {name!r} has no items", where=self.include_path or "lm-eval built-in tasks",
                                  fix="give the task's data file at least one item")
            keys = [self._key(task, d) for d in docs]
            cut = carving.named(keys, role) if role else carving.carve(
                keys, self.splits.fractions.model_dump(), self.splits.seed)
            leaves[name] = self._apply_protocol(_Leaf(name, task, cut), docs)
        return _View(task_dict, names, leaves)

    @staticmethod
    def _key(task, doc) -> str:
        """The normalized content of a document: what the model sees plus the target (and choices)."""
        choices = task.doc_to_choice(doc) if getattr(task.config, "doc_to_choice", None) is not None else None
        return carving.content_key(task.doc_to_text(doc), task.doc_to_target(doc), choices)

    def _apply_protocol(self, leaf: _Leaf, docs: list) -> _Leaf:
        """Generation settings and few-shot count on the task; the few-shot pool cleaned of evaluation items."""
        p, task = self.protocol, leaf.task
        if p.gen_kwargs and task.config.output_type == "generate_until":
            task.set_config(key="generation_kwargs", value=dict(p.gen_kwargs), update=True)
        task.set_config(key="num_fewshot", value=p.num_fewshot)
        if p.num_fewshot == 0:
            return leaf
        eval_keys = set(leaf.carving.keys)
        try:
            with _quiet_lm_eval():
                source = list(task.fewshot_docs() or [])
        except Exception:  # noqa: BLE001 - a task without any few-shot source
            source = []
        pool = [d for d in source if self._key(task, d) not in eval_keys]
        if len(pool) >= p.num_fewshot:
            leaf.fewshot_source = "task"
        else:
            search = len(leaf.carving.indices["search"])
            size = min(max(4 * p.num_fewshot, 8), search // 2)
            if size < p.num_fewshot:
                raise ConfigError(
                    f"task {leaf.name!r} has no few-shot source of its own and its search split ({search} items) "
                    f"is too small to carve {p.num_fewshot} few-shot examples from",
                    where="objective.protocol.num_fewshot", fix="lower num_fewshot, or give the task a fewshot_split")
            leaf.carving = carving.fewshot_pool(leaf.carving, size, self.splits.seed)
            pool = [docs[i] for i in leaf.carving.fewshot]
            leaf.fewshot_source = "search-pool"
        task.sampler.replace_df(pool)
        return leaf

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

    # -- queries ----------------------------------------------------------------------------------
    def sizes(self, split: str) -> dict[str, int]:
        """Items per lm-eval task (leaf) of `split` (builds the tasks if needed)."""
        return {n: len(leaf.carving.indices[split]) for n, leaf in self.view(split).leaves.items()}

    def higher_is_better(self, split: str = "search") -> dict[str, dict[str, bool]]:
        """Per lm-eval task (leaf) of `split`: for each metric, whether higher is better (the task's word)."""
        out = {}
        for name, leaf in self.view(split).leaves.items():
            try:
                out[name] = {k: bool(v) for k, v in (leaf.task.higher_is_better() or {}).items()}
            except Exception:  # noqa: BLE001 - a task without the declaration: nothing to say
                out[name] = {}
        return out

    def mean_metrics(self, split: str = "search") -> dict[str, dict[str, bool] | None]:
        """Per objective task name of `split`: None for a group, else for each metric whether lm-eval
        aggregates it as a mean over items (what an estimate from some of the items needs)."""
        from lm_eval.api.metrics import mean

        view = self.view(split)
        out: dict[str, dict[str, bool] | None] = {}
        for name in view.names:
            leaf = view.leaves.get(name)
            out[name] = None if leaf is None else {k: v is mean for k, v in (leaf.task.aggregation() or {}).items()}
        return out

    def audit_items(self) -> list:
        """Every item of every split role as `overlap.Item` (task leaf, role, document index, content)."""
        from evomerge.evaluation.overlap import Item

        out = []
        for role in carving.ROLES:
            for name, leaf in self.view(role).leaves.items():
                keys = leaf.carving.keys
                out += [Item(name, role, int(i), keys[i]) for i in leaf.carving.indices[role]]
        return out

    def item_texts(self, split: str) -> list[str]:
        """Every item of split role `split` as raw text, as a model would read it in training: the
        prompt, the task's target delimiter, the target (for the membership audit)."""
        out = []
        for leaf in self.view(split).leaves.values():
            task = leaf.task
            docs = list(task.eval_docs)
            delim = getattr(task.config, "target_delimiter", " ")
            mc = getattr(task.config, "doc_to_choice", None) is not None
            for i in leaf.carving.indices[split]:
                doc = docs[i]
                target = task.doc_to_target(doc)
                if mc and isinstance(target, int) and not isinstance(target, bool):
                    choices = task.doc_to_choice(doc)
                    target = choices[target] if 0 <= target < len(choices) else target
                if isinstance(target, (list, tuple)):
                    target = target[0] if target else ""
                out.append(f"{task.doc_to_text(doc)}{delim}{target}")
        return out

    def record(self) -> dict:
        """What the items of this objective are: per lm-eval task and split, the item count and a hash
        of the items, where few-shot examples come from, and hashes of the task files."""
        out: dict[str, Any] = {}
        for role in carving.ROLES:
            for name, leaf in self.view(role).leaves.items():
                if name not in out:  # a carved task is a leaf of every split: hash its files once
                    out[name] = {"splits": {}, "fewshot_source": leaf.fewshot_source,
                                 "files": task_files(self._manager, name, leaf.task)}
                row = out[name]
                row["splits"][role] = {"items": len(leaf.carving.indices[role]), "ids": leaf.carving.ids_hash(role)}
                if leaf.carving.fewshot:
                    row["splits"]["fewshot_pool"] = {"items": len(leaf.carving.fewshot),
                                                     "ids": leaf.carving.ids_hash("fewshot")}
        return out

    # -- per call ---------------------------------------------------------------------------------
    def evaluate(
        self, model: Any, split: str, *, limit: int | None = None, seed: int = 0, per_item: bool = False,
        ranks: tuple[int, int | None] | None = None, picks: dict[str, list[int]] | None = None,
    ) -> EvalResult:
        """Score `model` (evaluated as it is now) on every task of split role `split` (`per_item`:
        keep each item's score too, in `EvalResult.items`). `ranks` or `picks` score only some items
        of the limit subset (`chosen_positions`); `EvalResult.positions` then says which."""
        from lm_eval import evaluator as lm_evaluator

        t0 = time.perf_counter()
        view = self.view(split)
        lm = self._wrap(model)
        samples = {}
        positions: dict[str, list[int]] = {}
        for name, leaf in view.leaves.items():
            idx = leaf.carving.indices[split]
            pick = subset(len(idx), limit, seed, name)
            pool = [idx[i] for i in pick] if pick is not None else sorted(idx)
            chosen = chosen_positions(len(pool), name, seed, ranks, picks)
            if chosen is not None:
                positions[name] = chosen  # pool is sorted, so the scored documents keep this order
                pool = [pool[j] for j in chosen]
            samples[name] = pool
            if self.protocol.num_fewshot:
                leaf.task.set_fewshot_seed(seed=1234)  # the same examples for every model, every call
        if not all(samples.values()):  # nothing picked for a task: lm-eval would score all of it
            empty = next(n for n, v in samples.items() if not v)
            raise ConfigError(f"no items of task {empty!r} to score", where="evaluate",
                              fix="pick at least one item per task")
        p = self.protocol
        # lm-eval draws one progress bar per task per call while building requests; a search would
        # print thousands. Unless `progress`, stderr is captured and replayed only if evaluation fails.
        captured = io.StringIO()
        redirect = contextlib.nullcontext() if self.progress else contextlib.redirect_stderr(captured)
        try:
            with _quiet_lm_eval(), redirect:
                out = lm_evaluator.evaluate(
                    lm, view.task_dict, samples=samples, bootstrap_iters=0, log_samples=per_item, verbosity="ERROR",
                    system_instruction=p.system_instruction, apply_chat_template=p.apply_chat_template,
                    fewshot_as_multiturn=p.fewshot_as_multiturn,
                )
        except BaseException:
            sys.stderr.write(captured.getvalue())
            raise
        metrics = metric_rows(out["results"], view.names)
        counts = {n: len(s) for n, s in samples.items()}
        items = item_rows(out["samples"], list(view.leaves), metric_rows(out["results"], list(view.leaves))) \
            if per_item else None
        return EvalResult(metrics=metrics, samples=counts, seconds=time.perf_counter() - t0, items=items,
                          prompts=prompts(out["samples"]) if per_item else None,
                          truncated=self._truncation(out["samples"], view) if per_item else None,
                          positions=positions if per_item and positions else None)

    def _truncation(self, logged: dict[str, list[dict]], view: _View) -> dict[str, float]:
        """Per generation task, the share of generations that reached the token limit (max_gen_toks):
        a model cut off there is scored on an unfinished answer."""
        out = {}
        for name, docs in logged.items():
            leaf = view.leaves.get(name)
            if leaf is None or leaf.task.config.output_type != "generate_until" or not docs:
                continue
            limit = int((leaf.task.config.generation_kwargs or {}).get("max_gen_toks") or 256)  # HFLM's default
            hit = 0
            for d in docs:
                resp = d.get("resps") or [[""]]
                text = resp[0][0] if isinstance(resp[0], (list, tuple)) else resp[0]
                hit += len(self.tokenizer(str(text), add_special_tokens=False)["input_ids"]) >= limit
            out[name] = hit / len(docs)
        return out


