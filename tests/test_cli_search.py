"""`evomerge search` end to end on the embedded toy family, with the real merge engine and lm-eval.

- a small search beats the uniform-weights baseline on the select split;
- best.yaml -> `evomerge merge` -> exactly the tensors that were scored, and the same score again;
- a run killed with SIGKILL after k trials resumes with the same command, completes the budget, and
  redoes no finished trial;
- a planted bad candidate becomes a FAIL trial and the search finishes;
- user mistakes exit 2 before any heavy work.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import optuna
import pytest

from evomerge.cli import main
from evomerge.search.study import load_run_study
from guards import hang_guard, wait_while_progressing

ROOT = Path(__file__).resolve().parents[1]
EVOMERGE = [sys.executable, "-m", "evomerge.cli"]


def env() -> dict:
    e = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    return e


def space_file(tmp_path: Path, body: str, name: str = "space.yaml") -> Path:
    p = tmp_path / name
    p.write_text(textwrap.dedent(body))
    return p


SLERP = """
name: e2e_slerp
models: [toy:up, toy:rev]
method: slerp
parameters:
  slerp:
    t: {points: 2}
objective:
  tasks_dir: toy
  tasks: [toy_up, toy_rev]
search: {trials: 16, seed: 0, limit: 48, top_k: 3}
"""

# Task arithmetic over the four experts, one weight each, on the whole mixture: the baseline (0.5 each,
# i.e. twice the average task vector) is far from the optimum (up/next experts near 1, rev/sort lower;
# docs/toy_family.md), so even a small search must find a clearly better recipe.
TASK_ARITHMETIC = """
name: e2e
models: [toy:up, toy:rev, toy:next, toy:sort]
base_model: toy:base
method: task_arithmetic
parameters:
  task_arithmetic:
    weight: {low: 0.0, high: 1.0}
objective:
  tasks_dir: toy
  tasks: [toy_up, toy_rev, toy_next, toy_sort]
search: {trials: 10, seed: 0, limit: 48, top_k: 3, sampler: tpe}
"""


def load(out: Path):
    return load_run_study(f"sqlite:///{out / 'study.db'}")


@pytest.fixture(scope="module")
def e2e(tmp_path_factory):
    """One small search on the toy family, in-process through the CLI entry point."""
    tmp = tmp_path_factory.mktemp("e2e")
    space = space_file(tmp, TASK_ARITHMETIC)
    out = tmp / "run"
    t0 = time.perf_counter()
    assert main(["search", str(space), "--out", str(out), "--no-progress"]) == 0
    return {"space": space, "out": out, "seconds": time.perf_counter() - t0}


@pytest.mark.slow
def test_search_beats_uniform_on_select(e2e):
    study = load(e2e["out"])
    select = {int(k): v for k, v in study.user_attrs["select_scores"].items()}
    baseline = next(t.number for t in study.trials if t.user_attrs.get("role") == "baseline:task_arithmetic")
    winner = study.user_attrs["winner"]
    assert winner != baseline, "the search found nothing better than the uniform weights"
    assert select[winner]["score"] > select[baseline]["score"] + 0.04  # measured: 0.761 vs 0.692
    report = (e2e["out"] / "report.md").read_text()
    assert "parent:up" in report and "baseline:task_arithmetic" in report


@pytest.mark.slow
def test_best_yaml_merges_to_the_scored_tensors_and_score(e2e, tmp_path):
    import torch
    from safetensors.torch import load_file

    from evomerge.evaluation.evaluate import LMEvalEvaluator
    from evomerge.engine.recipe import load_recipe
    from evomerge.search.score import mixture
    from evomerge.search.jobs import worker_spec
    from evomerge.search.spacefile import load_space
    from evomerge.executors.worker import Worker

    out = e2e["out"]
    merged = tmp_path / "merged"
    assert main(["merge", str(out / "best.yaml"), str(merged), "--no-progress"]) == 0
    # the candidate as the search scored it: the worker's resident model after merge_into
    space = load_space(e2e["space"])
    worker = Worker(worker_spec(space))
    worker.setup()
    worker.merge(load_recipe(out / "best.yaml").to_dict())
    scored = {k: v for k, v in worker.model.state_dict().items()}
    on_disk = {}
    for f in sorted(merged.glob("*.safetensors")):
        on_disk.update(load_file(f))
    for name, tensor in on_disk.items():
        assert torch.equal(scored[name], tensor), name
    # reloaded from disk and re-evaluated: the same select score
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32).eval()
    evaluator = LMEvalEvaluator(AutoTokenizer.from_pretrained(merged), [t.task for t in space.objective.tasks],
                                space.objective.tasks_dir)
    study = load(out)
    expected = study.user_attrs["select_scores"][str(study.user_attrs["winner"])]["score"]
    got = mixture(evaluator.evaluate(model, "select"), space.objective, "select")
    assert got == expected


def _completed(out: Path) -> int:
    try:
        return sum(t.state == optuna.trial.TrialState.COMPLETE for t in load(out).trials)
    except Exception:  # noqa: BLE001 - the database does not exist yet
        return 0


@pytest.mark.slow
def test_resume_after_sigkill_completes_budget_without_duplicates(tmp_path):
    space = space_file(tmp_path, SLERP.replace("trials: 16", "trials: 8").replace("limit: 48", "limit: 24"))
    out = tmp_path / "run"
    cmd = EVOMERGE + ["search", str(space), "--out", str(out), "--no-progress"]
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.time() + hang_guard(60)
    while _completed(out) < 3 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    assert proc.poll() is None, proc.stdout.read().decode()[-2000:]
    proc.send_signal(signal.SIGKILL)  # a real, unclean interrupt
    proc.wait()
    before = {t.number: t for t in load(out).trials if t.state == optuna.trial.TrialState.COMPLETE}
    assert 3 <= len(before) < 8
    # the resumed run is waited on while its trials keep finishing, not against a clock
    done = subprocess.Popen(cmd, cwd=tmp_path, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    code = wait_while_progressing(done, lambda: (_completed(out), (out / "best.yaml").exists()), stall=hang_guard(60))
    assert code == 0, done.stdout.read()[-3000:]
    study = load(out)
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(complete) == 8
    for number, t in before.items():  # finished trials kept, never redone
        assert study.trials[number].state == optuna.trial.TrialState.COMPLETE
        assert study.trials[number].value == t.value
    assert len({json.dumps(t.params, sort_keys=True) for t in complete}) == 8
    running = [t for t in study.trials if t.state == optuna.trial.TrialState.RUNNING]
    assert running == []
    assert (out / "best.yaml").is_file()


@pytest.mark.slow
def test_planted_bad_candidate_fails_and_search_finishes(tmp_path):
    # density 0 is outside TIES's valid range (0, 1]: the engine refuses that candidate
    space = space_file(tmp_path, """
        name: planted
        models: [toy:up, toy:rev]
        base_model: toy:base
        method: ties
        parameters:
          ties: {density: {low: 0.1, high: 1.0}, weight: 0.5}
        objective: {tasks_dir: toy, tasks: [toy_up, toy_rev]}
        search: {trials: 4, seed: 0, limit: 8, top_k: 1, sampler: random}
        """)
    from evomerge.search.run import run_search
    from evomerge.search.spacefile import load_space

    s = load_space(space)
    out = tmp_path / "run"
    from evomerge.search.study import create_study, default_storage

    out.mkdir()
    study, _ = create_study(s, default_storage(out))
    study.enqueue_trial({"ties.density.up": 0.5, "ties.density.rev": 0.0})
    result = run_search(s, out, progress=False)
    fails = [t for t in result.study.trials if t.state == optuna.trial.TrialState.FAIL]
    assert len(result.study.trials) == 4 and len(fails) == 1
    assert "density" in fails[0].user_attrs["fail_reason"]
    assert result.winner is not None and (out / "best.yaml").is_file()


def test_user_mistakes_exit_2_fast(tmp_path):
    bad = space_file(tmp_path, SLERP.replace("points: 2", "pionts: 2"))
    t0 = time.perf_counter()
    r = subprocess.run(EVOMERGE + ["search", str(bad), "--out", str(tmp_path / "o")], env=env(),
                       capture_output=True, text=True, timeout=hang_guard(20))
    assert r.returncode == 2
    assert "parameters.slerp.t.pionts" in r.stderr and "did you mean 'points'" in r.stderr
    missing = subprocess.run(EVOMERGE + ["search", str(tmp_path / "nope.yaml")], env=env(), capture_output=True,
                             text=True, timeout=hang_guard(20))
    assert missing.returncode == 2 and "not found" in missing.stderr
    trials0 = subprocess.run(EVOMERGE + ["search", str(space_file(tmp_path, SLERP, "ok.yaml")), "--trials", "0"],
                             env=env(), capture_output=True, text=True, timeout=hang_guard(20))
    assert trials0.returncode == 2 and "--trials" in trials0.stderr
    assert time.perf_counter() - t0 < 60
    assert not (tmp_path / "o").exists()  # nothing was created before the error


def test_resuming_a_finished_run_shows_its_result_and_keeps_its_times(tmp_path, capsys, monkeypatch):
    """The same command again on a finished run: no pre-flight, nothing scored, the stored result printed;
    report.md keeps the wall time the search took (not the second's), with its stages."""
    import re

    import evomerge.search.run as run_module

    space = space_file(tmp_path, SLERP.replace("limit: 48", "limit: 8").replace("top_k: 3", "top_k: 1"))
    out = tmp_path / "run"
    argv = ["search", str(space), "--out", str(out), "--no-progress", "--trials", "3"]
    assert main(argv) == 0
    first = (out / "report.md").read_text()
    capsys.readouterr()

    def no_preflight(*args, **kwargs):
        raise AssertionError("a finished run needs no pre-flight")

    monkeypatch.setattr(run_module, "preflight", no_preflight)
    assert main(argv) == 0
    said = capsys.readouterr().out
    assert "finished its budget and its report" in said and "(winner)" in said
    wall = re.compile(r"wall time: ([\d.]+ s) \(pre-flight [\d.]+ s, trials [\d.]+ s, select and report [\d.]+ s\)")
    assert wall.search(first) and wall.search(first).group(0) == wall.search((out / "report.md").read_text()).group(0)
    assert load(out).user_attrs["wall_seconds"]["invocations"] == 1


def test_cli_resume_keeps_settings_and_guards_the_report(tmp_path, capsys):
    """Through the CLI: a re-run without flags keeps the study's --trials and --sampler (the file says
    otherwise), says so and re-scores nothing; --trials more after the report is exit 2 naming
    --reopen-report, and the study is unchanged."""
    space = space_file(tmp_path, SLERP.replace("limit: 48", "limit: 8").replace("top_k: 3", "top_k: 1"))
    out = tmp_path / "run"
    assert main(["search", str(space), "--out", str(out), "--no-progress", "--trials", "3", "--sampler", "random"]) == 0
    capsys.readouterr()
    assert main(["search", str(space), "--out", str(out), "--no-progress"]) == 0
    said = capsys.readouterr().out
    assert "resumed with the study's trials 3 (the space file says 16; pass --trials 16" in said
    assert "resumed with the study's sampler random" in said
    assert len(load(out).trials) == 3
    assert main(["search", str(space), "--out", str(out), "--no-progress", "--trials", "5"]) == 2
    err = capsys.readouterr().err
    assert "report split of this run was already evaluated" in err and "--reopen-report" in err
    assert len(load(out).trials) == 3


def test_one_clean_display_with_progress_for_select_and_report(tmp_path):
    """stderr holds the search's own bars only (trials, then select and report candidates, each with
    done/total and best so far): no transformers 'Loading weights', no datasets 'Generating' bar."""
    out = tmp_path / "run"
    r = subprocess.run(EVOMERGE + ["search", str(ROOT / "search_spaces" / "toy_carved.yaml"), "--trials", "2",
                                   "--limit", "8", "--top-k", "1", "--out", str(out)],
                       cwd=ROOT, env=env(), capture_output=True, text=True, timeout=hang_guard(60))
    assert r.returncode == 0, r.stderr[-3000:]
    lines = [x.strip() for x in r.stderr.replace("\r", "\n").splitlines() if x.strip()]
    phases = ("pre-flight", "search", "naive (search)", "select", "report", "membership")
    assert lines and all(x.split(":")[0] in phases for x in lines), lines
    for bar in ("pre-flight: 100%", "search: 100%", "select: 100%", "report: 100%"):
        assert any(x.startswith(bar) for x in lines), (bar, lines)
    # tqdm writes candidate/s, or s/candidate when slower than one a second: the unit either way
    assert any(x.startswith("report: 100%") and "candidate" in x and "best=" in x for x in lines), lines


@pytest.mark.parametrize("flags, message", [
    (["--trial-timeout", "0"], "--trial-timeout must be a positive number"),
    (["--threads-per-worker", "0"], "--threads-per-worker must be at least 1"),
    (["--storage", "nonsense://x"], "not a usable database URL"),
    (["--storage", "postgresql://user@host/db"], "not a usable database URL"),
    (["--workers", "0"], "--workers must be at least 1"),
])
def test_bad_flags_exit_2_before_anything_is_written(tmp_path, capsys, flags, message):
    out = tmp_path / "run"
    assert main(["search", str(space_file(tmp_path, SLERP)), "--out", str(out), "--no-progress", *flags]) == 2
    err = capsys.readouterr().err
    assert message in err and flags[0] in err, err
    assert not out.exists()


@pytest.mark.parametrize("change, message", [
    (("models: [toy:up, toy:rev]", "models: [toy:up, toy:rev, toy:next]"), "slerp takes exactly 2 input models"),
    (("search: {", "search: {trials: 3}\nsearch: {"), "key 'search' is given twice"),
])
def test_space_mistakes_exit_2_before_anything_is_written(tmp_path, capsys, change, message):
    out = tmp_path / "run"
    space = space_file(tmp_path, SLERP.replace(*change))
    assert main(["search", str(space), "--out", str(out), "--no-progress"]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()
