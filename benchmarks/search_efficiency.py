"""Search efficiency on the toy family: the default sampler vs random search vs a dense grid optimum.

    HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 .venv/bin/python benchmarks/search_efficiency.py   # ~15-25 min
    .venv/bin/python benchmarks/search_efficiency.py --seeds 2 --trials 20 --grid-points 6      # smoke run

The space (default: task arithmetic of the upper-casing and reversal experts with one weight per expert:
2 dimensions, so that a dense grid is affordable, and a landscape with structure: too much of both
task vectors collapses the model) is searched, for each of `--seeds`
seeds, by the space's default sampler and by random search, `--trials` trials each, on the search
split (the space's `limit`). For each run the top-k trials are re-scored on the select split and the
best select score is that run's result, exactly as `evomerge search` picks its winner. The grid
optimum is the best select score over a `--grid-points`^d grid of the same space (every grid point
scored on the full select split). One resident model serves every run (in-process executor).
Prints one JSON object: per-seed results, medians, and `fraction_of_grid_optimum` for both samplers
(target: the default sampler's median >= 0.95).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import textwrap
import time
from pathlib import Path

SPACE = """
name: efficiency_task_arithmetic
models: [toy:up, toy:rev]
base_model: toy:base
method: task_arithmetic
parameters:
  task_arithmetic:
    weight: {low: 0.0, high: 1.0}
objective:
  tasks_dir: toy
  tasks: [toy_up, toy_rev]
search: {trials: 50, seed: 0, limit: 64, top_k: 5}
"""


def main(argv=None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--space", help="space YAML (default: the 2-d task-arithmetic space above)")
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--trials", type=int, default=50)
    ap.add_argument("--grid-points", type=int, default=11)
    ap.add_argument("--limit", type=int, default=None, help="override the space's search-split limit")
    ap.add_argument("--select-limit", type=int, default=None,
                    help="score select on a seeded subset of this many items per task (default: all)")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="evomerge-efficiency-") as scratch:
        result = _run(args, Path(scratch))
    print(json.dumps(result, indent=1))
    return 0


def _run(args, tmp: Path) -> dict:
    from evomerge.executors.local import InProcessExecutor
    from evomerge.search.score import mixture
    from evomerge.search.jobs import worker_spec
    from evomerge.search.run import run_search
    from evomerge.search.selection import top_trials
    from evomerge.search.spacefile import load_space
    from evomerge.search.study import grid_space
    from evomerge.search.suggest import build_recipe
    from evomerge.executors.worker import TrialJob

    if args.space:
        space = load_space(args.space)
    else:
        (tmp / "space.yaml").write_text(textwrap.dedent(SPACE))
        space = load_space(tmp / "space.yaml")
    space = space.with_overrides(trials=args.trials, grid_points=args.grid_points, limit=args.limit)
    executor = InProcessExecutor(worker_spec(space))
    select = "select"
    cache: dict[str, float] = {}

    def select_score(params: dict) -> float:
        recipe = build_recipe(space, params).to_dict()
        key = json.dumps(recipe, sort_keys=True)
        if key not in cache:
            executor.submit(TrialJob(0, recipe, select, args.select_limit, space.budget.seed))
            (outcome,) = executor.wait()
            cache[key] = mixture(outcome.metrics, space.objective, select) if outcome.ok else float("-inf")
        return cache[key]

    t0 = time.perf_counter()
    grid = grid_space(space)
    names = list(grid)
    import itertools

    grid_scores = []
    for values in itertools.product(*grid.values()):
        grid_scores.append(select_score(dict(zip(names, values))))
    grid_best = max(grid_scores)
    grid_s = time.perf_counter() - t0
    print(f"[bench] grid of {len(grid_scores)} points: best select {grid_best:.4f} ({grid_s:.0f} s)", file=sys.stderr)

    default_sampler = None
    runs = {"default": [], "random": []}
    for seed in range(args.seeds):
        for kind in ("default", "random"):
            s = space.with_overrides(seed=seed, sampler=None if kind == "default" else "random")
            t1 = time.perf_counter()
            r = run_search(s, tmp / f"{kind}-{seed}", executor=executor, progress=False, select=False, write=False)
            if kind == "default":
                default_sampler = r.study.user_attrs.get("sampler")
            top = top_trials(r.study, s, s.budget.top_k)
            best = max(select_score(t.params) for t in top)
            runs[kind].append({"seed": seed, "select": round(best, 4), "search_best": round(top[0].value, 4),
                               "seconds": round(time.perf_counter() - t1, 1)})
            print(f"[bench] {kind} seed {seed}: select {best:.4f}", file=sys.stderr)
    executor.close()
    med = {k: statistics.median(r["select"] for r in v) for k, v in runs.items()}
    from evomerge.search.suggest import baseline_params

    baseline = select_score(baseline_params(space)[0][1])
    result = {
        "benchmark": "search_efficiency",
        "space": space.name,
        "dimensions": names,
        "trials": args.trials,
        "seeds": args.seeds,
        "default_sampler": default_sampler,
        "search_limit": space.budget.limit,
        "select_limit": args.select_limit,
        "grid": {"points_per_dim": args.grid_points, "size": len(grid_scores), "best_select": round(grid_best, 4),
                 "seconds": round(grid_s, 1)},
        "uniform_baseline_select": round(baseline, 4),
        "runs": runs,
        "median_select": {k: round(v, 4) for k, v in med.items()},
        "fraction_of_grid_optimum": {k: round(v / grid_best, 4) if grid_best > 0 else None for k, v in med.items()},
        "target_fraction": 0.95,
        "met": grid_best > 0 and med["default"] / grid_best >= 0.95,
        "seconds": round(time.perf_counter() - t0, 1),
    }
    return result


if __name__ == "__main__":
    sys.exit(main())
