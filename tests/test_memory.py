"""The memory plan (engine/memory.py, search/memory.py) against measured runs (issue 27).

`evomerge validate` prints the RAM a merge will need; this checks that figure against the peak memory of
a real `evomerge merge` of the same recipe, in a child process, at a small size where the working set
(not the process's fixed cost) is a large share: fp32 Llama-shaped models with a 32000-token vocabulary,
so the embedding and lm_head rows dominate and TIES's sort scratch is several times the model.

What is compared: the child's peak anonymous memory (heap: what cannot be given back) sampled from
/proc every few milliseconds, and its true peak RSS (ru_maxrss, which also counts the source files'
mapped pages, i.e. page cache). The plan must not be below the anonymous peak (minus a small slack for
the sampling) and must not be far above the whole RSS peak. Memory, not time: robust on a busy machine.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from evomerge.cli import main
from evomerge.engine.merge import recipe_memory

MB = 2**20
# A plan below the measured heap peak by more than this is wrong (the sampling can only miss a peak,
# never invent one, so a small slack is enough).
BELOW_SLACK = 0.05
# A plan above the measured RSS peak (heap + mapped sources) by more than this is useless as a guide.
ABOVE_FACTOR = 1.35

# ru_maxrss keeps the forking process's peak as a floor (fork + exec), so the merge is started by a tiny
# `python -I -S` wrapper (~10 MB) that reports the merge's own rusage and samples its /proc/PID/status.
_WRAPPER = r"""
import json, os, sys, threading
res, cmd = sys.argv[1], sys.argv[2:]
peak = {"RssAnon": 0, "RssFile": 0}
done = threading.Event()
def poll(pid):
    while not done.is_set():
        try:
            with open("/proc/%d/status" % pid) as fh:
                for line in fh:
                    k = line.split(":")[0]
                    if k in peak:
                        peak[k] = max(peak[k], int(line.split()[1]))
        except (OSError, ValueError, IndexError):
            pass
        done.wait(0.002)
pid = os.posix_spawn(cmd[0], cmd, os.environ)
threading.Thread(target=poll, args=(pid,), daemon=True).start()
_, status, ru = os.wait4(pid, 0)
done.set()
json.dump({"maxrss_kb": ru.ru_maxrss, "anon_kb": peak["RssAnon"], "file_kb": peak["RssFile"],
           "rc": os.waitstatus_to_exitcode(status)}, open(res, "w"))
"""

RECIPES = {
    "ties": """merge_method: ties
base_model: {base}
models:
  - model: {e0}
    parameters: {{weight: 0.5, density: 0.5}}
  - model: {e1}
    parameters: {{weight: 0.5, density: 0.5}}
dtype: float32
""",
    "linear": """merge_method: linear
models:
  - model: {base}
    parameters: {{weight: 0.4}}
  - model: {e0}
    parameters: {{weight: 0.3}}
  - model: {e1}
    parameters: {{weight: 0.3}}
dtype: float32
""",
}


@pytest.fixture(scope="module")
def wide_family(tmp_path_factory):
    """base + 2 experts, fp32, 18M parameters (72 MB each), 16M of them in the two 32000-row matrices."""
    from tinymodels import build_family

    return build_family(tmp_path_factory.mktemp("wide"), vocab=32000, hidden=256, layers=2, intermediate=512,
                        heads=4, kv_heads=4, noise=0.01, tokenizer=False)


def measure_merge(recipe: Path, out: Path) -> dict:
    """Peak memory of `evomerge merge RECIPE OUT` in a fresh process (MiB)."""
    res = out.parent / (out.name + ".rusage.json")
    cmd = [str(Path(sys.executable).parent / "evomerge"), "merge", str(recipe), str(out), "--no-progress"]
    env = dict(os.environ, HF_HUB_OFFLINE="1", EVOMERGE_MERGE_THREADS="2")
    done = subprocess.run([sys.executable, "-I", "-S", "-c", _WRAPPER, str(res), *cmd], env=env,
                          capture_output=True, text=True, timeout=600)
    r = json.loads(res.read_text())
    assert r["rc"] == 0, done.stdout + done.stderr
    return {"rss": r["maxrss_kb"] / 1024, "anon": r["anon_kb"] / 1024, "file": r["file_kb"] / 1024}


@pytest.mark.parametrize("method", ["ties", "linear"])
def test_merge_plan_matches_a_measured_merge(method, wide_family, tmp_path, capsys):
    fam = wide_family
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(RECIPES[method].format(base=fam.base, e0=fam.experts[0], e1=fam.experts[1]))
    assert main(["validate", str(recipe)]) == 0
    out = capsys.readouterr().out
    assert "memory      merge: about" in out and "RAM" in out, out
    plan = recipe_memory(recipe).ram / MB
    measured = measure_merge(recipe, tmp_path / "out")
    note = f"{method}: plan {plan:.0f} MiB, measured {measured}"
    assert plan >= measured["anon"] * (1 - BELOW_SLACK), "the plan is below the measured peak: " + note
    assert plan <= measured["rss"] * ABOVE_FACTOR, "the plan is far above the measured peak: " + note
    print(note)


# --- the search's plan (search/memory.py) ------------------------------------------------------------
SPACE = """name: mem_plan
models: [toy:up, toy:rev]
method: slerp
parameters:
  slerp:
    t: {points: 2}
objective:
  tasks_dir: toy
  tasks: [toy_up]
search: {trials: 2, seed: 0, limit: 8, top_k: 1}
"""


@pytest.fixture
def space(tmp_path):
    p = tmp_path / "space.yaml"
    p.write_text(SPACE)
    return p


@pytest.mark.parametrize("workers", ["1", "3"])
def test_search_that_cannot_fit_is_refused_before_anything_is_written(workers, space, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("EVOMERGE_MEMORY_LIMIT", "300MB")  # the documented budget: less than one process
    out = tmp_path / "run"
    code = main(["search", str(space), "--out", str(out), "--workers", workers, "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1, err
    assert "RAM" in err and "300.0 MB is available (EVOMERGE_MEMORY_LIMIT)" in err, err
    assert f"({workers} worker(s)" in err and "Fix:" in err, err
    assert not out.exists()


def test_refusal_suggests_fewer_workers(space, tmp_path, capsys, monkeypatch):
    """With Ray the driver and each worker need their own memory; a budget for two suggests two."""
    from evomerge.search.memory import RAY_DAEMON_BYTES, SEARCH_PROCESS_BYTES

    budget = SEARCH_PROCESS_BYTES + RAY_DAEMON_BYTES + 2 * SEARCH_PROCESS_BYTES + 100 * 10**6  # driver + 2
    monkeypatch.setenv("EVOMERGE_MEMORY_LIMIT", str(budget))
    code = main(["search", str(space), "--out", str(tmp_path / "run"), "--workers", "4", "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and "--workers 2" in err, err


def test_unreadable_memory_limit_is_one_line(space, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("EVOMERGE_MEMORY_LIMIT", "lots")
    code = main(["search", str(space), "--out", str(tmp_path / "run"), "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "EVOMERGE_MEMORY_LIMIT" in err, err


def test_validate_space_prints_the_search_plan(space, capsys):
    import re

    from evomerge.search.memory import CUDA_CONTEXT_BYTES, RAY_DAEMON_BYTES, SEARCH_PROCESS_BYTES

    assert main(["validate", str(space), "--workers", "2", "--device", "cuda"]) == 0
    out = capsys.readouterr().out
    assert "memory      search (2 Ray workers, cuda): about" in out, out
    # two workers and the driver, each a whole process, plus Ray's daemons
    ram = float(re.search(r"search \(2 Ray workers, cuda\): about ([0-9.]+) GB RAM", out).group(1))
    assert ram >= (3 * SEARCH_PROCESS_BYTES + RAY_DAEMON_BYTES) / 1e9 - 0.05, out
    vram = float(re.search(r"([0-9.]+) MB on cuda per worker", out).group(1))
    assert CUDA_CONTEXT_BYTES / 1e6 < vram < CUDA_CONTEXT_BYTES / 1e6 + 20, out  # + a 0.7M-parameter model


def test_validate_refuses_workers_for_a_recipe(tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("merge_method: linear\nmodels:\n  - model: a\n  - model: b\n")
    assert main(["validate", str(recipe), "--workers", "2"]) == 2
    assert "--workers applies to search spaces" in capsys.readouterr().err
