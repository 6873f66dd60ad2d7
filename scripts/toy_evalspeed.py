"""Time one evaluation of the toy mixture with LMEvalEvaluator (wall and CPU seconds).

    .venv/bin/python scripts/toy_evalspeed.py --limit 128 --repeat 5
"""

from __future__ import annotations

import argparse
import json
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


def main() -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from evomerge.toy import family as toy
    from evomerge.evaluation.evaluate import LMEvalEvaluator

    ap = argparse.ArgumentParser()
    ap.add_argument("--limit", type=int, default=128)
    ap.add_argument("--split", default="search")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--batch-size", type=int, default=64)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    fam = toy.family()
    model = AutoModelForCausalLM.from_pretrained(fam.base, dtype=torch.float32).eval()
    ev = LMEvalEvaluator(AutoTokenizer.from_pretrained(fam.tokenizer), [f"toy_{s}" for s in fam.skills],
                         str(fam.tasks_dir), batch_size=args.batch_size)
    t0 = time.perf_counter()
    ev.view(args.split)
    build = time.perf_counter() - t0
    walls, cpus = [], []
    for i in range(args.repeat):
        w, c = time.perf_counter(), time.process_time()
        ev.evaluate(model, args.split, limit=args.limit, seed=i)
        walls.append(time.perf_counter() - w)
        cpus.append(time.process_time() - c)
    print(json.dumps({"split": args.split, "limit_per_task": args.limit, "tasks": len(fam.skills),
                      "task_build_s": round(build, 3), "wall_s": [round(x, 3) for x in walls],
                      "cpu_s": [round(x, 3) for x in cpus], "load1": os.getloadavg()[0]}))


if __name__ == "__main__":
    main()
