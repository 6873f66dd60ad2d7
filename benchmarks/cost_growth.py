"""Cost growth: how the time and memory of a merge and of a search grow with model size (issue 27).

    .venv/bin/python benchmarks/cost_growth.py --steps build --sizes 0.1b,0.5b,1b,2b     # the models, once
    .venv/bin/python benchmarks/cost_growth.py --steps merge --sizes 0.1b,0.5b            # both tools, 3 methods
    .venv/bin/python benchmarks/cost_growth.py --steps merge --sizes 1b --methods ties --tools mergekit
    .venv/bin/python benchmarks/cost_growth.py --steps search --sizes 0.1b               # in-process search
    scripts/netns.sh -- .venv/bin/python benchmarks/cost_growth.py --steps ray --sizes 0.1b   # 2 Ray workers
    .venv/bin/python benchmarks/cost_growth.py --steps report --markdown t.md --plot p.png    # JSON of all

Every step is resumable: each measurement (one size, one tool, one method, one repeat) is cached as a
JSON file under WORK/results and skipped when it exists (`--force` reruns it), so the benchmark can run
part by part, e.g. in ten-minute chunks on a shared machine. `report` only reads the cache.

Models (`build`): synthetic Llama-shaped bf16 checkpoints with random weights, written tensor by tensor
(the script never holds a whole model): `base` and two fine-tune-like variants `ft_a`, `ft_b`
(base + N(0, 0.002)), vocab 32000, untied embeddings, sharded at 2 GB like real checkpoints; sizes
0.1b, 0.5b, 1b, 2b (SIZES). ~12 GB of disk at 2b.

Merges (`merge`): benchmarks/merge_speed.py's recipes (linear of 3, slerp of 2, TIES base + 2 at
density 0.5; bfloat16) and runner: `evomerge merge` and `mergekit-yaml` as child processes (wall time,
CPU seconds, the child's own peak RSS, sampled heap vs file-backed RSS), interleaved per size and
method, the machine's load average before and after each run, and the two outputs compared tensor by
tensor. Each evomerge run also records the engine's memory plan for the recipe (`engine/memory.py`),
so the report measures the plan's error.

Searches (`search`, `ray`): a real `evomerge search` (run_search: pre-flight, Optuna study, trials;
no select/report) over a task-arithmetic space (base + 2) and a slerp space (ft_a, ft_b, a 3-point t
gradient), scored with lm-eval on the toy family's `toy_up` task (2 items per trial, the models' own
tokenizer; the scores are meaningless, the costs are not). Per trial: the in-memory merge time
(`timings.merge`; the first trial is a warm-up). Per run: the search process's peak RSS (`ru_maxrss`)
and its sampled heap vs file-backed peaks, and the search's memory plan (search/memory.py). With `ray`
that is the driver only: Ray's actors are other processes, not summed yet (ray_memory.py measures
them); `ray` must run inside scripts/netns.sh.

`report`: every cached measurement, power-law and linear fits of time and memory against parameters,
the targets of issue 27, a Markdown table (--markdown) and a plot (--plot).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import cost_growth_parts as parts  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
STEPS = ("build", "merge", "search", "ray", "report")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", default=str(ROOT / ".cache" / "bench" / "cost_growth"), help="cache folder")
    ap.add_argument("--steps", default="build,merge,search,report", help=",".join(STEPS))
    ap.add_argument("--sizes", default=",".join(parts.SIZES))
    ap.add_argument("--methods", default="linear,slerp,ties", help="merge methods (merge step)")
    ap.add_argument("--tools", default="evomerge,mergekit", help="merge step: which tools")
    ap.add_argument("--spaces", default="task_arithmetic,slerp", help="search/ray steps: which spaces")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--trials", type=int, default=4, help="trials per search (the first is a warm-up)")
    ap.add_argument("--force", action="store_true", help="rerun measurements already cached")
    ap.add_argument("--markdown", help="report: write the tables here")
    ap.add_argument("--plot", help="report: write the plot (PNG) here")
    ap.add_argument("--_search", nargs=3, metavar=("SPACE", "OUT", "WORKERS"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args._search:
        return parts.search_child(*args._search)
    work = Path(args.work).resolve()
    steps = _listed(args.steps, STEPS, "--steps", ap)
    sizes = _listed(args.sizes, tuple(parts.SIZES), "--sizes", ap)
    for step in steps:
        if step == "build":
            for size in sizes:
                parts.build(work, size)
        elif step == "merge":
            _merge_step(work, sizes, args, ap)
        elif step in ("search", "ray"):
            _search_step(work, sizes, args, ap, workers=2 if step == "ray" else 1)
        elif step == "report":
            from cost_growth_report import report

            print(json.dumps(report(work, markdown=args.markdown, plot=args.plot), indent=2))
    return 0


def _listed(text: str, allowed: tuple[str, ...], flag: str, ap) -> list[str]:
    items = [x.strip() for x in text.split(",") if x.strip()]
    bad = [x for x in items if x not in allowed]
    if bad or not items:
        ap.error(f"{flag}: choose from {','.join(allowed)} (got {text!r})")
    return items


def _merge_step(work: Path, sizes: list[str], args, ap) -> None:
    """Both tools on each size and method, interleaved (the order alternates between repeats)."""
    methods = _listed(args.methods, ("linear", "slerp", "ties"), "--methods", ap)
    tools = _listed(args.tools, ("evomerge", "mergekit"), "--tools", ap)
    for size in sizes:
        models = parts.build(work, size)
        for rep in range(args.repeats):
            for method in methods:
                order = tools if (rep + methods.index(method)) % 2 == 0 else tools[::-1]
                for tool in order:
                    parts.merge_run(work, size, models, method, tool, rep, force=args.force)
                parts.compare(work, size, method, rep)


def _search_step(work: Path, sizes: list[str], args, ap, *, workers: int) -> None:
    spaces = _listed(args.spaces, ("task_arithmetic", "slerp"), "--spaces", ap)
    if workers > 1:
        import ray_common

        ray_common.require_loopback_namespace(__file__)
    for size in sizes:
        models = parts.build(work, size)
        for space in spaces:
            parts.search_run(work, size, models, space, workers=workers, trials=args.trials, force=args.force)


if __name__ == "__main__":
    sys.exit(main())
