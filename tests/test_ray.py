"""Tests for the Ray executor (`evomerge/executors/ray_pool.py`) on a real two-node Ray cluster.

Why these tests look the way they do:
- Ray advertises the machine's interface address even when told 127.0.0.1, and these machines may send
  traffic to loopback only. So the tests FAIL (never skip) unless they run inside the loopback-only
  namespace that `scripts/test.sh` / `scripts/netns.sh` create; `ray stop` is only safe there too,
  because that namespace has its own PID space (outside it, `ray stop` kills everyone's Ray).
- The cluster is plain Ray started the way users start it: `ray start --head` plus a second
  `ray start --address=...` node, one CPU each, so two workers land on two different nodes.
- Most tests use `FakeWorker`, a stand-in with the same contract as `evomerge.executors.worker.Worker`
  (constructor takes the spec, `run(job) -> TrialOutcome`), so faults are cheap to provoke and check.
  The real `Worker` on the toy family is covered by the tests at the end.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from dataclasses import replace
from pathlib import Path

import pytest

from guards import hang_guard

from evomerge.executors.worker import TrialJob, TrialOutcome, WorkerSpec

pytestmark = pytest.mark.ray

ROOT = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).with_name("ray"))


# --- the namespace guard ---------------------------------------------------------------------------
def non_loopback_interfaces() -> dict[str, list[str]]:
    """Interfaces other than `lo` that carry an address (IPv4 or IPv6), from the kernel's view."""
    import psutil

    found: dict[str, list[str]] = {}
    for name, addrs in psutil.net_if_addrs().items():
        ips = [a.address for a in addrs if a.family in (socket.AF_INET, socket.AF_INET6)]
        if name != "lo" and ips:
            found[name] = ips
    return found


def require_loopback_namespace() -> None:
    found = non_loopback_interfaces()
    if found:
        pytest.fail(
            "Ray tests must run inside a loopback-only network namespace, but this process sees "
            f"{found}: Ray would advertise those addresses. Run them with scripts/test.sh "
            "(e.g. `scripts/test.sh tests/test_ray.py`) or `scripts/netns.sh -- .venv/bin/pytest ...`.",
            pytrace=False,
        )
    if not os.environ.get("EVOMERGE_NETNS"):
        pytest.fail(
            "Ray tests must run under scripts/netns.sh (EVOMERGE_NETNS is unset): it gives them a private "
            "PID namespace, so the `ray stop` at the end cannot kill anyone else's Ray. "
            "Run `scripts/test.sh tests/test_ray.py`.",
            pytrace=False,
        )


def test_network_is_loopback_only():
    require_loopback_namespace()
    assert non_loopback_interfaces() == {}


# --- resources (pure; no Ray needed) -----------------------------------------------------------------
def test_actor_options_one_gpu_per_worker_when_gpus_exist_else_cpu_threads():
    from evomerge.executors.ray_pool import actor_options

    spec = WorkerSpec(sources=("a",), base="a", threads=None)
    gpu_spec, gpu = actor_options(spec, {"CPU": 16.0, "GPU": 4.0}, environ={"HF_HUB_OFFLINE": "1", "X": "y"})
    assert gpu["num_gpus"] == 1 and gpu_spec.device == "cuda" and gpu["num_cpus"] == 1
    assert gpu["runtime_env"]["env_vars"] == {"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
                                              "MKL_NUM_THREADS": "1"}
    assert gpu["max_restarts"] == 0  # the executor replaces dead actors itself, reporting their trial

    cpu_spec, cpu = actor_options(WorkerSpec(sources=("a",), base="a", threads=3), {"CPU": 8.0}, environ={})
    assert cpu["num_gpus"] == 0 and cpu_spec.device == "cpu" and cpu_spec.threads == 3
    assert cpu["num_cpus"] == 3 and cpu["runtime_env"]["env_vars"]["OMP_NUM_THREADS"] == "3"

    forced, opts = actor_options(spec, {"CPU": 8.0, "GPU": 1.0}, num_gpus=0, resources={"big": 1}, environ={})
    assert opts["num_gpus"] == 0 and forced.device == "cpu" and opts["resources"] == {"big": 1}
    explicit, _ = actor_options(WorkerSpec(sources=("a",), base="a", device="cuda:0"), {"GPU": 1.0}, environ={})
    assert explicit.device == "cuda:0"  # an explicit device is kept


def test_death_reasons_name_out_of_memory():
    from evomerge.executors.ray_pool import _death_reason

    oom = _death_reason(RuntimeError("Worker exit detail: Task was killed due to the node running low on memory."))
    assert oom.startswith("out of memory (RuntimeError): ")
    killed = _death_reason(RuntimeError("The actor died unexpectedly before finishing this task."))
    assert killed.startswith("worker process died") and "unexpectedly" in killed


# --- a stand-in worker --------------------------------------------------------------------------------
class FakeWorker:
    """Same contract as `evomerge.executors.worker.Worker`, no model: the recipe says what to do.

    recipe keys: value (metric = 2 * value), sleep (seconds), raise (message), exit (os._exit code).
    Writes `<marker_dir>/<number>.started` with its pid when a trial starts, so a test can kill it then.
    """

    def __init__(self, spec: WorkerSpec):
        self.spec = spec
        self.trials = 0

    def setup(self) -> None:
        if self.spec.option("die_in_setup"):
            os._exit(3)

    def run(self, job: TrialJob) -> TrialOutcome:
        start = time.time()
        marker = self.spec.option("marker_dir")
        if marker:
            Path(marker, f"{job.number}.started").write_text(str(os.getpid()))
        recipe = job.recipe
        if "exit" in recipe:
            os._exit(int(recipe["exit"]))
        time.sleep(float(recipe.get("sleep", 0.0)))
        if "raise" in recipe:
            raise RuntimeError(recipe["raise"])
        self.trials += 1
        return TrialOutcome(
            number=job.number,
            metrics={"fake": {"score": 2.0 * float(recipe.get("value", 0.0)), "trials": float(self.trials)}},
            error=None,
            timings={"total": time.time() - start, "start": start, "end": time.time()},
            node=socket.gethostname(),
            pid=os.getpid(),
            tag=job.tag,
        )


def fake_spec(**options) -> WorkerSpec:
    return WorkerSpec(sources=("unused",), base="unused", threads=1, options=tuple(sorted(options.items())))


def run_all(executor, jobs: list[TrialJob], timeout: float = 120.0) -> list[TrialOutcome]:
    """The search's loop: keep every slot busy, collect outcomes as they finish."""
    queue = list(jobs)
    outcomes: list[TrialOutcome] = []
    deadline = time.monotonic() + timeout
    in_flight = 0
    while queue or in_flight:
        while queue and in_flight < executor.slots:
            executor.submit(queue.pop(0))
            in_flight += 1
        done = executor.wait(timeout=max(0.0, deadline - time.monotonic()))
        in_flight -= len(done)
        outcomes.extend(done)
        assert time.monotonic() < deadline, "jobs did not finish in time"
    return outcomes


def default_sigint(cmd: list[str]) -> list[str]:
    """`cmd`, started with SIGINT at its default disposition, so that the Ctrl-C these tests send
    raises KeyboardInterrupt in it: a suite launched as a background job (`nohup ... &`, some CI
    runners) inherits SIGINT ignored, and a Python started that way never installs its handler."""
    return [sys.executable, "-c",
            "import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_DFL); os.execv(sys.argv[1], sys.argv[1:])",
            *cmd]


# --- the cluster --------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ray_cli(*args: str, timeout: float = 90) -> None:
    # Nodes started with `ray start` run their workers at Ray's default niceness 15, which starves them
    # beside any other busy process (a loaded CI machine); users give theirs normal priority the same way.
    env = {**os.environ, "RAY_worker_niceness": "0"}
    proc = subprocess.run([RAY, *args], capture_output=True, text=True, timeout=timeout, env=env)
    assert proc.returncode == 0, f"ray {' '.join(args)} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}"


@pytest.fixture(scope="module")
def cluster():
    """Two Ray nodes on this machine (head + worker, 1 CPU each); this process is the driver."""
    require_loopback_namespace()
    import ray

    port = _free_port()
    address = f"127.0.0.1:{port}"
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    # Actors import `test_ray:fingerprint_evaluator`; RayExecutor forwards PYTHONPATH to them.
    paths = [str(Path(__file__).parent), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    os.environ["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
    try:
        _ray_cli("start", "--head", f"--port={port}", "--num-cpus=1", "--include-dashboard=false",
                 "--disable-usage-stats")
        _ray_cli("start", f"--address={address}", "--num-cpus=1")
        ray.init(address=address, log_to_driver=False)
        ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # FakeWorker travels by value
        deadline = time.monotonic() + 60
        while sum(n["Alive"] for n in ray.nodes()) < 2:
            assert time.monotonic() < deadline, f"second node never joined: {ray.nodes()}"
            time.sleep(0.5)
        yield address
    finally:
        if ray.is_initialized():
            ray.shutdown()
        subprocess.run([RAY, "stop", "--force"], capture_output=True, timeout=120)


@pytest.fixture
def markers(tmp_path):
    d = tmp_path / "markers"
    d.mkdir()
    return d


def _wait_for(path: Path, timeout: float = 60.0) -> str:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < deadline, f"{path.name} never appeared"
        time.sleep(0.05)
    time.sleep(0.05)
    return path.read_text()


# --- fake-worker tests --------------------------------------------------------------------------------
def test_trials_run_in_parallel_on_both_nodes_and_match_in_process(cluster):
    from evomerge.executors.local import InProcessExecutor
    from evomerge.executors.ray_pool import RayExecutor

    jobs = [TrialJob(number=i, recipe={"value": i / 10, "sleep": 0.3}, split="search") for i in range(8)]
    spec = fake_spec()
    with RayExecutor(spec, workers=2, address=cluster, worker_cls=FakeWorker) as ex:
        assert ex.slots == 2
        nodes_at_start = {w["node"] for w in ex.workers()}
        outcomes = run_all(ex, jobs)
    assert len(nodes_at_start) == 2, f"the two actors should sit on two nodes, got {nodes_at_start}"
    assert sorted(o.number for o in outcomes) == list(range(8))
    assert all(o.ok for o in outcomes), [o.error for o in outcomes if not o.ok]
    assert {o.node for o in outcomes} == nodes_at_start  # every outcome says where it ran; both used
    assert len({o.pid for o in outcomes}) == 2

    # the two actors really overlapped in time (asynchronous, not one after the other)
    by_pid: dict[int, list[tuple[float, float]]] = {}
    for o in outcomes:
        by_pid.setdefault(o.pid, []).append((o.timings["start"], o.timings["end"]))
    (a, b) = by_pid.values()
    assert any(s1 < e2 and s2 < e1 for s1, e1 in a for s2, e2 in b)
    # each actor kept its state across trials (built once, reused): trial counters go 1..n per actor
    for pid in by_pid:
        counts = sorted(o.metrics["fake"]["trials"] for o in outcomes if o.pid == pid)
        assert counts == [float(i) for i in range(1, len(counts) + 1)]

    local = InProcessExecutor(spec, worker=FakeWorker(spec))
    expected = {o.number: o.metrics["fake"]["score"] for o in run_all(local, jobs)}
    assert {o.number: o.metrics["fake"]["score"] for o in outcomes} == expected


def test_killed_worker_fails_only_its_trial_and_is_replaced(cluster, markers):
    from evomerge.executors.ray_pool import RayExecutor

    jobs = [TrialJob(number=i, recipe={"value": i, "sleep": 0.2}, split="search") for i in range(6)]
    jobs[2] = TrialJob(number=2, recipe={"value": 2, "sleep": 60}, split="search")
    with RayExecutor(fake_spec(marker_dir=str(markers)), workers=2, address=cluster,
                     worker_cls=FakeWorker) as ex:
        pids_before = {w["pid"] for w in ex.workers()}
        queue, outcomes, killed = list(jobs), [], None
        t0 = time.monotonic()
        while queue or ex.in_flight:
            while queue and ex.in_flight < ex.slots:
                ex.submit(queue.pop(0))
            if killed is None and (markers / "2.started").exists():
                killed = int(_wait_for(markers / "2.started"))
                os.kill(killed, signal.SIGKILL)  # the worker process dies mid-trial
            outcomes.extend(ex.wait(timeout=0.5))
            assert time.monotonic() - t0 < 60, "the search stalled after a worker died"
        pids_after = {w["pid"] for w in ex.workers()}
        assert ex.slots == 2
    assert killed in pids_before
    by_number = {o.number: o for o in outcomes}
    assert sorted(by_number) == list(range(6)), "the budget is reached: every trial has an outcome"
    assert not by_number[2].ok and "died" in by_number[2].error, by_number[2].error
    assert all(by_number[i].ok for i in (0, 1, 3, 4, 5)), [o.error for o in outcomes]
    assert killed not in pids_after and len(pids_after) == 2, "the dead actor was replaced"


def test_trial_timeout_kills_and_replaces_the_worker(cluster):
    from evomerge.executors.ray_pool import RayExecutor

    jobs = [TrialJob(number=0, recipe={"value": 0, "sleep": 120}, split="search")]
    jobs += [TrialJob(number=i, recipe={"value": i, "sleep": 0.1}, split="search") for i in range(1, 5)]
    t0 = time.monotonic()
    # 5 s: far above a 0.1 s trial even on a loaded machine (setup time is not counted), far below 120 s
    with RayExecutor(fake_spec(), workers=2, address=cluster, worker_cls=FakeWorker, timeout=5.0) as ex:
        outcomes = run_all(ex, jobs, timeout=120)
        assert ex.slots == 2
    assert time.monotonic() - t0 < 90
    by_number = {o.number: o for o in outcomes}
    assert by_number[0].error.startswith("timeout:"), by_number[0].error
    assert all(by_number[i].ok for i in range(1, 5))


def test_worker_errors_become_failed_outcomes(cluster):
    from evomerge.executors.ray_pool import RayExecutor

    jobs = [
        TrialJob(number=0, recipe={"raise": "bad recipe"}, split="search"),
        TrialJob(number=1, recipe={"exit": 7}, split="search"),
        TrialJob(number=2, recipe={"value": 1}, split="search"),
        TrialJob(number=3, recipe={"value": 2}, split="search"),
    ]
    with RayExecutor(fake_spec(), workers=2, address=cluster, worker_cls=FakeWorker) as ex:
        outcomes = {o.number: o for o in run_all(ex, jobs)}
    assert "worker raised" in outcomes[0].error and "bad recipe" in outcomes[0].error
    assert "died" in outcomes[1].error, outcomes[1].error
    assert outcomes[2].ok and outcomes[3].ok
    assert outcomes[3].metrics["fake"]["score"] == 4.0


def test_worker_that_never_starts_fails_its_trial_after_setup_timeout(cluster):
    """A replacement actor that no node can host (as when its node is gone) must not leave its trial
    RUNNING forever: after `setup_timeout` the trial fails and the slot is tried again.

    The first actor gets all the time it needs to start (a loaded machine may take many seconds), so
    its trial dies of its own `exit`; only then is the limit cut to 3 s for the replacement."""
    from evomerge.executors.ray_pool import RayExecutor

    ex = RayExecutor(fake_spec(), workers=1, address=cluster, worker_cls=FakeWorker, setup_timeout=300.0)
    try:
        # from now on, new actors ask for a resource no node has (white-box: simulates a lost node)
        ex.actor_options["resources"] = {"no_such_node": 1}
        ex.submit(TrialJob(number=0, recipe={"exit": 1}, split="search"))
        first = ex.wait(timeout=300)[0].error
        assert "died" in first, first
        ex.setup_timeout = 3.0
        ex.submit(TrialJob(number=1, recipe={"value": 1}, split="search"))
        t0 = time.monotonic()
        (outcome,) = ex.wait(timeout=120)
        assert "not ready after" in outcome.error, outcome.error
        assert 2.5 < time.monotonic() - t0 < 60
        assert ex.slots == 1  # replaced (again), not retired yet: 2 deaths < max_deaths
    finally:
        ex.close()


def test_more_workers_than_the_cluster_can_place_is_a_clear_error(cluster):
    from evomerge.errors import EvomergeError
    from evomerge.executors.ray_pool import RayExecutor

    t0 = time.monotonic()
    with pytest.raises(EvomergeError, match=r"only [0-2] of 3 Ray workers started .*each needs 1 CPU.*CPU 2"):
        RayExecutor(fake_spec(), workers=3, address=cluster, worker_cls=FakeWorker, start_timeout=5.0)
    assert time.monotonic() - t0 < 30  # a clear error, not a hang


def test_slot_retired_when_workers_keep_dying(cluster):
    from evomerge.errors import EvomergeError
    from evomerge.executors.ray_pool import RayExecutor

    with RayExecutor(fake_spec(die_in_setup=True), workers=1, address=cluster, worker_cls=FakeWorker,
                     max_deaths=2) as ex:
        ex.submit(TrialJob(number=0, recipe={"value": 1}, split="search"))
        first = ex.wait(timeout=60)
        assert len(first) == 1 and "died" in first[0].error
        assert ex.slots == 1  # replaced once
        ex.submit(TrialJob(number=1, recipe={"value": 1}, split="search"))
        second = ex.wait(timeout=60)
        assert "retired" in second[0].error
        assert ex.slots == 0
        with pytest.raises(EvomergeError, match="died 2 times in a row"):
            ex.wait(timeout=1)


# --- a separate driver process: the local default and Ctrl-C -----------------------------------------
DRIVER = textwrap.dedent(
    """
    import json, os, socket, sys, time
    from evomerge.executors.worker import TrialJob, TrialOutcome, WorkerSpec
    from evomerge.executors.ray_pool import RayExecutor

    class Sleeper:
        def __init__(self, spec):
            self.spec = spec
        def run(self, job):
            time.sleep(job.recipe["sleep"])
            return TrialOutcome(job.number, {"t": {"v": float(job.number)}}, None, {}, socket.gethostname(),
                                os.getpid())

    spec = WorkerSpec(sources=("x",), base="x", threads=1)
    ex = RayExecutor(spec, workers=2, worker_cls=Sleeper)  # no address: a local Ray, no set-up
    import ray
    try:
        for i in range(2):
            ex.submit(TrialJob(number=i, recipe={"sleep": 0.2}, split="search"))
        done = []
        while len(done) < 2:
            done += ex.wait()
        print(json.dumps({"done": sorted(o.number for o in done), "cpus": ray.cluster_resources().get("CPU"),
                          "nodes": len(ray.nodes()), "loopback": os.environ.get("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"),
                          "addresses": [n["NodeManagerAddress"] for n in ray.nodes()]}), flush=True)
        for i in range(2, 4):
            ex.submit(TrialJob(number=i, recipe={"sleep": 120}, split="search"))
        print(json.dumps({"busy": [w["pid"] for w in ex.workers()]}), flush=True)
        while True:
            ex.wait()
    except KeyboardInterrupt:
        print(json.dumps({"interrupted": True}), flush=True)
        raise
    finally:
        ex.close()
        print(json.dumps({"closed": True, "ray_up": ray.is_initialized()}), flush=True)
    """
)


def test_local_default_runs_and_ctrl_c_stops_cleanly(tmp_path):
    require_loopback_namespace()
    script = tmp_path / "driver.py"
    script.write_text(DRIVER)
    proc = subprocess.Popen(default_sigint([sys.executable, str(script)]), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        first = json.loads(proc.stdout.readline() or "{}")
        assert first.get("done") == [0, 1], proc.stderr.read()[-3000:] if not first else first
        assert first["nodes"] == 1 and first["cpus"] >= 2  # its own local Ray, not the test cluster
        # bound to loopback by the executor itself (outside a namespace too: the setting Ray reads for it)
        assert first["loopback"] == "0" and first["addresses"] == ["127.0.0.1"], first
        pids = json.loads(proc.stdout.readline())["busy"]
        # the workers run at the driver's priority, not Ray's default niceness 15 (starved when busy)
        driver_nice = os.getpriority(os.PRIO_PROCESS, proc.pid)
        assert [os.getpriority(os.PRIO_PROCESS, pid) for pid in pids] == [driver_nice] * 2
        time.sleep(1.0)  # both workers are mid-trial now
        t0 = time.monotonic()
        proc.send_signal(signal.SIGINT)  # Ctrl-C
        out, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    # ~3 s on an idle machine; the bound leaves room for a machine many times slower (CI under load)
    assert time.monotonic() - t0 < 90, "Ctrl-C should stop the driver promptly"
    lines = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    assert lines == [{"interrupted": True}, {"closed": True, "ray_up": False}], (out, err[-2000:])
    assert "KeyboardInterrupt" in err
    deadline = time.monotonic() + 20
    while any(_alive(p) for p in pids):  # the busy workers did not outlive the driver
        assert time.monotonic() < deadline, f"worker processes {pids} outlived the driver"
        time.sleep(0.2)


def test_close_mid_trial_kills_the_workers(cluster):
    """On a cluster that outlives the driver, close() itself must end the busy actors."""
    from evomerge.executors.ray_pool import RayExecutor

    ex = RayExecutor(fake_spec(), workers=2, address=cluster, worker_cls=FakeWorker)
    pids = [w["pid"] for w in ex.workers()]
    for i in range(2):
        ex.submit(TrialJob(number=i, recipe={"sleep": 120}, split="search"))
    assert ex.wait(timeout=1.0) == []
    ex.close()
    ex.close()  # idempotent
    deadline = time.monotonic() + 20
    while any(_alive(p) for p in pids):
        assert time.monotonic() < deadline, f"worker processes {pids} still running after close()"
        time.sleep(0.2)
    with pytest.raises(RuntimeError, match="closed"):
        ex.submit(TrialJob(number=3, recipe={}, split="search"))


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except FileNotFoundError:
        return False


# --- the real Worker on the toy family ----------------------------------------------------------------
class FingerprintEvaluator:
    """The real lm-eval evaluator, plus a fingerprint of the resident model (sum of its weights and of
    its logits on fixed input, in float64), so "Ray equals in-process" is checked to the last bit and not
    only through exact-match rates. Loaded by the actors as `test_ray:fingerprint_evaluator`."""

    def __init__(self, spec: WorkerSpec):
        from transformers import AutoTokenizer

        from evomerge.evaluation.evaluate import LMEvalEvaluator
        from evomerge.evaluation.protocol import ScoringProtocol, SplitSpec

        tok = AutoTokenizer.from_pretrained(spec.tokenizer or spec.base)
        self.inner = LMEvalEvaluator(
            tok, list(spec.tasks), spec.include_path, batch_size=spec.batch_size,
            splits=SplitSpec.model_validate(spec.splits) if spec.splits else None,
            protocol=ScoringProtocol.model_validate(spec.protocol) if spec.protocol else None)

    def sizes(self, split):
        return self.inner.sizes(split)

    def evaluate(self, model, split, *, limit=None, seed=0):
        import torch

        result = self.inner.evaluate(model, split, limit=limit, seed=seed)
        with torch.no_grad():
            weights = sum(float(p.double().sum()) for p in model.parameters())
            ids = (torch.arange(24) * 7 % 200 + 3).unsqueeze(0)
            logits = float(model(ids).logits.double().sum())
        result.metrics["fingerprint"] = {"weights": weights, "logits": logits}
        if self.inner.splits.mode == "carve":  # how many items this split has, as the actor carved it
            result.metrics["fingerprint"]["split_items"] = float(sum(self.inner.sizes(split).values()))
        return result


def fingerprint_evaluator(spec: WorkerSpec) -> FingerprintEvaluator:
    return FingerprintEvaluator(spec)


@pytest.fixture(scope="module")
def toy_family():
    """The toy family shipped inside the package."""
    from evomerge.toy import family as toy

    return toy.family()


def toy_spec(fam) -> WorkerSpec:
    sources = (str(fam.base),) + tuple(str(p) for p in fam.experts.values())
    return WorkerSpec(
        sources=sources,
        base=str(fam.base),
        tokenizer=str(fam.tokenizer),
        tasks=tuple(f"toy_{s}" for s in fam.skills),
        include_path=str(fam.tasks_dir),
        threads=1,
        evaluator="test_ray:fingerprint_evaluator",
    )


def toy_recipes(fam) -> list[dict]:
    base = str(fam.base)
    add, rev = (str(fam.experts[s]) for s in fam.skills[:2])
    return [
        {"merge_method": "linear", "models": [{"model": base, "parameters": {"weight": 1.0}},
                                              {"model": add, "parameters": {"weight": 0.5}},
                                              {"model": rev, "parameters": {"weight": 0.5}}]},
        {"merge_method": "slerp", "base_model": base, "models": [{"model": base}, {"model": add}],
         "parameters": {"t": [0.1, 0.6, 0.9]}},
        {"merge_method": "ties", "base_model": base,
         "models": [{"model": add, "parameters": {"weight": 0.7, "density": 0.5}},
                    {"model": rev, "parameters": {"weight": 0.6, "density": 0.7}}]},
        {"merge_method": "dare_ties", "base_model": base, "random_seed": 3,
         "models": [{"model": add, "parameters": {"weight": 0.8, "density": 0.4}},
                    {"model": rev, "parameters": {"weight": 0.8, "density": 0.4}}]},
        {"merge_method": "task_arithmetic", "base_model": base,
         "models": [{"model": add, "parameters": {"weight": 1.0}},
                    {"model": rev, "parameters": {"weight": 0.3}}]},
        {"merge_method": "linear", "models": [{"model": add, "parameters": {"weight": 0.5}},
                                              {"model": rev, "parameters": {"weight": 0.5}}]},
    ]


def test_real_workers_on_two_nodes_equal_in_process(cluster, toy_family):
    from evomerge.executors.local import InProcessExecutor
    from evomerge.executors.ray_pool import RayExecutor

    spec = toy_spec(toy_family)
    jobs = [TrialJob(number=i, recipe=r, split="search", limit=16, seed=1)
            for i, r in enumerate(toy_recipes(toy_family))]
    with RayExecutor(spec, workers=2, address=cluster, timeout=120) as ex:
        remote = {o.number: o for o in run_all(ex, jobs, timeout=hang_guard(90))}  # a guard against hangs only
    assert all(o.ok for o in remote.values()), {n: o.error for n, o in remote.items() if not o.ok}
    assert len({o.node for o in remote.values()}) == 2, "trials should have run on both nodes"

    local = InProcessExecutor(spec)
    here = {o.number: o for o in run_all(local, jobs, timeout=hang_guard(90))}
    assert all(o.ok for o in here.values()), {n: o.error for n, o in here.items() if not o.ok}
    for n in here:
        assert remote[n].metrics == here[n].metrics, f"trial {n}: Ray and in-process results differ"
    fingerprints = {n: o.metrics["fingerprint"]["weights"] for n, o in here.items()}
    assert len(set(fingerprints.values())) == len(jobs), "the recipes should give distinct models"
    scores = [v["exact_match"] for o in here.values() for t, v in o.metrics.items() if t != "fingerprint"]
    assert len(set(scores)) > 2, f"lm-eval scores should vary between recipes and tasks: {scores}"


def test_carved_splits_and_fewshot_on_ray_equal_in_process(cluster, toy_family, tmp_path):
    """Carved splits and a 2-shot protocol travel to the actors with the spec: a generation task over
    one JSONL file and a multiple-choice copy of arc_easy (mc_easy) give the same scores, item counts and model
    on two Ray nodes as in process, on the search and the select split."""
    from localtasks import write_tasks

    from evomerge.executors.local import InProcessExecutor
    from evomerge.executors.ray_pool import RayExecutor
    from evomerge.search.jobs import worker_spec
    from evomerge.search.spacefile import load_space

    tasks = write_tasks(tmp_path / "tasks")
    space = tmp_path / "space.yaml"
    space.write_text(textwrap.dedent(f"""
        name: ray_carved
        models: [toy:up, toy:rev]
        method: slerp
        parameters: {{slerp: {{t: {{low: 0.0, high: 1.0}}}}}}
        objective:
          tasks_dir: {tasks}
          tasks: [{{task: my_up, metric: exact_match}}, {{task: mc_easy, metric: acc_norm}}]
          splits: {{carve: {{search: 0.5, select: 0.3, report: 0.2}}, seed: 7}}
          protocol: {{num_fewshot: 2, batch_size: 8}}
        """))
    sp = load_space(space)
    assert sp.objective.splits.mode == "carve"
    spec = replace(worker_spec(sp, threads=1), evaluator="test_ray:fingerprint_evaluator")
    up, rev = (str(toy_family.experts[s]) for s in ("up", "rev"))
    recipes = [{"merge_method": "slerp", "base_model": up, "models": [{"model": up}, {"model": rev}],
                "parameters": {"t": t}} for t in (0.2, 0.7)]
    jobs = [TrialJob(number=i, recipe=r, split=split, limit=12, seed=1)
            for i, (r, split) in enumerate((r, s) for r in recipes for s in ("search", "select"))]
    with RayExecutor(spec, workers=2, address=cluster, timeout=120) as ex:
        remote = {o.number: o for o in run_all(ex, jobs, timeout=hang_guard(90))}
    assert all(o.ok for o in remote.values()), {n: o.error for n, o in remote.items() if not o.ok}
    here = {o.number: o for o in run_all(InProcessExecutor(spec), jobs, timeout=hang_guard(90))}
    assert all(o.ok for o in here.values()), {n: o.error for n, o in here.items() if not o.ok}
    for n in here:
        assert remote[n].metrics == here[n].metrics, f"job {n}: Ray and in-process results differ"
        assert set(here[n].metrics) == {"my_up", "mc_easy", "fingerprint"}
    carved = {split: sum(FingerprintEvaluator(spec).sizes(split).values()) for split in ("search", "select")}
    assert carved["search"] > carved["select"] > 0 and carved["search"] < 150 + 60
    for n, job in enumerate(jobs):
        assert remote[n].metrics["fingerprint"]["split_items"] == carved[job.split]
    # search and select are different items: the same model scores differently on them somewhere
    assert any(here[2 * i].metrics != here[2 * i + 1].metrics for i in range(2))


def test_cli_search_on_two_nodes_survives_ctrl_c_and_resumes(cluster, toy_family, tmp_path):
    """`evomerge search --ray-address` end to end: Ctrl-C mid-search stops it promptly and gives the
    cluster its CPUs back; the same command then resumes and finishes the budget; every trial is
    COMPLETE (none left RUNNING) and the trials ran on both nodes, as each trial's attributes record."""
    import optuna
    import ray

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    first, second = toy_family.skills[:2]
    one, two = toy_family.experts[first], toy_family.experts[second]
    budget = 30  # large enough that Ctrl-C after 2 trials lands mid-run even on an idle machine
    space = tmp_path / "space.yaml"
    space.write_text(textwrap.dedent(f"""
        name: ray_cli
        models: [{one}, {two}]
        base_model: {toy_family.base}
        dtype: float32
        method: linear
        parameters:
          linear:
            weight: {{low: 0.0, high: 1.0}}
        objective:
          tasks_dir: {toy_family.tasks_dir}
          tasks: [toy_{first}, toy_{second}]
          splits: {{search: search, select: select, report: report}}
        search: {{trials: {budget}, seed: 0, top_k: 1, limit: 8}}
        """))
    out = tmp_path / "run"
    storage = f"sqlite:///{out / 'study.db'}"
    command = [str(Path(sys.executable).with_name("evomerge")), "search", str(space), "--out", str(out),
               "--ray-address", cluster, "--workers", "2", "--threads-per-worker", "1",
               "--trial-timeout", "120", "--no-progress"]

    def states() -> list:
        try:
            return [t.state for t in optuna.load_study(study_name=None, storage=storage).get_trials()]
        except Exception:  # noqa: BLE001 - not created yet
            return []

    first = subprocess.Popen(default_sigint(command), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + hang_guard(90)  # a guard against hangs only
        while states().count(optuna.trial.TrialState.COMPLETE) < 2:
            assert first.poll() is None, first.communicate()[1][-3000:]
            assert time.monotonic() < deadline, "no trial completed in time"
            time.sleep(0.5)
        first.send_signal(signal.SIGINT)  # Ctrl-C, with trials in flight
        t0 = time.monotonic()
        _, err = first.communicate(timeout=300)
    finally:
        if first.poll() is None:
            first.kill()
    assert time.monotonic() - t0 < 90 and first.returncode == 130, (first.returncode, err[-3000:])
    done_before = states().count(optuna.trial.TrialState.COMPLETE)
    assert done_before < budget, "the interrupted run should not have finished the budget"
    deadline = time.monotonic() + 30
    while ray.available_resources().get("CPU", 0) < 2:  # its workers are gone, the CPUs are free again
        assert time.monotonic() < deadline, f"CPUs not released: {ray.available_resources()}"
        time.sleep(0.5)

    second = subprocess.run(command, capture_output=True, text=True, timeout=hang_guard(90))
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    trials = optuna.load_study(study_name=None, storage=storage).get_trials()
    complete = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(complete) >= budget, [(t.number, t.state) for t in trials]
    assert not [t for t in trials if t.state == optuna.trial.TrialState.RUNNING], "a trial stayed RUNNING"
    nodes = {t.user_attrs["timings"]["worker"].rsplit(":", 1)[0] for t in complete}
    assert len(nodes) == 2, f"trials should have run on both nodes, got {nodes}"


def test_batch_mode_gives_the_same_trials_on_two_workers_twice_and_in_process(cluster, toy_family, tmp_path):
    """`--batch`: the same seed gives the same trials (parameters and values) with two Ray workers, twice,
    and in process, although the workers finish in whatever order they happen to."""
    from evomerge.search.run import run_search
    from evomerge.search.spacefile import load_space

    first, second = toy_family.skills[:2]
    space_file = tmp_path / "space.yaml"
    space_file.write_text(textwrap.dedent(f"""
        name: ray_batch
        models: [toy:{first}, toy:{second}]
        base_model: toy:base
        method: task_arithmetic
        parameters:
          task_arithmetic:
            weight: {{low: 0.0, high: 1.0}}
        objective:
          tasks_dir: toy
          tasks: [toy_{first}, toy_{second}]
          splits: {{search: search, select: select, report: report}}
        search: {{trials: 10, seed: 4, sampler: tpe, limit: 8, batch: 2}}
        """))
    space = load_space(space_file)
    runs = []
    for i, ray_options in enumerate([{"workers": 2, "ray_address": cluster}] * 2 + [{}]):
        result = run_search(space, tmp_path / f"run{i}", progress=False, select=False, write=False, evidence=False,
                            threads_per_worker=1, trial_timeout=300, **ray_options)
        runs.append([(t.params, t.state, t.values) for t in result.study.trials])
        if ray_options:
            nodes = {t.user_attrs["timings"]["worker"].rsplit(":", 1)[0] for t in result.study.trials}
            assert len(nodes) == 2, nodes
    assert len(runs[0]) == 10 and runs[0] == runs[1] == runs[2]
