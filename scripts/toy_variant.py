"""Build a variant of the toy family (plan overrides as JSON), optionally reusing a built base.

Tuning helper for docs/toy_family.md: e.g.

    .venv/bin/python scripts/toy_variant.py /tmp/v1 --reuse-base /tmp/cand1 \
        --set '{"expert_lr": {"rev": 5e-4, "sort": 5e-4, "up": 5e-4, "next": 5e-4}, "expert_replay": 0.25}'
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time

from evomerge.toy import family as toy


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--reuse-base", default=None)
    ap.add_argument("--set", default="{}", help="JSON object of BuildPlan fields to override")
    args = ap.parse_args()
    plan = dataclasses.replace(toy.FULL, **json.loads(args.set))
    t0 = time.time()
    toy.build(args.out, seed=args.seed, plan=plan, overwrite=True, reuse_base=args.reuse_base)
    print(f"built in {time.time() - t0:.0f}s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
