"""Run trials on a pool of Ray actors: parallel, asynchronous, fault-tolerant.

Why: one resident model per process caps a search at one candidate at a time. Here each actor is the
same plain `Worker` the in-process executor uses, wrapped by `ray.remote`: it opens the sources and
builds its resident model and evaluator once, then receives only a `TrialJob` (a recipe dict, kilobytes)
per trial and returns a `TrialOutcome`. Weights never cross the wire.

How the contract (`Executor` in `executors/__init__.py`) is met:
- `slots` = number of actors; `submit` hands a job to an idle actor; `wait` uses `ray.wait` over the
  in-flight trials, so each outcome is returned as soon as it finishes (the search tells it and asks
  for the next one at once: every actor stays busy).
- Faults never raise: an actor that dies mid-trial (killed, out of memory, its node gone) turns its
  trial into an outcome with `error` saying why, and a fresh actor takes its slot. A trial running past
  `timeout` seconds (counted from when its actor finished setting up) is treated the same way (its
  actor is killed and replaced), and so is a job whose actor is not ready after `setup_timeout` (e.g.
  a replacement no node can host), so no trial stays RUNNING forever. A slot whose actors keep dying
  without finishing a trial is retired; when none is left, `wait` raises `EvomergeError`.
- `close()` kills the actors and shuts down a Ray instance this executor started (Ctrl-C: the search
  calls it from `finally`). A Ctrl-C whose KeyboardInterrupt Ray drops is raised by `wait` (`SigintLatch`).
- Each outcome's `node` is "<hostname>/<Ray node id, 12 hex>", so trials on two nodes of one machine
  are told apart.

Sources are shared per node: every actor memory-maps the same safetensors files (`checkpoints.Sources`),
so the OS page cache holds one copy per machine however many actors read it
(`benchmarks/ray_memory.py` measures it). Each actor keeps its own resident model: that is the merge
target, one per concurrent trial by necessity.

Resources: one GPU per actor when the cluster has GPUs (the spec's device becomes "cuda"), else CPU
actors with `spec.threads` torch threads (default 1) and as many Ray CPUs. Local default, no set-up:
a fresh instance, `ray.init(address="local", num_cpus=max(cores, workers x threads),
include_dashboard=False, log_to_driver=False)` (worker errors come back in the outcomes, not as
console noise); `address` takes any Ray address ("auto", "HOST:PORT", "ray://HOST:10001").

Addresses: Ray advertises the machine's interface address even for a local instance. When no
`address` is given and Ray is not imported yet, `RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0` is set first,
which keeps every socket of the local instance on 127.0.0.1. A cluster (`address`) is the user's
network set-up and is left alone.

Priority: a local instance's workers run at the driver's priority (`RAY_worker_niceness=0` unless the
user set it), not Ray's default niceness 15, which starves them beside other busy processes; a cluster's
workers keep the niceness its nodes were started with. `ray` is imported here only, and only when a
`RayExecutor` is created.
"""

from __future__ import annotations

import os
import re
import sys
import socket
import time
from dataclasses import dataclass, field, replace
from typing import Any

from evomerge.errors import ConfigError, EvomergeError
from evomerge.executors.sigint import SigintLatch
from evomerge.executors.worker import TrialJob, TrialOutcome, Worker, WorkerSpec

# Environment variables the driver passes on to actors (a `ray start`ed node has its own environment).
_FORWARDED_ENV = (
    "HF_HUB_OFFLINE",
    "HF_DATASETS_OFFLINE",
    "TRANSFORMERS_OFFLINE",
    "HF_HOME",
    "HF_DATASETS_CACHE",
    "PYTHONPATH",
    "TOKENIZERS_PARALLELISM",
)


def actor_options(
    spec: WorkerSpec,
    cluster_resources: dict[str, float],
    *,
    num_gpus: float | None = None,
    resources: dict[str, float] | None = None,
    environ: dict[str, str] | None = None,
) -> tuple[WorkerSpec, dict[str, Any]]:
    """The spec each actor gets and its Ray options (pure; tested without Ray).

    GPUs: `num_gpus=None` means one GPU per actor when the cluster has any, else none. A GPU actor whose
    spec says device "cpu" gets "cuda" (Ray sets CUDA_VISIBLE_DEVICES to the actor's own GPU).
    CPU: each actor reserves `spec.threads` Ray CPUs (default 1) and runs that many torch/OpenMP threads.
    """
    environ = os.environ if environ is None else environ
    threads = int(spec.threads or 1)
    gpus = cluster_resources.get("GPU", 0)
    if spec.device == "auto":  # the cluster decides: a GPU per actor when it has any
        spec = replace(spec, device="cuda" if gpus >= 1 else "cpu")
    if spec.device.startswith("cuda"):
        if gpus < 1:
            raise ConfigError("--device cuda, but the Ray cluster has no GPU", where="--device",
                              fix="use --device cpu (or auto), or join a cluster with GPUs (--ray-address)")
        num_gpus = 1 if num_gpus is None else num_gpus
    if num_gpus is None:
        num_gpus = 1 if gpus >= 1 else 0
    if num_gpus and spec.device == "cpu":
        spec = replace(spec, device="cuda")
    if spec.threads is None:
        spec = replace(spec, threads=threads)
    env = {k: environ[k] for k in _FORWARDED_ENV if k in environ}
    env.update({"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)})
    options: dict[str, Any] = {
        "num_cpus": threads,
        "num_gpus": num_gpus,
        "max_restarts": 0,  # a dead actor is replaced by the executor, with its trial reported
        "max_task_retries": 0,
        "runtime_env": {"env_vars": env},
    }
    if resources:
        options["resources"] = dict(resources)
    return spec, options


LOOPBACK_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"  # "0": Ray binds a local instance to 127.0.0.1
# Ray starts workers at niceness 15: beside other busy processes they get a few percent of a core (~4% each
# beside two busy loops on 2 cores). A local instance is the search's own: its workers get the driver's.
NICENESS_ENV = "RAY_worker_niceness"


def _actor_info(worker: Any) -> tuple[str, str, int]:
    """Runs inside an actor (via `__ray_call__`): where it lives. The plain class needs no Ray code."""
    import ray

    return ray.get_runtime_context().get_node_id(), socket.gethostname(), os.getpid()


def _actor_setup(worker: Any) -> str | None:
    """Runs inside an actor: build the heavy state now, so the first trial does not pay for it.
    Returns the error instead of raising; `Worker.run` reports it again in that trial's outcome."""
    setup = getattr(worker, "setup", None)
    if setup is None:
        return None
    try:
        setup()
    except Exception as exc:  # noqa: BLE001 - reported through the trial outcome
        return f"{type(exc).__name__}: {exc}"
    return None


@dataclass
class _Slot:
    """One place in the pool: the current actor and the job it runs (if any)."""

    index: int
    actor: Any = None
    info_ref: Any = None
    setup_ref: Any = None
    setup_done_at: float | None = None
    started_at: float = 0.0
    node: str = "?"
    pid: int = -1
    job: TrialJob | None = None
    ref: Any = None
    submitted_at: float = 0.0
    deaths_in_a_row: int = 0
    retired: bool = False
    history: list[str] = field(default_factory=list)


class RayExecutor:
    """`Executor` over `workers` Ray actors, each wrapping `worker_cls(spec)` (default: `Worker`).

    spec: how every actor builds its worker (picklable).
    workers: number of actors (= slots).
    address: None starts a local Ray (or reuses one already initialised in this process); any Ray
      address joins that cluster.
    timeout: seconds one trial may run (counted from when its actor is ready) before it fails and its
      actor is killed and replaced; None: no limit.
    num_gpus: GPUs per actor; None: 1 when the cluster has GPUs, else 0.
    resources: extra Ray custom resources per actor.
    worker_cls: the plain class to wrap (tests pass fakes); needs `__init__(spec)` and `run(job)`.
    max_deaths: consecutive actor deaths without a finished trial after which a slot is retired.
    init_kwargs: extra arguments for `ray.init`.
    start_timeout: seconds to wait for the first actors to be placed and started.
    setup_timeout: seconds a job may wait for its actor's setup (sources, model, evaluator) before it
      fails and the actor is replaced, e.g. a replacement actor that can never be placed; None: no limit.
    """

    def __init__(
        self,
        spec: WorkerSpec,
        workers: int = 2,
        address: str | None = None,
        *,
        timeout: float | None = None,
        num_gpus: float | None = None,
        resources: dict[str, float] | None = None,
        worker_cls: type | None = None,
        max_deaths: int = 3,
        init_kwargs: dict[str, Any] | None = None,
        start_timeout: float = 180.0,
        setup_timeout: float | None = 1800.0,
    ):
        if workers < 1:
            raise ConfigError(f"workers must be at least 1, got {workers}", where="--workers")
        if timeout is not None and timeout <= 0:
            raise ConfigError(f"trial timeout must be positive, got {timeout}", where="--trial-timeout")
        if not address and "ray" not in sys.modules:
            # A local instance the user did not ask to share: keep every Ray socket on 127.0.0.1
            # (Ray reads this when it is imported; it forbids adding nodes, which "local" never does).
            os.environ.setdefault(LOOPBACK_ENV, "0")
        import ray  # lazily: `import evomerge` never imports Ray

        self._ray = ray
        self.timeout = timeout
        self.max_deaths = max_deaths
        self._closed = False
        self._sigint = SigintLatch()
        self._owns_ray = False

        threads = int(spec.threads or 1)
        self.setup_timeout = setup_timeout
        if not ray.is_initialized():
            self._init_ray(address, max(os.cpu_count() or 1, workers * threads), init_kwargs)

        spec, options = actor_options(spec, ray.cluster_resources(), num_gpus=num_gpus, resources=resources)
        self.spec = spec
        self.num_gpus = options["num_gpus"]
        self.threads = options["num_cpus"]
        self._actor_cls = ray.remote(worker_cls or Worker)  # the plain class, wrapped
        self.actor_options = options
        self._slots = [_Slot(i) for i in range(workers)]
        for slot in self._slots:
            self._start_actor(slot)
        self._await_started(start_timeout)
        self._sigint.install()  # removed by close()

    def _init_ray(self, address: str | None, num_cpus: int, init_kwargs: dict[str, Any] | None) -> None:
        """Join the cluster at `address`, or start a fresh local instance with `num_cpus` CPUs (this pool
        then owns it and shuts it down on close)."""
        kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False}
        if address:
            kwargs["address"] = address
        else:
            # "local" always starts a fresh instance (a bare ray.init() would join a cluster
            # that `ray start` left running on this machine).
            kwargs["address"] = "local"
            kwargs["num_cpus"] = num_cpus
            os.environ.setdefault(NICENESS_ENV, "0")  # read by the raylet this init starts
        kwargs.update(init_kwargs or {})
        try:
            self._ray.init(**kwargs)
        except (ConnectionError, RuntimeError, ValueError) as exc:
            raise ConfigError(
                f"cannot start or join Ray at {address or 'a new local instance'}: {exc}",
                where="--ray-address",
                fix="check the address (e.g. HOST:6379, 'auto' with a running `ray start`), "
                "and export RAY_AUTH_MODE=token if the cluster uses token authentication",
            ) from exc
        self._owns_ray = True

    # -- Executor protocol ------------------------------------------------------------------------
    @property
    def slots(self) -> int:
        return sum(1 for s in self._slots if not s.retired)

    @property
    def in_flight(self) -> int:
        return sum(1 for s in self._slots if s.job is not None)

    def submit(self, job: TrialJob) -> None:
        if self._closed:
            raise RuntimeError("RayExecutor is closed")
        slot = next((s for s in self._slots if not s.retired and s.job is None), None)
        if slot is None:
            raise RuntimeError(f"all {self.slots} slots are busy; call wait() before submit()")
        slot.job = job
        slot.submitted_at = time.monotonic()
        slot.ref = slot.actor.run.remote(job)

    def wait(self, timeout: float | None = None) -> list[TrialOutcome]:
        """Outcomes of finished trials (at least one, unless `timeout` passed or none is in flight)."""
        ray = self._ray
        end = None if timeout is None else time.monotonic() + timeout
        while True:
            self._sigint.check()  # a Ctrl-C that a Ray callback swallowed (see executors/sigint.py)
            busy = [s for s in self._slots if s.job is not None]
            if not busy:
                if self.slots == 0:
                    raise self._all_retired()
                return []
            self._note_setups_done()
            now = time.monotonic()
            outcomes = [self._timed_out(s, now) for s in busy if self._deadline(s) is not None
                        and self._deadline(s) <= now]
            if outcomes:
                return outcomes
            wake = [d for d in (self._deadline(s) for s in busy) if d is not None]
            pending_setups = [s.setup_ref for s in busy if s.setup_done_at is None and s.setup_ref]
            if pending_setups:
                wake.append(now + 1.0)  # a trial's clock starts when its actor's setup ends
            if end is not None:
                wake.append(end)
            # Wake at least every second: deadlines move when setups finish, and Ctrl-C is handled
            # promptly between waits.
            step = min([1.0] + [max(0.0, w - now) for w in wake])
            refs = [s.ref for s in busy]
            ready, _ = ray.wait(refs, num_returns=1, timeout=step)
            if ready:
                ready, _ = ray.wait(refs, num_returns=len(refs), timeout=0)
                by_ref = {s.ref: s for s in busy}
                return [self._collect(by_ref[r]) for r in ready]
            if end is not None and time.monotonic() >= end:
                return []

    def close(self) -> None:
        """Kill every actor; shut Ray down if this executor started it. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._sigint.uninstall()
        ray = self._ray
        for slot in self._slots:
            if slot.actor is not None:
                try:
                    ray.kill(slot.actor, no_restart=True)
                except Exception:  # noqa: BLE001 - already gone
                    pass
            slot.actor = slot.ref = slot.job = None
        if self._owns_ray and ray.is_initialized():
            ray.shutdown()

    def __enter__(self) -> "RayExecutor":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- introspection (tests, benchmarks, logs) --------------------------------------------------
    def workers(self) -> list[dict[str, Any]]:
        """Where each live actor runs: slot, node, pid (after start)."""
        return [
            {"slot": s.index, "node": s.node, "pid": s.pid, "busy": s.job is not None}
            for s in self._slots
            if not s.retired
        ]

    # -- internals --------------------------------------------------------------------------------
    def _start_actor(self, slot: _Slot) -> None:
        slot.actor = self._actor_cls.options(**self.actor_options).remote(self.spec)
        slot.info_ref = slot.actor.__ray_call__.remote(_actor_info)
        slot.setup_ref = slot.actor.__ray_call__.remote(_actor_setup)
        slot.setup_done_at = None
        slot.started_at = time.monotonic()
        slot.node, slot.pid = "?", -1

    def _await_started(self, start_timeout: float) -> None:
        ray = self._ray
        refs = {s.info_ref: s for s in self._slots}
        ready, pending = ray.wait(list(refs), num_returns=len(refs), timeout=start_timeout)
        for ref in ready:
            self._record_info(refs[ref])
        if pending:
            need = f"{self.threads} CPU" + (f" and {self.num_gpus} GPU" if self.num_gpus else "")
            error = EvomergeError(
                f"only {len(ready)} of {len(refs)} Ray workers started within {start_timeout:g} s "
                f"(each needs {need}; the cluster has {self._ray_resources_text()})",
                where="--workers",
                fix="use fewer --workers or fewer threads per worker, or add nodes to the cluster",
            )
            self.close()
            raise error

    def _ray_resources_text(self) -> str:
        try:
            res = self._ray.cluster_resources()
        except Exception:  # noqa: BLE001
            return "unknown resources"
        return ", ".join(f"{k} {v:g}" for k, v in sorted(res.items()) if k in ("CPU", "GPU"))

    def _record_info(self, slot: _Slot) -> None:
        try:
            node_id, host, pid = self._ray.get(slot.info_ref)
        except Exception:  # noqa: BLE001 - the actor died before telling; its trial reports it
            return
        slot.node = f"{host}/{node_id[:12]}"
        slot.pid = pid

    def _note_setups_done(self) -> None:
        pending = [s for s in self._slots if s.setup_done_at is None and s.setup_ref is not None]
        if not pending:
            return
        ready, _ = self._ray.wait([s.setup_ref for s in pending], num_returns=len(pending), timeout=0)
        ready = set(ready)
        now = time.monotonic()
        for s in pending:
            if s.setup_ref in ready:
                s.setup_done_at = now
                if s.pid < 0:
                    self._record_info(s)

    def _deadline(self, slot: _Slot) -> float | None:
        if slot.job is None:
            return None
        if slot.setup_done_at is None:
            return None if self.setup_timeout is None else slot.started_at + self.setup_timeout
        if self.timeout is None:
            return None
        return max(slot.submitted_at, slot.setup_done_at) + self.timeout

    def _collect(self, slot: _Slot) -> TrialOutcome:
        ray = self._ray
        job, ref = slot.job, slot.ref
        elapsed = time.monotonic() - slot.submitted_at
        try:
            outcome = ray.get(ref)
        except (ray.exceptions.RayActorError, ray.exceptions.WorkerCrashedError,
                ray.exceptions.OutOfMemoryError, ray.exceptions.NodeDiedError,
                ray.exceptions.LocalRayletDiedError) as exc:
            return self._replace(slot, _death_reason(exc), elapsed)
        except ray.exceptions.RayTaskError as exc:  # the worker class raised (Worker.run never does)
            outcome = self._failed(slot, job, f"worker raised: {_first_line(exc.cause or exc)}", elapsed)
        except ray.exceptions.RayError as exc:
            return self._replace(slot, f"worker lost: {type(exc).__name__}: {_first_line(exc)}", elapsed)
        else:
            if not isinstance(outcome, TrialOutcome):
                outcome = self._failed(slot, job, f"worker returned {type(outcome).__name__}", elapsed)
            else:
                if slot.pid < 0:
                    self._record_info(slot)
                outcome = replace(outcome, node=slot.node)
        slot.job = slot.ref = None
        slot.deaths_in_a_row = 0
        return outcome

    def _failed(self, slot: _Slot, job: TrialJob, error: str, elapsed: float) -> TrialOutcome:
        return TrialOutcome(
            number=job.number,
            metrics=None,
            error=error,
            timings={"total": elapsed},
            node=slot.node,
            pid=slot.pid,
            tag=job.tag,
        )

    def _timed_out(self, slot: _Slot, now: float) -> TrialOutcome:
        if slot.setup_done_at is None:  # the actor never became ready (not placed, or setup hangs)
            reason = (f"worker not ready after {now - slot.started_at:.0f} s (setup limit "
                      f"{self.setup_timeout:g} s): not placed on any node, or loading hangs; replaced")
            return self._replace(slot, reason, now - slot.submitted_at)
        ran = now - max(slot.submitted_at, slot.setup_done_at)
        reason = f"timeout: trial ran {ran:.1f} s, more than the {self.timeout:g} s limit; worker killed"
        return self._replace(slot, reason, now - slot.submitted_at, count_death=False)

    def _replace(self, slot: _Slot, reason: str, elapsed: float, *, count_death: bool = True) -> TrialOutcome:
        """Fail the slot's trial with `reason`, then give the slot a fresh actor (or retire it)."""
        outcome = self._failed(slot, slot.job, reason, elapsed)
        slot.history.append(reason)
        old = slot.actor
        slot.job = slot.ref = None
        try:
            self._ray.kill(old, no_restart=True)
        except Exception:  # noqa: BLE001 - already dead
            pass
        if count_death:
            slot.deaths_in_a_row += 1
        if slot.deaths_in_a_row >= self.max_deaths:
            slot.retired = True
            slot.actor = None
            outcome = replace(
                outcome,
                error=f"{reason} (worker slot {slot.index} retired after {slot.deaths_in_a_row} "
                f"deaths in a row)",
            )
        elif not self._closed:
            self._start_actor(slot)
        return outcome

    def _all_retired(self) -> EvomergeError:
        last = next((s.history[-1] for s in self._slots if s.history), "unknown")
        return EvomergeError(
            f"every Ray worker died {self.max_deaths} times in a row without finishing a trial "
            f"(last: {_first_line(last)})",
            where="--workers",
            fix="check memory per worker (fewer --workers), and the worker logs under the Ray session "
            "folder",
        )


def _first_line(exc: object, limit: int = 300) -> str:
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    text = lines[0] if lines else type(exc).__name__
    return text[:limit]


def _death_reason(exc: Exception) -> str:
    """A short, useful reason for a trial whose actor died."""
    text = str(exc)
    low = text.lower()
    if re.search(r"out of memory|outofmemory|low on memory|memory monitor|\boom\b", low):
        kind = "out of memory"
    elif "sigkill" in low or "killed" in low or "exit" in low or "died" in low:
        kind = "worker process died"
    else:
        kind = "worker lost"
    detail = " ".join(ln.strip() for ln in text.splitlines() if ln.strip())
    return f"{kind} ({type(exc).__name__}): {detail[:400]}"
