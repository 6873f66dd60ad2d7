"""Ray memory benchmark: resident memory of the workers on one node, 1 worker vs N, showing that the
source weights are held once per node (shared page cache of the memory-mapped safetensors files), not
copied into every worker.

    scripts/netns.sh -- .venv/bin/python benchmarks/ray_memory.py                   # ~1-2 min
    scripts/netns.sh -- .venv/bin/python benchmarks/ray_memory.py --workers 1 2 3 --family DIR

Must run inside a loopback-only namespace (scripts/netns.sh); it refuses otherwise.

For each worker count: start a local Ray with that many workers (`RayExecutor`), run 2 trials per
worker (each merges every source tensor into its resident model and evaluates it), then read each
worker process's /proc/<pid>/smaps_rollup (RSS, PSS, USS = private clean + dirty) and, from
/proc/<pid>/smaps, the RSS and PSS of its mappings of the source checkpoint files.

How to read the JSON (`configs.<N>`; PSS splits each shared page between the processes mapping it, so
PSS summed over processes counts every page once; USS misleads here, see `ray_common.smaps`):
- `per_worker[i].sources_rss_mib`: each worker maps every source file (about `sources_file_mib`)...
- ...but `sources_clean_pss_total_mib` (the page-cache pages of those files, PSS summed over workers)
  stays about one copy of the files whatever N is: shared, not duplicated. A copy per worker would
  make it N x `sources_file_mib` (`sources_if_copied_per_worker_mib`).
- `sources_private_dirty_total_mib`: pages of a source mapping a worker wrote to (copy-on-write). When
  the resident model has the stored dtype, transformers leaves its weights backed by the base file's
  private mapping, so the merged weights written into it show up here: one resident model per worker,
  the merge target, by design.
- `pss_added_per_extra_worker_mib`: what one more worker costs (Python + torch + lm-eval + its resident
  model); compare with `sources_file_mib`: the sources are not in it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import ray_common  # noqa: E402
from ray_common import log  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--limit", type=int, default=4, help="items per task per trial")
    ap.add_argument("--family", help="toy family folder (default: the shipped one)")
    ap.add_argument("--synthetic", default="768x12", metavar="HIDDENxLAYERS",
                    help="use a bigger random bf16 family on the toy tokenizer/tasks, so sizes are readable "
                    "(default 768x12: 3 sources of ~170 MB); 'none' uses the toy family itself")
    ap.add_argument("--dtype", default="bfloat16", help="dtype of each worker's resident model")
    args = ap.parse_args()
    ray_common.require_loopback_namespace(__file__)

    from evomerge.executors.ray_pool import RayExecutor
    from evomerge.executors.worker import TrialJob

    from dataclasses import replace

    fam = ray_common.toy_family(args.family)
    if args.synthetic != "none":
        hidden, layers = (int(x) for x in args.synthetic.lower().split("x"))
        fam = ray_common.synthetic_family(fam, hidden=hidden, layers=layers)
    spec = replace(ray_common.worker_spec(fam, threads=1), dtype=args.dtype)
    source_dirs = [os.path.realpath(p) + os.sep for p in spec.sources]
    files = [f for d in source_dirs for f in Path(d).glob("*.safetensors")]
    file_mib = sum(f.stat().st_size for f in files) / 2**20
    # ties over the base and every expert: each trial reads every tensor of every source
    recipe = ray_common.recipes(fam, 1)[0]
    assert recipe["merge_method"] == "ties"
    result: dict = {
        "benchmark": "ray_memory",
        "family": str(fam.root),
        "sources": len(spec.sources),
        "sources_file_mib": round(file_mib, 2),
        "resident_model_dtype": args.dtype,
        "configs": {},
    }
    for n in args.workers:
        log(f"{n} worker(s)")
        ex = RayExecutor(spec, workers=n)
        try:
            jobs = [TrialJob(number=i, recipe=recipe, split="search", limit=args.limit)
                    for i in range(2 * n)]
            outcomes, queue, in_flight = [], list(jobs), 0
            while queue or in_flight:
                while queue and in_flight < ex.slots:
                    ex.submit(queue.pop(0))
                    in_flight += 1
                done = ex.wait(None)
                in_flight -= len(done)
                outcomes += done
            bad = [o.error for o in outcomes if not o.ok]
            assert not bad, bad[0]
            time.sleep(1.0)
            per = []
            for w in ex.workers():
                m = ray_common.smaps(w["pid"], source_dirs)
                per.append({k: round(v, 2) if isinstance(v, float) else v for k, v in m.items()})
        finally:
            ex.close()
        def total(key: str) -> float:
            return round(sum(p[key] for p in per), 1)

        cfg = {
            "workers": n,
            "per_worker": per,
            **{f"{k}_total_mib": total(f"{k}_mib") for k in ("rss", "pss", "uss", "pss_anon", "pss_file")},
            **{f"{k}_total_mib": total(f"{k}_mib") for k in (
                "sources_rss", "sources_pss", "sources_clean_pss", "sources_private_dirty")},
            "sources_if_copied_per_worker_mib": round(n * file_mib, 1),
        }
        result["configs"][str(n)] = cfg
        log(f"{n} worker(s): PSS total {cfg['pss_total_mib']} MiB; source pages (clean PSS) "
            f"{cfg['sources_clean_pss_total_mib']} MiB for {file_mib:.1f} MiB of files")

    cfgs = result["configs"]
    ns = sorted(int(k) for k in cfgs)
    if len(ns) >= 2:
        lo, hi = cfgs[str(ns[0])], cfgs[str(ns[-1])]
        steps = ns[-1] - ns[0]
        result["pss_added_per_extra_worker_mib"] = round((hi["pss_total_mib"] - lo["pss_total_mib"]) / steps, 1)
        result["sources_clean_pss_total_by_workers_mib"] = {k: c["sources_clean_pss_total_mib"] for k, c in cfgs.items()}
        # shared: the page-cache copy of the sources does not grow with the number of workers
        result["sources_shared_not_duplicated"] = bool(
            hi["sources_clean_pss_total_mib"] <= 1.1 * max(lo["sources_clean_pss_total_mib"], 1e-9)
            and hi["sources_clean_pss_total_mib"] <= 1.1 * file_mib
        )
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
