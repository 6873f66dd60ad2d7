"""Fitness cost, part 1: what one lm-eval scoring call costs against the model's own speed.

    python benchmarks/fitness_cost.py                         # the toy family, prints JSON
    python benchmarks/fitness_cost.py --space OUT/space.yaml  # e.g. the SmolLM2 family (examples/smollm2)

For the space's search split (its `limit` items per task, the same seeded subset a trial scores), it
times, median of `--repeats` calls each, in one run:
- `evaluate`: one `LMEvalEvaluator.evaluate` call, as a trial makes it;
- `generate`: a plain batched `model.generate` of exactly the prompts lm-eval built for those items
  (same batch size, greedy, the task's `max_gen_toks`, left padding), without lm-eval;
and reports the ratio (target: at most 1.5x on the toy model). The items-per-trial side of the issue
(multi-fidelity, anchor items) is not measured here yet.
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


def main() -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--space", default=str(ROOT / "search_spaces" / "toy_task_arithmetic.yaml"))
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    import torch

    from evomerge.executors.worker import Worker
    from evomerge.search.loop import worker_spec
    from evomerge.search.space import load_space

    space = load_space(args.space)
    worker = Worker(worker_spec(space))
    worker.setup()
    ev, model = worker.evaluator, worker.model
    limit, seed = space.budget.limit, space.budget.seed
    first = ev.evaluate(model, "search", limit=limit, seed=seed, per_item=True)  # warm-up; gives the prompts
    prompts = [p[0] for task in first.prompts.values() for _, p in sorted(task.items())]
    gen_tokens = max(int((leaf.task.config.generation_kwargs or {}).get("max_gen_toks") or 256)
                     for leaf in ev.view("search").leaves.values())

    def timed(fn) -> float:
        times = []
        for _ in range(args.repeats):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
        return statistics.median(times)

    t_eval = timed(lambda: ev.evaluate(model, "search", limit=limit, seed=seed))
    tok = ev.tokenizer
    tok.padding_side = "left"
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    batch = int(ev.batch_size) if str(ev.batch_size).isdigit() else 64

    def plain() -> None:
        with torch.no_grad():
            for i in range(0, len(prompts), batch):
                enc = tok(prompts[i:i + batch], return_tensors="pt", padding=True)
                model.generate(**enc, max_new_tokens=gen_tokens, do_sample=False, pad_token_id=tok.pad_token_id)

    t_gen = timed(plain)
    ratio = t_eval / t_gen
    print(json.dumps({"benchmark": "fitness_cost", "space": space.name, "items": len(prompts), "batch": batch,
                      "max_new_tokens": gen_tokens, "evaluate_s": round(t_eval, 3), "plain_generate_s": round(t_gen, 3),
                      "ratio_evaluate_over_generate": round(ratio, 2), "target": 1.5, "met": ratio <= 1.5,
                      "threads": torch.get_num_threads()}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
