"""Why TIES has no faster exact path on CPU: the order in which torch's argsort keeps tied magnitudes (issue 27).

    .venv/bin/python benchmarks/ties_tie_order.py            # ~1 min on one core; prints JSON

mergekit 0.1.5's `sparsify.magnitude` keeps `torch.argsort(|delta|, descending=True)[:k]`. evomerge finds
the k-th largest magnitude in linear time (engine/methods/arithmetic.py) and is exact whenever no non-zero
tie straddles that cut. bfloat16 task vectors almost always tie there (only 2**15 magnitudes exist), and
then mergekit keeps the tied entries its unstable sort happens to put first. This script measures, on
bfloat16-rounded Gaussian task vectors and on integer-valued ones, whether that choice follows any rule a
linear-time selection could reproduce:
- `ascending` / `descending`: within each run of equal values the indices rise / fall (an index tie-break);
- `stable`: the argsort equals the stable sort (lowest index first);
- `subset`: sorting only the entries at or above the cut keeps the same entries (a partial sort);
- `rerun`: the same argsort twice keeps the same entries (it is deterministic, so bit-identity is possible).
If every rule is false while `rerun` is true, the only exact path is the full sort that mergekit runs.
"""

from __future__ import annotations

import json
import time

import torch


def check(w: torch.Tensor, k: int) -> dict:
    n = w.numel()
    t0 = time.perf_counter()
    order = torch.argsort(w, descending=True)
    sort_s = time.perf_counter() - t0
    full = torch.zeros(n, dtype=torch.bool)
    full[order[:k]] = True
    vals = w[order]
    same = vals[1:] == vals[:-1]
    step = order[1:] - order[:-1]
    t0 = time.perf_counter()
    cut = torch.kthvalue(w, n - k + 1).values
    cut_s = time.perf_counter() - t0
    sub = torch.nonzero(w >= cut).reshape(-1)
    part = torch.zeros(n, dtype=torch.bool)
    part[sub[torch.argsort(w[sub], descending=True)[:k]]] = True
    again = torch.zeros(n, dtype=torch.bool)
    again[torch.argsort(w, descending=True)[:k]] = True
    return {"n": n, "k": k, "tied_at_cut": int((w == cut).sum()),
            "ascending": bool((step[same] > 0).all()), "descending": bool((step[same] < 0).all()),
            "stable": bool((order == torch.sort(w, descending=True, stable=True).indices).all()),
            "subset": bool((full == part).all()), "rerun": bool((full == again).all()),
            "argsort_s": round(sort_s, 3), "kthvalue_s": round(cut_s, 3)}


def main() -> None:
    torch.manual_seed(0)
    torch.set_num_threads(1)
    rows = []
    for n in (100_000, 3_000_000, 16_777_216):
        delta = (torch.randn(n) * 0.002).to(torch.bfloat16)  # a bf16 task vector's scale
        rows.append({"kind": "bf16 gaussian", **check(delta.abs().float(), n // 2)})
    rows.append({"kind": "integers 0-49", **check(torch.randint(0, 50, (3_000_000,)).float(), 1_500_000)})
    rule = any(r[x] for r in rows for x in ("ascending", "descending", "stable", "subset"))
    print(json.dumps({"torch": torch.__version__, "rows": rows, "a_linear_rule_reproduces_the_ties": rule,
                      "deterministic": all(r["rerun"] for r in rows)}, indent=1))


if __name__ == "__main__":
    main()
