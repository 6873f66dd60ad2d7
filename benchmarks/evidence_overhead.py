"""What the evidence costs: a 50-trial toy search with and without the audit and the statistics.

    python benchmarks/evidence_overhead.py                 # prints JSON (~6 min on 2 cores)
    python benchmarks/evidence_overhead.py --trials 10 --repeats 1   # quicker look

Runs `evomerge search search_spaces/toy_slerp_gradient.yaml --trials N` (the README's main command) as a
child process, alternately with everything (overlap audit, per-item report scores, naive merges with
the tuned task-arithmetic lambda, membership audit, intervals and paired tests, evidence.json and its
chart) and with `--no-evidence` (a hidden flag that skips exactly those), each into a fresh run folder,
and reports the median wall times and their ratio. Target: the evidence adds at most 10%.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
EVOMERGE = Path(sys.executable).with_name("evomerge")


def run(space: str, trials: int, out: Path, evidence: bool) -> float:
    shutil.rmtree(out, ignore_errors=True)
    cmd = [str(EVOMERGE), "search", space, "--trials", str(trials), "--out", str(out), "--no-progress"]
    if not evidence:
        cmd.append("--no-evidence")
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, cwd=ROOT)
    return time.perf_counter() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--space", default=str(ROOT / "search_spaces" / "toy_slerp_gradient.yaml"))
    ap.add_argument("--trials", type=int, default=50)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--work", default=str(ROOT / ".cache" / "evidence_overhead"))
    args = ap.parse_args()
    work = Path(args.work)
    times: dict[str, list[float]] = {"with": [], "without": []}
    for rep in range(args.repeats):
        for kind in (("with", "without") if rep % 2 == 0 else ("without", "with")):
            t = run(args.space, args.trials, work / kind, kind == "with")
            times[kind].append(round(t, 2))
            print(f"[bench] repeat {rep + 1} {kind} evidence: {t:.1f} s", file=sys.stderr)
    ev = json.loads((work / "with" / "evidence.json").read_text())
    med = {k: statistics.median(v) for k, v in times.items()}
    ratio = med["with"] / med["without"]
    print(json.dumps({"benchmark": "evidence_overhead", "space": args.space, "trials": args.trials,
                      "repeats": args.repeats, "wall_s": times, "median_wall_s": med,
                      "ratio_with_over_without": round(ratio, 3), "overhead_pct": round(100 * (ratio - 1), 1),
                      "target_pct": 10.0, "met": ratio <= 1.10,
                      "models_with_intervals": len(ev["models"]),
                      "membership_audited": sum("membership" in p for p in (ev.get("parents") or {}).values())},
                     indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
