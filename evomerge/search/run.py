"""One search run, start to end: pre-flight, study, trial loop, selection and report, run folder.

Why it exists: `run_search` is `evomerge search` as a library call (the CLI's handler,
`evomerge.commands.search`, builds its options from the flags). It owns the order of a run: the
pre-flight before anything is on disk (`preflight.py`), the run folder and the study (created, or
resumed with the settings it was made with: `study.py`), the executor (in process, or Ray), the trial
loop (`loop.py`), selection and report (`selection.py`), and the files (`report.py`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable

from evomerge.errors import ConfigError, OutputError, user_errors
from evomerge.search.candidates import Candidate
from evomerge.search.jobs import CountingExecutor, worker_spec
from evomerge.search.loop import optimize
from evomerge.search.options import RunOptions
from evomerge.search.preflight import preflight
from evomerge.search.selection import select_and_report
from evomerge.search.space import SearchSpace
from evomerge.search.timing import StageClock


@dataclass
class SearchResult:
    """What a run found: the study, the (resumed) space, the run folder, the winner and every scored
    candidate, the seconds it took, and the study's counters."""

    study: Any
    space: SearchSpace
    out: Path
    winner: Candidate | None
    candidates: list[Candidate]
    seconds: float
    info: dict


def run_search(space: SearchSpace, out: str | Path, *, executor=None, log: Callable[[str], Any] = print,
               **options: Any) -> SearchResult:
    """Search (or resume) to the budget, select, report, and write the run folder.

    `options` are `RunOptions` fields as keywords (workers, ray_address, device, evaluator, progress,
    select, write, evidence, ...). `executor` may be given (tests, embedding); otherwise one is made from
    workers/ray_address. `evaluator` is a "module:callable" plugged into the worker instead of lm-eval
    (see executors/worker.py). A resumed study keeps the budget settings it was made with except those
    set by `space.with_overrides` (the CLI's flags); `reopen_report` allows extending a study whose report
    split was already evaluated; `trust_remote_code` accepts sources with their own code (config
    `auto_map`), refused otherwise; `verbose` lets transformers, datasets and lm-eval show their own bars
    and warnings.
    """
    opts = RunOptions(**options)
    clock = StageClock()
    out = Path(out)
    own_executor = executor is None
    opts = replace(opts, device=_search_device(opts.device, opts.workers, opts.ray_address))
    check_run_folder(out, storage_given=opts.storage is not None)
    finished = own_executor and opts.select and _finished(space, out, opts)
    worker, record = None, None
    if own_executor and not finished:
        with clock("preflight"):
            worker, record = preflight(space, opts)  # before anything is on disk
    prepare_out(out, storage_given=opts.storage is not None)
    workers = max(opts.workers, getattr(executor, "slots", 1))
    study, space, storage, info = _open_study(space, out, opts, record, workers, log)
    if finished:  # nothing to run: no pre-flight, no Ray; a worker is only set up if a score is missing
        log("evomerge: this run has finished its budget and its report; its stored result follows")
        opts = replace(opts, workers=1, ray_address=None)
    if own_executor:
        executor = _make_executor(space, opts, worker)  # the in-process executor adopts the pre-flight's worker
    executor = CountingExecutor(executor)
    try:
        with clock("trials"):
            info.update(optimize(study, space, executor, progress=opts.progress, log=log))
        winner, cands = (None, [])
        if opts.select:
            with clock("select_report"):
                winner, cands = select_and_report(study, space, executor, log=log, progress=opts.progress,
                                                  evidence=opts.evidence)
    finally:
        if own_executor:
            executor.close()
    info["wall"] = clock.store(study, worked=executor.submitted > 0)
    result = SearchResult(study, space, out, winner, cands, clock.total(), info)
    if opts.write:
        from evomerge.search.report import write_run

        write_run(result, storage=storage, evidence=opts.evidence)
    return result


def _finished(space: SearchSpace, out: Path, opts: RunOptions) -> bool:
    """The run's study exists, has its budget of finished trials and its report: resuming it only shows
    the stored result (reads the storage, writes nothing)."""
    from evomerge.search.selection import REPORT_ATTR
    from evomerge.search.study import default_storage, finished_count, load_existing, resume_settings

    storage = opts.storage or default_storage(out)
    if opts.reopen_report or (opts.storage is None and not (out / "study.db").is_file()):
        return False
    with user_errors(where=f"storage {storage}", what="the study's storage cannot be used: ",
                     fix="check --storage (or move the damaged study.db away to start afresh)"):
        study = load_existing(space, storage)
        if study is None or study.user_attrs.get("space_fingerprint") != space.fingerprint():
            return False
        resumed, _ = resume_settings(space, storage)
        return finished_count(study) >= resumed.budget.trials and \
            study.user_attrs.get(REPORT_ATTR, {}).get("_winner") is not None and \
            _same_settings(study, resumed)


def _same_settings(study, space: SearchSpace) -> bool:
    """The stored protocol record's settings (not its items, which need the tasks built) match the
    space's: otherwise the full pre-flight runs and `record.check_resume` refuses with what changed."""
    from evomerge.search.record import protocol_record, stored

    record, _ = stored(study)
    if record is None:
        return True
    current = protocol_record(space)
    return all(record.get(k) == current[k] for k in current if k != "items")


def _open_study(space: SearchSpace, out: Path, opts: RunOptions, record: dict | None, workers: int,
                log: Callable) -> tuple[Any, SearchSpace, str, dict]:
    """The study in the run folder's storage (or `opts.storage`), created or resumed; the space with the
    budget a resumed study keeps; the storage URL; and the study's counters."""
    from evomerge.search.study import create_study, default_storage, resume_settings

    storage = opts.storage or default_storage(out)
    # a storage that cannot be opened (a damaged study.db, a database server that refuses) is the
    # user's to fix: one line naming it, not SQLAlchemy's traceback
    with user_errors(where=f"storage {storage}", what="the study's storage cannot be used: ",
                     fix="check --storage (or move the damaged study.db away to start afresh)"):
        space, notes = resume_settings(space, storage, reopen_report=opts.reopen_report)
        study, info = create_study(space, storage, workers=workers, record=record)
    for note in notes:
        log(note)
    if info["requeued"]:
        log(f"evomerge: resumed; trials {info['requeued']} were interrupted and will run again")
    elif info["resumed"]:
        log("evomerge: resumed the study in " + storage)
    return study, space, storage, info


def _make_executor(space: SearchSpace, opts: RunOptions, worker):
    """In process (adopting the pre-flight's `worker`), or a Ray pool whose workers build their own."""
    from evomerge.executors import make_executor

    spec = worker_spec(space, evaluator=opts.evaluator, trust_remote_code=opts.trust_remote_code,
                       verbose=opts.verbose, device=opts.device)
    return make_executor(spec, opts.workers, opts.ray_address, opts.trial_timeout,
                         threads_per_worker=opts.threads_per_worker,
                         **({"worker": worker} if opts.in_process else {}))


def _search_device(device: str, workers: int, ray_address: str | None) -> str:
    """The device trials run on. In process: checked against this machine (`auto` resolved). With Ray,
    each actor takes one GPU of its node when the device is cuda (so cuda:N cannot be honoured), and the
    cluster's GPUs are checked when the actors are placed, not on this machine."""
    from evomerge.engine.execution import resolve_device

    if workers == 1 and not ray_address:
        return resolve_device(device)
    if device.startswith("cuda:"):
        raise ConfigError(f"--device {device} with Ray: each actor takes one GPU of its node", where="--device",
                          fix="use --device cuda (one GPU per worker) or run in process (--workers 1)")
    if device not in ("cpu", "cuda", "auto"):
        raise ConfigError(f"unknown device {device!r}", where="--device", fix="use cpu, cuda or auto")
    return device


def check_run_folder(out: Path, storage_given: bool) -> None:
    """The run folder can be made (not a file, not below one) and holds nothing but an evomerge run:
    checked before the pre-flight, writing nothing."""
    from evomerge.engine.output import check_creatable

    out = Path(out)
    if out.exists() and not out.is_dir():
        raise OutputError("exists and is not a folder", where=str(out), fix="choose another --out")
    check_creatable(out, str(out), "choose another --out")
    if out.is_dir() and any(out.iterdir()) and not storage_given:
        if not (out / "study.db").exists():
            raise OutputError("folder exists, is not empty and holds no evomerge study (study.db)",
                              where=str(out), fix="choose another --out, or empty the folder")


def prepare_out(out: Path, storage_given: bool) -> None:
    """Create the run folder; refuse one that holds something other than an evomerge run."""
    out = Path(out)
    check_run_folder(out, storage_given)
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        raise OutputError(f"cannot write here ({exc.strerror})", where=str(out),
                          fix="choose a writable --out") from None
