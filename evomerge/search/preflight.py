"""The pre-flight: every check that needs no search, before anything is written.

Why it exists: mistakes fail before the study exists, so that the corrected command just works. The
objective is not a public benchmark's test set (unless allowed); the sources agree and every method's
baseline recipe plans; every task resolves and every split is non-empty and large enough for the search
limit; each metric is optimised the way its task says; no item occurs in two splits or two tasks (the
overlap audit, unless allowed); and a one-item dry run on the first model finds every metric. Errors
name the field of the space file. `run.run_search` runs it first; `evomerge validate SPACE` is
`validate_space` (the pre-flight, then the objective as text).
"""

from __future__ import annotations

from pathlib import Path

from evomerge.errors import ConfigError, user_errors
from evomerge.search.jobs import worker_spec
from evomerge.search.memory import SearchMemory, check_fits, memory_lines, search_memory
from evomerge.search.options import RunOptions
from evomerge.search.progress import Progress
from evomerge.search.space import SearchSpace


def preflight(space: SearchSpace, options: RunOptions | None = None, *, check_memory: bool = True):
    """Every check that needs no search (see the module's docstring), with `options`' permissions and
    worker settings; `check_memory`: refuse a search whose memory plan (search/memory.py) does not fit
    this machine, before any model is loaded. Returns the set-up worker (its model and tasks are built;
    the in-process executor adopts it) and the protocol record (with the audit's findings)."""
    from evomerge.executors.worker import Worker
    from evomerge.search.record import protocol_record

    opts = options or RunOptions()
    src = space.path or "space"
    bar = Progress(opts.progress, len(STEPS), 0, desc="pre-flight", unit="step")
    try:
        bar.name(STEPS[0])
        audit: dict = {"public_benchmarks": _public_benchmarks(space, opts.allow_public_benchmark, src),
                       "overlap": None}
        memory = _check_sources(space, opts, src)
        if check_memory and not opts.ray_address:  # a cluster's workers are not on this machine
            check_fits(memory, where=f"{src} with --workers {opts.workers} --device {opts.device}")
        bar.step(STEPS[1])
        worker = Worker(worker_spec(space, evaluator=opts.evaluator, threads=opts.threads_per_worker,
                                    trust_remote_code=opts.trust_remote_code, verbose=opts.verbose,
                                    # Ray workers build their own; the driver's check model stays on the CPU
                                    device=opts.device if opts.in_process else "cpu"))
        audit["overlap"] = _check_evaluator(space, worker, opts, src, bar)
        record = protocol_record(space, worker.evaluator)
        bar.step()
    finally:
        bar.close()
    record["audit"] = audit
    return worker, record


STEPS = ("sources", "models and tasks", "splits and metrics", "overlap audit", "one-item dry run")


def _public_benchmarks(space: SearchSpace, allowed: bool, src: str) -> list[list[str]]:
    """The objective's tasks that are public benchmarks, as [task, family]: refused unless `allowed`."""
    from evomerge.evaluation.benchmarks import public_benchmarks

    public = public_benchmarks([t.task for t in space.objective.tasks])
    if public and not allowed:
        i = next(i for i, t in enumerate(space.objective.tasks) if t.task == public[0][0])
        listing = ", ".join(f"{t} ({fam})" for t, fam in public)
        raise ConfigError(f"the objective searches on public benchmark test sets: {listing}; a recipe tuned on them "
                          "overfits them, and the parents may have seen their items", where=f"{src}: objective.tasks[{i}].task",
                          fix="search on held-out data of your own (any lm-eval task over your JSONL), or pass "
                              "--allow-public-benchmark-contamination (the report marks the run)")
    return [list(p) for p in public]


def _check_sources(space: SearchSpace, opts: RunOptions, src: str) -> SearchMemory:
    """The sources agree (architecture, shapes, vocabulary; custom code only if trusted) and every
    method's baseline recipe plans against them; returns the search's memory plan from those plans."""
    from evomerge.engine.checkpoints import Sources
    from evomerge.engine.plan import plan
    from evomerge.moe.build import plan_moe
    from evomerge.moe.config import MoEConfig
    from evomerge.search.suggest import baseline_params, build_recipe

    fields: dict[str, str] = {}
    for i, m in enumerate(space.models):
        fields.setdefault(m.path, f"{src}: models[{i}]")
    if space.base is not None:
        fields.setdefault(space.base.path, f"{src}: base_model")
    sources = Sources.open(fields)
    plans = []
    try:
        sources.check_compatible()
        sources.check_custom_code(allowed=opts.trust_remote_code, flag="--trust-remote-code")
        for label, params in baseline_params(space):
            recipe = build_recipe(space, params)
            if isinstance(recipe, MoEConfig):
                try:
                    plans.append(plan_moe(recipe, sources, source=f"{src} ({label})"))
                except ConfigError as exc:
                    raise ConfigError(exc.what, where=exc.where if exc.where and exc.where.startswith(src)
                                      else f"{src}: parameters.moe ({label}: {exc.where})", fix=exc.fix) from None
            else:
                plans.append(plan(recipe, sources))
        return search_memory(plans, sources, dtype=space.score_dtype, workers=opts.workers, device=opts.device,
                             source_bytes=_source_bytes(sources))
    finally:
        sources.close()


def search_plan(space: SearchSpace, options: RunOptions | None = None) -> SearchMemory:
    """The memory plan of searching `space` with `options`' workers and device (reads headers only)."""
    return _check_sources(space, options or RunOptions(), space.path or "space")


def _source_bytes(sources) -> int:
    """The size of the sources' safetensors files (what the workers map and share)."""
    folders = {Path(loc.folder) for loc in sources.located.values() if getattr(loc, "folder", None)}
    return sum(f.stat().st_size for d in folders if d.is_dir() for f in d.glob("*.safetensors"))


def _check_evaluator(space: SearchSpace, worker, opts: RunOptions, src: str, bar: Progress) -> dict | None:
    """Set the worker up (model and tasks), then what its evaluator can tell: split sizes, metric
    directions, tasks an item estimate can use, the overlap audit (returned, with evidence on), and a
    one-item dry run."""
    from evomerge.search.fitness import check_tasks
    from evomerge.search.parents import read_reference_items

    overlap = None
    try:
        worker.setup()
        ev = worker.evaluator
        bar.step(STEPS[2])
        if hasattr(ev, "sizes"):
            _check_sizes(space, ev, src)
        if hasattr(ev, "higher_is_better"):
            _check_directions(space, ev.higher_is_better("search"), src)
        check_tasks(ev, space.objective, space.budget.fitness_mode, src)
        bar.step(STEPS[3])
        if opts.evidence and hasattr(ev, "audit_items"):
            overlap = _overlap_audit(ev.audit_items(), opts.allow_overlap, src)
        if opts.evidence and space.objective.reference_items:  # read after the search: checked now
            read_reference_items(space.objective.reference_items, f"{src}: objective.reference_items")
        bar.step(STEPS[4])
        with user_errors(where=f"{src}: objective.protocol", what="the one-item dry run failed: ",
                         fix="check the protocol's gen_kwargs and the tokenizer's chat template (with "
                             "apply_chat_template), and the tasks' YAML"):
            result = ev.evaluate(worker.model, "search", limit=1, seed=space.budget.seed)
    except ConfigError as exc:
        raise _at_task(exc, space, src) from None
    _check_dry_run(result, space, src)
    return overlap


def _check_dry_run(result, space: SearchSpace, src: str) -> None:
    """The one-item dry run reports every metric of the objective."""
    from evomerge.search.score import ScoreError, task_values

    try:
        task_values(result.metrics, space.objective, "search")
    except ScoreError as exc:
        i, task = next(((i, t) for i, t in enumerate(space.objective.tasks) if repr(t.task) in str(exc)),
                       (0, space.objective.tasks[0]))
        raise ConfigError(f"the one-item dry run found no usable metric: {exc}",
                          where=f"{src}: objective.tasks[{i}].metric",
                          fix=f"name a metric that task {task.task!r} reports (the list above)") from None


def _overlap_audit(items: list, allowed: bool, src: str) -> dict:
    """Duplicates and near-duplicates across splits and tasks: refused unless `allowed`."""
    from evomerge.evaluation import overlap

    found = overlap.find(items)
    if found and not allowed:
        raise ConfigError(f"{len(found)}{'+' if len(found) >= 100 else ''} item(s) occur in two splits or two tasks "
                          f"(same content, or a shared run of {overlap.NGRAM}+ words):\n{overlap.table(found)}\n",
                          where=f"{src}: objective",
                          fix="remove the duplicates from the task data (or carve un-split tasks), or pass "
                              "--allow-overlap (the report says so)")
    return {"items": len(items), "ngram": overlap.NGRAM, "found": [f.as_dict() for f in found[:20]],
            "n_found": len(found), "allowed": allowed}


def validate_space(path: str | Path, *, trust_remote_code: bool = False, allow_overlap: bool = False,
                   allow_public_benchmark: bool = False, workers: int = 1, device: str = "cpu") -> str:
    """`evomerge validate SPACE`: the whole pre-flight, then the objective as text (tasks, metrics, split
    sizes, protocol) and the memory a search with `workers` on `device` needs (refused, as `search`
    refuses it, when it does not fit this machine). Writes nothing."""
    from evomerge.search.fitness import describe
    from evomerge.search.record import protocol_lines, splits_text
    from evomerge.search.spacefile import load_space

    space = load_space(path)
    src = space.path or str(path)
    plan_opts = RunOptions(trust_remote_code=trust_remote_code, workers=_workers(workers),
                           device=_plan_device(device))
    memory = _check_sources(space, plan_opts, src)
    check_fits(memory, where=f"{src} with --workers {plan_opts.workers} --device {plan_opts.device}")
    _, record = preflight(space, RunOptions(trust_remote_code=trust_remote_code, allow_overlap=allow_overlap,
                                            allow_public_benchmark=allow_public_benchmark), check_memory=False)
    obj = space.objective
    lines = [f"ok: {path}",
             f"  models      {', '.join(m.name for m in space.models)}; methods {', '.join(space.method_names)}",
             "  objective   " + ", ".join(f"{t.task}/{t.metric} x{t.weight:g}" for t in obj.tasks),
             f"  splits      {splits_text(space)}",
             f"  fitness     {describe(space.budget, len(obj.tasks))}"]
    if space.layer_path is not None:  # the depth and parameter range of the paths
        from evomerge.search.layer_path import describe as path_lines

        lines += [f"  {line}" for line in path_lines(space)]
    lines += [f"  {line}" for line in protocol_lines(record)]
    lines += [f"  {line}" for line in memory_lines(memory)]
    return "\n".join(lines)


def _workers(n: int) -> int:
    if int(n) < 1:
        raise ConfigError("--workers must be at least 1", where="--workers", fix="use --workers 1 or more")
    return int(n)


def _plan_device(device: str) -> str:
    """validate plans for a GPU this machine may lack (the search's machine): cuda and cuda:N are only
    read, `auto` is this machine's."""
    import re

    if device == "auto":
        from evomerge.engine.execution import resolve_device

        return resolve_device(device)
    if device != "cpu" and not re.fullmatch(r"cuda(:[0-9]+)?", device):
        raise ConfigError(f"unknown device {device!r}", where="--device", fix="use cpu, cuda, cuda:N or auto")
    return device


def _check_sizes(space: SearchSpace, ev, src: str) -> None:
    """No split of a task is empty, and the search split holds at least search.limit items."""
    from evomerge.evaluation.splits import ROLES

    b = space.budget
    for role in ROLES:
        for task, n in ev.sizes(role).items():
            if n == 0:
                raise ConfigError(f"the {role} split of task {task!r} is empty", where=f"{src}: objective.splits",
                                  fix="give the task more items, or a larger share to that split")
            if role == "search" and b.limit is not None and n < b.limit:
                raise ConfigError(f"the search split of task {task!r} has {n} items, fewer than search.limit {b.limit}",
                                  where=f"{src}: search.limit",
                                  fix=f"use search.limit {n} or less, or give the search split a larger share")


def _check_directions(space: SearchSpace, hib: dict[str, dict[str, bool]], src: str) -> None:
    """A task's metric optimised the wrong way round (perplexity maximised) is a set-up mistake."""
    for i, t in enumerate(space.objective.tasks):
        leaf = hib.get(space.objective.splits.task_name(t.task, "search"), {})
        if t.metric in leaf and leaf[t.metric] != (t.direction == "maximize"):
            way = "higher" if leaf[t.metric] else "lower"
            want = "maximize" if leaf[t.metric] else "minimize"
            raise ConfigError(f"task {t.task!r} says {way} {t.metric} is better, but the objective would "
                              f"{t.direction} it", where=f"{src}: objective.tasks[{i}].direction",
                              fix=f"set direction: {want} (or leave it out for a metric where higher is better)")


def _at_task(exc: ConfigError, space: SearchSpace, src: str) -> ConfigError:
    """Point an evaluator's error about a task at the task's entry in the space file."""
    if exc.where and exc.where.startswith(f"{src}: "):  # already names its field in the space file
        return exc
    for i, t in enumerate(space.objective.tasks):
        if f"{t.task!r}" in exc.what or f"'{t.task}_" in exc.what:
            return ConfigError(exc.what, where=f"{src}: objective.tasks[{i}].task", fix=exc.fix)
    if exc.where.startswith("objective."):  # a field of the space file
        return ConfigError(exc.what, where=f"{src}: {exc.where}", fix=exc.fix)
    return exc
