"""Create or resume the Optuna study of a run: storage, sampler, pruner, seed, baselines.

Why it exists: which Optuna components a search uses is a decision with rules (CMA-ES for float
spaces, TPE with a constant liar when trials run in parallel, NSGA-II for several objectives, a grid
over `grid_points` values per dimension), and resuming must be safe: the stored study must belong to
the same space (a fingerprint is kept in the study's user attributes), and trials left RUNNING by a
killed process are marked FAIL (reason kept) and their parameters enqueued again, so the budget
completes without redoing or losing a finished trial. Only Optuna's public API is used.
"""

from __future__ import annotations

import math
from pathlib import Path

import optuna

from evomerge.errors import ConfigError
from evomerge.search.score import directions
from evomerge.search.space import SearchSpace
from evomerge.search.suggest import baseline_params

LEGACY_STUDY_NAME = "evomerge"  # every study was called this before studies took their space's name
FAIL_REASON = "fail_reason"  # trial user attribute holding why a trial failed
INTERRUPTED = "interrupted_trials"  # study user attribute: trial numbers FAILed because their run died
ROLE = "role"  # trial user attribute: "baseline:<method>", "retry", or absent


def default_storage(out: Path) -> str:
    return f"sqlite:///{(Path(out) / 'study.db').resolve()}"


def open_storage(url: str):
    """An Optuna storage for `url`. SQLite files get WAL journaling with synchronous=NORMAL: a commit
    no longer waits for fsync (13 ms each here, ~25 commits per trial), yet a killed process loses
    nothing committed (only an OS crash could lose the last transactions). Other URLs go to Optuna."""
    if not url.startswith("sqlite:///"):
        return url
    from sqlalchemy import event

    storage = optuna.storages.RDBStorage(url)

    @event.listens_for(storage.engine, "connect")
    def _pragmas(dbapi_conn, _record):  # noqa: ANN001 - SQLAlchemy's callback signature
        cursor = dbapi_conn.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.close()

    storage.engine.dispose()  # connections opened before the listener reconnect with the pragmas
    return storage


def resolve_sampler_name(space: SearchSpace, workers: int = 1) -> str:
    name = space.budget.sampler
    if name != "auto":
        return name
    if space.objective.multi_objective:
        return "nsga2"
    return "cmaes" if space.is_continuous else "tpe"


def make_sampler(space: SearchSpace, name: str, seed: int, workers: int = 1) -> optuna.samplers.BaseSampler:
    """The Optuna sampler called `name`, seeded. Trials asked while others run (several workers, or a
    batch round) make TPE lie about the running ones; in batch mode that depends on the batch, never on
    the worker count, so that the same seed gives the same trials."""
    s = optuna.samplers
    concurrent = space.budget.batch or workers
    if name == "cmaes":
        # warn_independent_sampling off: the enqueued baselines are fixed-parameter trials.
        return s.CmaEsSampler(seed=seed, warn_independent_sampling=False, n_startup_trials=0,
                              consider_pruned_trials=space.budget.pruner != "none")
    if name == "tpe":
        import warnings

        with warnings.catch_warnings():  # constant_liar is flagged experimental; it is what we want
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return s.TPESampler(seed=seed, multivariate=True, group=len(space.methods) > 1,
                                constant_liar=concurrent > 1,
                                n_startup_trials=max(5, min(10, space.budget.trials // 5)))
    if name == "gp":
        import warnings

        with warnings.catch_warnings():  # flagged experimental in some optuna releases
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return s.GPSampler(seed=seed, n_startup_trials=max(5, min(10, space.budget.trials // 5)))
    if name == "nsga2":
        return s.NSGAIISampler(seed=seed, population_size=max(4, min(20, space.budget.trials // 5)))
    if name == "random":
        return s.RandomSampler(seed=seed)
    if name == "grid":
        return _AskTellGridSampler(grid_space(space), seed=seed)
    raise ConfigError(f"unknown sampler {name!r}", where="--sampler",
                      fix="use one of auto, cmaes, tpe, gp, nsga2, random, grid")


class _AskTellGridSampler(optuna.samplers.GridSampler):
    """GridSampler whose `after_trial` does not call `study.stop()`: that only works inside
    `study.optimize`, and our ask/tell loop stops by itself at the grid size (`grid_size`)."""

    def after_trial(self, study, trial, state, values) -> None:  # noqa: D102
        return None


def grid_space(space: SearchSpace) -> dict[str, list]:
    """Each float dimension at `grid_points` evenly spaced values (log-spaced when log), each choice."""
    n = space.budget.grid_points
    grid = {}
    for dim in space.all_dimensions():
        if dim.choices is not None:
            grid[dim.name] = list(dim.choices)
        elif dim.log:
            a, b = math.log(dim.low), math.log(dim.high)
            grid[dim.name] = [math.exp(a + (b - a) * i / (n - 1)) for i in range(n)]
        else:
            grid[dim.name] = [dim.low + (dim.high - dim.low) * i / (n - 1) for i in range(n)]
        if dim.integer:  # whole numbers: the distinct rounded points
            grid[dim.name] = sorted({int(round(v)) for v in grid[dim.name]})
    return grid


def grid_size(space: SearchSpace) -> int:
    return math.prod(len(v) for v in grid_space(space).values())


def make_pruner(space: SearchSpace) -> optuna.pruners.BasePruner:
    """The pruner, its rungs those of `search.fidelity` (steps are items per task: first, first * factor, ...)."""
    b = space.budget
    name = b.pruner
    p = optuna.pruners
    first, factor = (b.fidelity.limit, b.fidelity.factor) if b.fidelity else (1, 3)
    if name == "median":
        return p.MedianPruner(n_startup_trials=5, n_warmup_steps=0)
    if name == "hyperband":
        return p.HyperbandPruner(min_resource=first, max_resource=b.limit or "auto", reduction_factor=factor)
    if name == "successive_halving":
        return p.SuccessiveHalvingPruner(min_resource=first, reduction_factor=factor)
    return p.NopPruner()


def create_study(
    space: SearchSpace,
    storage: str,
    *,
    sampler: str | None = None,
    seed: int | None = None,
    workers: int = 1,
    study_name: str | None = None,
    record: dict | None = None,
) -> tuple[optuna.Study, dict]:
    """Create the study, or load it when `storage` already holds one for this space.

    Returns (study, info) where info has `resumed` (bool), `sampler` (name), `requeued` (trial
    numbers found RUNNING and marked FAIL). Raises ConfigError when the stored study belongs to a
    different space, or (`record`, from `record.protocol_record`) one scored under another protocol.
    """
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    seed = space.budget.seed if seed is None else seed
    name = sampler or resolve_sampler_name(space, workers)
    study_name = study_name or study_name_for(space, storage)
    existing = _existing(storage, study_name)
    study = optuna.create_study(
        storage=open_storage(storage),
        study_name=study_name,
        sampler=make_sampler(space, name, seed, workers),
        pruner=make_pruner(space),
        directions=["maximize" if d == "maximize" else "minimize" for d in directions(space.objective)],
        load_if_exists=True,
    )
    info = {"resumed": existing, "sampler": name, "requeued": []}
    if existing:
        stored = study.user_attrs.get("space_fingerprint")
        if stored is not None and stored != space.fingerprint():
            raise ConfigError(
                "this run folder holds a study of a different search space",
                where=storage,
                fix="use another --out (or --storage), or the space that made this study",
            )
    if record is not None:  # before any trial is requeued or enqueued: a refusal changes nothing
        from evomerge.search.record import RECORD_ATTR, check_resume

        check_resume(study.user_attrs.get(RECORD_ATTR), record, where=storage)
        if RECORD_ATTR not in study.user_attrs:  # a new study, or one made before records existed
            study.set_user_attr(RECORD_ATTR, record)
    if existing:
        info["requeued"] = _fail_abandoned(study)
    else:
        study.set_user_attr("space_fingerprint", space.fingerprint())
        study.set_user_attr("space_name", space.name)
        study.set_user_attr("seed", seed)
        if space.budget.baselines and name != "grid":
            for label, params in baseline_params(space):
                study.enqueue_trial(params, user_attrs={ROLE: label}, skip_if_exists=True)
    study.set_user_attr("sampler", name)
    # the settings this run goes on with (a flag's override is remembered by the next resume)
    study.set_user_attr(BUDGET_ATTR, space.budget.model_dump(mode="json", include=set(_KEPT)) | {"seed": seed})
    return study, info


BUDGET_ATTR = "budget"  # study user attribute: the search settings the study was created with
_KEPT = ("trials", "sampler", "seed", "pruner", "top_k", "baselines", "grid_points", "batch")
FLAGS = {"trials": "--trials", "sampler": "--sampler", "seed": "--seed", "pruner": "--pruner", "top_k": "--top-k",
         "batch": "--batch"}


def resume_settings(
    space: SearchSpace, storage: str, *, reopen_report: bool = False, study_name: str | None = None,
) -> tuple[SearchSpace, list[str]]:
    """The space to resume with: a stored study keeps the settings it was created with (budget, sampler,
    seed, pruner, top-k, baselines), unless a flag overrides one (`space.overridden`, set by
    `with_overrides`). Returns the space
    and one note per setting that differs from the space file. Refuses to extend the search (more trials,
    another top-k) once the report split has been evaluated, unless `reopen_report`: a second report
    would look at the held-out items again. Changes nothing in the storage."""
    from evomerge.search.record import REPORT_LOG_ATTR

    study_name = study_name or study_name_for(space, storage)
    if not _existing(storage, study_name):
        return space, []
    study = optuna.load_study(study_name=study_name, storage=open_storage(storage))
    stored = study.user_attrs.get(BUDGET_ATTR)
    notes, keep = [], {}
    current = space.budget.model_dump(mode="json")
    for key, value in (stored or {}).items():
        if key not in current or current[key] == value:
            continue
        if key in space.overridden:
            notes.append(f"evomerge: {FLAGS[key]} {current[key]} overrides the study's {key} {value}")
            continue
        keep[key] = value
        how = f"pass {FLAGS[key]} {current[key]} to change it" if key in FLAGS else "fixed when the study was made"
        notes.append(f"evomerge: resumed with the study's {key} {value} (the space file says {current[key]}; {how})")
    if keep:
        space = space.model_copy(update={"budget": space.budget.model_copy(update=keep)})
    log = study.user_attrs.get(REPORT_LOG_ATTR, [])
    if log and not reopen_report:
        more = space.budget.trials > finished_count(study)
        other_k = stored is not None and space.budget.top_k != stored.get("top_k")
        if more or other_k:
            what = (f"{space.budget.trials - finished_count(study)} more trial(s)" if more
                    else f"top-k {space.budget.top_k} instead of {stored.get('top_k')}")
            raise ConfigError(
                f"the report split of this run was already evaluated ({log[0]['at']}); {what} could pick "
                "another winner and look at the held-out report items a second time",
                where=storage,
                fix="start a new run (another --out) for a larger search, or pass --reopen-report to accept "
                    "a second look (the report then says how often the report split was evaluated)",
            )
    return space, notes


def _existing(storage: str, study_name: str) -> bool:
    return study_name in _study_names(storage)


def _study_names(storage: str) -> list[str]:
    try:
        return optuna.study.get_all_study_names(storage=storage)
    except Exception:  # noqa: BLE001 - an empty or new storage
        return []


def load_existing(space: SearchSpace, storage: str) -> optuna.Study | None:
    """The space's study in `storage`, or None when there is none yet (creates nothing)."""
    name = study_name_for(space, storage)
    if not _existing(storage, name):
        return None
    return optuna.load_study(study_name=name, storage=open_storage(storage))


def study_name_for(space: SearchSpace, storage: str) -> str:
    """The study's name: the space's, so that runs sharing one storage (and optuna-dashboard) tell
    apart; a run made before studies took that name keeps its `evomerge` study, so it still resumes."""
    names = _study_names(storage)
    return LEGACY_STUDY_NAME if LEGACY_STUDY_NAME in names and space.name not in names else space.name


def load_run_study(storage: str) -> optuna.Study:
    """The one study of a run folder's storage (its space's name, or `evomerge` for older runs)."""
    names = _study_names(storage)
    if len(names) != 1:
        raise ConfigError(f"the run's storage holds {len(names)} studies ({', '.join(names) or 'none'}), not one",
                          where=storage, fix="give the --out folder of an `evomerge search`")
    return optuna.load_study(study_name=names[0], storage=storage)


def _fail_abandoned(study: optuna.Study) -> list[int]:
    """Trials RUNNING in storage were left by a process that died: FAIL them, enqueue their params."""
    from optuna.trial import TrialState

    numbers = []
    for frozen in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        study.tell(frozen.number, state=TrialState.FAIL)
        if frozen.params:
            attrs = {ROLE: frozen.user_attrs.get(ROLE, "retry"), "retry_of": frozen.number}
            study.enqueue_trial(frozen.params, user_attrs=attrs)
        numbers.append(frozen.number)
    if numbers:
        # A finished trial's user attributes are read-only, so the reason lives on the study.
        done = list(study.user_attrs.get(INTERRUPTED, [])) + numbers
        study.set_user_attr(INTERRUPTED, done)
    return numbers


def finished_count(study: optuna.Study) -> int:
    """Trials that count toward the budget: complete, pruned, and failed except interrupted ones."""
    from optuna.trial import TrialState

    interrupted = set(study.user_attrs.get(INTERRUPTED, []))
    n = 0
    for t in study.get_trials(deepcopy=False):
        if t.state in (TrialState.COMPLETE, TrialState.PRUNED):
            n += 1
        elif t.state == TrialState.FAIL and t.number not in interrupted:
            n += 1
    return n
