"""What a layer-path (DFS) trial costs next to a parameter-space (PS) trial of the same anchor, side by side.

    HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 .venv/bin/python benchmarks/layer_path_cost.py              # toy family
    .venv/bin/python benchmarks/layer_path_cost.py --family ~/.cache/evomerge/smollm2-0.1.2-e9f158bae3f2 --rounds 3

Two workers (the search's own `Worker`, in this process: one for the PS trials, one for the DFS trials,
as a PS search and a DFS search each have theirs) run trials of every kind in turn, round after round,
on the same search items (`limit`, seed 0), so load on the machine hits every kind alike:
- `ps_same`: a PS trial that merges every tensor (`linear`, weight 1 on the anchor and 0 on the donor)
  into the resident model. Its model is the anchor itself, so it answers exactly as `dfs_identity`
  does: the two differ only in how the candidate is made.
- `ps_searched`: the PS space's own baseline trial (toy: SLERP t = 0.5 of up and rev; SmolLM2: the
  family's task arithmetic), a PS trial as a search runs it (another model: other answers, other lengths).
- `dfs_identity`: the anchor's identity path, built on shared resident layers (`executors/resident_path.py`).
- `dfs_swap`: the middle run swapped in from the donor, same depth; `dfs_swap_gain`: the same with gain
  0.8 (its o_proj and down_proj materialised); `dfs_repeat`: the RYS seed (the middle run twice: deeper).
Per trial the worker times `merge` (for a path: plan + twins + scaled projections) and `eval` (lm-eval on
the search split). A warm-up round goes first and is reported apart (the first path trial loads each
source model once). Ratios are of medians over the rounds; `ratio_same_model` (dfs_identity over
ps_same: the same model, the same items and answers) is the target's measure (<= 1.2). The other DFS
kinds are different models whose answers (and so generation lengths) differ; their ratios say what a
search pays, with deeper paths costing more forward passes by construction. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
KINDS = ("ps_same", "dfs_identity", "ps_searched", "dfs_swap", "dfs_repeat", "dfs_swap_gain")


def spaces(family: str | None):
    """(PS space, DFS space): the toy family's SLERP space over up/rev, or the SmolLM2 family's own space;
    the DFS space a layer path over the same models, the first model the anchor."""
    from evomerge.search.spacefile import load_space, space_from_dict

    if family is None:
        ps = load_space(ROOT / "search_spaces" / "toy_slerp_gradient.yaml")
        data = {"models": ["toy:up", "toy:rev"], "objective": {"tasks_dir": "toy", "tasks": ["toy_up", "toy_rev"]}}
        root = ROOT
    else:
        root = Path(family).expanduser()
        ps = load_space(root / "space.yaml")
        data = {"models": [{"name": m.name, "path": m.path} for m in ps.models],
                "objective": {"tasks_dir": "./tasks", "tasks": [t.task for t in ps.objective.tasks]}}
    data.update(method="layer_path", layer_path={"edits": 1},
                search={"limit": ps.budget.limit, "seed": 0, "trials": 1})
    return ps, space_from_dict(data, root=root, default_name="dfs_cost")


def recipes(ps, dfs) -> dict[str, dict]:
    """Every kind's recipe, as the plain dict a trial job carries."""
    from evomerge.engine.layer_path import path_recipe, path_steps
    from evomerge.search.suggest import baseline_params, build_recipe

    anchor, donor = dfs.models[0].path, dfs.models[1].path
    seeds = {label.split()[1]: build_recipe(dfs, p) for label, p in baseline_params(dfs)}
    swap = path_steps(seeds["swap"])
    scaled = [s if s.model == anchor else type(s)(s.model, s.layer, 0.8) for s in swap]
    same = {"merge_method": "linear", "dtype": dfs.dtype,
            "models": [{"model": anchor, "parameters": {"weight": 1.0}}, {"model": donor, "parameters": {"weight": 0.0}}]}
    return {"ps_same": same, "ps_searched": build_recipe(ps, baseline_params(ps)[0][1]).to_dict(),
            "dfs_identity": seeds["identity"].to_dict(), "dfs_swap": seeds["swap"].to_dict(),
            "dfs_repeat": seeds["repeat"].to_dict(), "dfs_swap_gain": path_recipe(scaled, dtype=dfs.dtype).to_dict()}


def run_rounds(workers: dict, jobs: dict[str, dict], rounds: int, limit: int | None) -> tuple[dict, dict]:
    """(warm-up timings per kind, [timings per round] per kind); every trial merges (kinds alternate)."""
    from evomerge.executors.worker import TrialJob

    def one(kind: str, number: int) -> dict:
        outcome = workers[kind[:2]].run(TrialJob(number, jobs[kind], "search", limit, 0))
        if outcome.error:
            raise RuntimeError(f"{kind}: {outcome.error}")
        return {"merge": outcome.timings["merge"], "eval": outcome.timings["eval"], "total": outcome.timings["total"],
                "score": outcome.metrics}

    warm = {kind: one(kind, i) for i, kind in enumerate(KINDS)}
    timed: dict[str, list] = {kind: [] for kind in KINDS}
    for r in range(rounds):
        order = KINDS if r % 2 == 0 else tuple(reversed(KINDS))
        for kind in order:
            timed[kind].append(one(kind, len(KINDS) * (r + 1) + KINDS.index(kind)))
            print(f"round {r + 1}: {kind} {timed[kind][-1]['total']:.2f} s", file=sys.stderr)
    return warm, timed


def summary(ps, dfs, warm: dict, timed: dict, jobs: dict, setup_s: float) -> dict:
    from evomerge.engine.layer_path import path_steps
    from evomerge.engine.recipe import MergeRecipe

    med = {k: {part: round(statistics.median(t[part] for t in v), 4) for part in ("merge", "eval", "total")}
           for k, v in timed.items()}
    depth = {k: len(path_steps(MergeRecipe.model_validate(jobs[k]))) for k in KINDS if k.startswith("dfs")}
    ratio = {k: round(med[k]["total"] / med["ps_same"]["total"], 3) for k in KINDS if k.startswith("dfs")}
    same_answers = warm["dfs_identity"]["score"] == warm["ps_same"]["score"]
    return {
        "benchmark": "layer_path_cost", "ps_space": ps.name, "anchor": dfs.models[0].name,
        "donor": dfs.models[1].name, "limit_per_task": dfs.budget.limit, "rounds": len(timed["ps_same"]),
        "setup_s": round(setup_s, 2), "warmup_total_s": {k: round(v["total"], 3) for k, v in warm.items()},
        "median_s": med, "depth": depth, "ratio_over_ps_same": ratio,
        "ratio_over_ps_searched": {k: round(med[k]["total"] / med["ps_searched"]["total"], 3) for k in ratio},
        "build_over_merge": round(med["dfs_identity"]["merge"] / med["ps_same"]["merge"], 4),
        "ratio_same_model": ratio["dfs_identity"], "same_scores_identity_vs_ps_same": same_answers,
        "target_ratio": 1.2, "met": ratio["dfs_identity"] <= 1.2 and same_answers,
        "threads": _threads(), "cpus": os.cpu_count(),
    }


def _threads() -> int:
    import torch

    return torch.get_num_threads()


def main(argv=None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--family", default=None, help="a SmolLM2 family folder (examples/smollm2/build.py); default: toy")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1, help="torch threads of the worker (default 1: a busy 2-core machine)")
    args = ap.parse_args(argv)

    from evomerge.executors.worker import Worker
    from evomerge.search.jobs import worker_spec

    ps, dfs = spaces(args.family)
    # one worker per family of trials, as a search has: a PS search's worker keeps one resident model, a DFS
    # search's one path shell, so lm-eval's wrapper is built once per worker, not at every switch of kind
    workers = {"ps": Worker(worker_spec(ps, threads=args.threads)), "df": Worker(worker_spec(ps, threads=args.threads))}
    t0 = time.perf_counter()
    for worker in workers.values():
        worker.setup()
    setup_s = time.perf_counter() - t0
    jobs = recipes(ps, dfs)
    warm, timed = run_rounds(workers, jobs, args.rounds, dfs.budget.limit)
    print(json.dumps(summary(ps, dfs, warm, timed, jobs, setup_s), indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
