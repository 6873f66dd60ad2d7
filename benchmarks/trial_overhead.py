"""Per-trial time of `evomerge search` on the toy family, split into merge, evaluation and the rest.

    HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 .venv/bin/python benchmarks/trial_overhead.py            # 30 trials
    .venv/bin/python benchmarks/trial_overhead.py --trials 10 --space search_spaces/toy_ties.yaml

A real search (in-process executor, SQLite storage in a temp run folder, the default sampler) runs
`--trials` trials with the space's own `limit`. The worker times its merge (`merge_into` the resident
model) and its evaluation (lm-eval on the search split) per trial; everything else is measured as the
wall time of the optimisation loop minus those two: ask/suggest/build/tell, storage commits, the
progress bar, bookkeeping. The one-time set-up (model load, task building, first-call warm-up) is
reported separately and excluded from the per-trial split, as is the first trial. Prints one JSON
object: medians per trial and `other_fraction` (target: <= 0.10).

`bf16` (skip with --no-bf16): why a bfloat16 search is slower on CPU. The same items of the search split
are scored by the resident model (as the last trial left it) in float32 and a bfloat16 copy of it (median of 3 calls
each); a plain batched generate of the same prompts and a 1024 x 1024 matmul are timed in both dtypes,
the bf16 call's top operators are profiled, and the CPU's bf16 instruction support (avx512_bf16,
amx_bf16) is read from /proc/cpuinfo. Measured (benchmarks/README.md): the matmuls are faster in bf16 on
a CPU with avx512_bf16, generation is not, and dtype-conversion copies dominate the profile. evomerge keeps scoring the dtype that best.yaml exports (the scored model is
the exported one); this factor is the price.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main(argv=None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--space", default=str(ROOT / "search_spaces" / "toy_slerp_gradient.yaml"))
    ap.add_argument("--trials", type=int, default=30)
    ap.add_argument("--sampler", default=None)
    ap.add_argument("--no-bf16", action="store_true", help="skip the float32 vs bfloat16 scoring measurement")
    args = ap.parse_args(argv)

    from evomerge.executors.local import InProcessExecutor
    from evomerge.search.jobs import worker_spec
    from evomerge.search.loop import optimize
    from evomerge.search.spacefile import load_space
    from evomerge.search.study import create_study, default_storage

    space = load_space(args.space).with_overrides(trials=args.trials, sampler=args.sampler)
    executor = InProcessExecutor(worker_spec(space))
    t0 = time.perf_counter()
    executor.worker.setup()
    setup_s = time.perf_counter() - t0
    with tempfile.TemporaryDirectory(prefix="evomerge-overhead-") as tmp:
        study, _ = create_study(space, default_storage(Path(tmp)))
        # warm-up: the first trial builds the search split's tasks and pays first-call costs
        warm = space.with_overrides(trials=1)
        t1 = time.perf_counter()
        optimize(study, warm, executor, progress=False)
        first_s = time.perf_counter() - t1
        t2 = time.perf_counter()
        optimize(study, space, executor, progress=True)
        loop_s = time.perf_counter() - t2
        trials = [t for t in study.trials[1:] if t.user_attrs.get("timings")]
        merge = [t.user_attrs["timings"].get("merge", 0.0) for t in trials]
        evals = [t.user_attrs["timings"].get("eval", 0.0) for t in trials]
        n = len(trials)
        per_trial = loop_s / n
        other = per_trial - (sum(merge) + sum(evals)) / n
        result = {
            "benchmark": "trial_overhead",
            "space": space.name,
            "sampler": study.user_attrs.get("sampler"),
            "trials_timed": n,
            "limit_per_task": space.budget.limit,
            "tasks": [t.task for t in space.objective.tasks],
            "setup_s": round(setup_s, 3),
            "first_trial_s": round(first_s, 3),
            "per_trial_s": round(per_trial, 4),
            "merge_s": {"mean": round(sum(merge) / n, 4), "median": round(statistics.median(merge), 4)},
            "eval_s": {"mean": round(sum(evals) / n, 4), "median": round(statistics.median(evals), 4)},
            "other_s": round(other, 4),
            "merge_fraction": round(sum(merge) / n / per_trial, 4),
            "eval_fraction": round(sum(evals) / n / per_trial, 4),
            "other_fraction": round(other / per_trial, 4),
            "target_other_fraction": 0.10,
            "met": other / per_trial <= 0.10,
            "cpus": os.cpu_count(),
        }
        if not args.no_bf16:
            result["bf16"] = bf16_factor(executor.worker, space)
    executor.close()
    print(json.dumps(result, indent=1))
    return 0


def bf16_factor(worker, space) -> dict:
    """Scoring time of the resident model in float32 vs a bfloat16 copy, on the same items."""
    import copy

    import torch

    def timed(model) -> float:
        times = []
        for _ in range(3):
            t = time.perf_counter()
            worker.evaluator.evaluate(model, "search", limit=space.budget.limit, seed=space.budget.seed)
            times.append(time.perf_counter() - t)
        return statistics.median(times)

    fp32 = worker.model.float()
    bf16 = copy.deepcopy(fp32).to(torch.bfloat16)
    t32, t16 = timed(fp32), timed(bf16)

    # the same prompts through a plain batched generate (no lm-eval), and where the bf16 call spends its time
    first = worker.evaluator.evaluate(fp32, "search", limit=space.budget.limit, seed=space.budget.seed, per_item=True)
    prompts = [p[0] for task in first.prompts.values() for _, p in sorted(task.items())]
    tok = worker.evaluator.tokenizer
    tok.padding_side = "left"
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    new = max(int((leaf.task.config.generation_kwargs or {}).get("max_gen_toks") or 256)
              for leaf in worker.evaluator.view("search").leaves.values())

    def generate(model) -> float:
        t = time.perf_counter()
        with torch.no_grad():
            for i in range(0, len(prompts), 64):
                enc = tok(prompts[i:i + 64], return_tensors="pt", padding=True)
                model.generate(**enc, max_new_tokens=new, do_sample=False, pad_token_id=tok.pad_token_id)
        return time.perf_counter() - t

    generate(bf16)
    g32, g16 = generate(fp32), generate(bf16)
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        worker.evaluator.evaluate(bf16, "search", limit=space.budget.limit, seed=space.budget.seed)
    ops = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in ops) or 1
    top = [{"op": e.key, "self_cpu_share": round(e.self_cpu_time_total / total, 3)} for e in ops[:3]]

    def mm(dtype) -> float:
        a = torch.randn(1024, 1024, dtype=dtype)
        b = torch.randn(1024, 1024, dtype=dtype)
        a @ b
        t = time.perf_counter()
        for _ in range(20):
            a @ b
        return (time.perf_counter() - t) / 20

    flags = set()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    except OSError:
        pass
    return {"eval_float32_s": round(t32, 4), "eval_bfloat16_s": round(t16, 4), "eval_ratio_bf16_over_fp32": round(t16 / t32, 2),
            "plain_generate_float32_s": round(g32, 4), "plain_generate_bfloat16_s": round(g16, 4),
            "plain_generate_ratio_bf16_over_fp32": round(g16 / g32, 2), "bf16_eval_top_ops": top,
            "matmul_1024_float32_s": round(mm(torch.float32), 5), "matmul_1024_bfloat16_s": round(mm(torch.bfloat16), 5),
            "cpu_avx512_bf16": "avx512_bf16" in flags, "cpu_amx_bf16": "amx_bf16" in flags,
            "torch_threads": torch.get_num_threads()}


if __name__ == "__main__":
    sys.exit(main())
