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
