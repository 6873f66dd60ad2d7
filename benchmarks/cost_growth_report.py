"""The report of benchmarks/cost_growth.py: tables, growth fits and issue 27's targets from its cache.

Why a separate module: the measurements take hours and are cached one JSON file each; the report only
reads them, so it can be rerun (and changed) without measuring again. `report(work)` returns the JSON
that `cost_growth.py --steps report` prints; `markdown=` writes the tables, `plot=` a PNG.

Fits: a power law `y = c * params^k` by least squares on log-log (k = 1: linear in size, k = 0:
independent of it), over every size measured, per tool and method. The memory plan is recomputed from
each recipe with the current engine (engine/memory.py), so its error is the error of the plan as
shipped, not of the plan when the run was cached.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

MIB = 2**20
PROCESS_MB = 270  # an `evomerge merge` of a 0.7M-parameter model: ru_maxrss (Python, torch, the engine)
TIES_TARGET, TIME_EXPONENT_TARGET, SEARCH_FACTOR = 3.0, 1.1, 1.3


def _load(work: Path, prefix: str) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((work / "results").glob(f"{prefix}-*.json"))]


def fit(xs: list[float], ys: list[float]) -> dict | None:
    """Power law y = c * x^k (least squares on logs); None with fewer than 2 distinct sizes."""
    pts = [(math.log(x), math.log(y)) for x, y in zip(xs, ys) if x > 0 and y > 0]
    if len({round(p[0], 6) for p in pts}) < 2:
        return None
    n = len(pts)
    mx, my = sum(p[0] for p in pts) / n, sum(p[1] for p in pts) / n
    sxx = sum((p[0] - mx) ** 2 for p in pts)
    k = sum((p[0] - mx) * (p[1] - my) for p in pts) / sxx
    resid = [p[1] - (my + k * (p[0] - mx)) for p in pts]
    return {"k": round(k, 3), "c": math.exp(my - k * mx), "n": n,
            "max_resid_pct": round(100 * (math.exp(max(abs(r) for r in resid)) - 1), 1)}


def _plan_now(work: Path, r: dict) -> dict | None:
    """The current engine's plan for the run's recipe (None when the models are gone)."""
    cfg = work / r["size"] / "configs" / f"{r['method']}.yaml"
    try:
        from evomerge.engine.merge import recipe_memory

        return recipe_memory(cfg).as_dict()
    except Exception:  # noqa: BLE001 - a report of what can be read
        return r.get("plan")


def merge_rows(work: Path) -> list[dict]:
    """One row per size, method and tool: the median over repeats (`runs`: how many; `load`: the
    lowest and highest load average seen around them)."""
    groups: dict[tuple, list[dict]] = {}
    for r in merge_runs(work):
        groups.setdefault((r["size"], r["method"], r["tool"]), []).append(r)
    rows = []
    for runs in groups.values():
        row = dict(runs[0], runs=len(runs), load=[min(min(r["load"]) for r in runs), max(max(r["load"]) for r in runs)])
        for key in ("wall_s", "cpu_s", "rss_mb", "peak_anon_mb", "peak_file_mb", "plan_error_pct"):
            vals = sorted(r[key] for r in runs if r.get(key) is not None)
            if vals:
                row[key] = vals[len(vals) // 2] if len(vals) % 2 else (vals[len(vals) // 2 - 1] + vals[len(vals) // 2]) / 2
        if row["tool"] == "evomerge":
            row["identical"] = all(r.get("identical") for r in runs) if all(r.get("identical") is not None
                                                                           for r in runs) else None
        rows.append(row)
    return sorted(rows, key=lambda x: (x["params"], x["method"], x["tool"]))


def merge_runs(work: Path) -> list[dict]:
    rows = []
    for r in _load(work, "merge"):
        row = {k: r.get(k) for k in ("size", "params", "method", "tool", "rep", "wall_s", "cpu_s", "rss_mb",
                                      "peak_anon_mb", "peak_file_mb")}
        row["load"] = [r["before"]["load"][0], r["after"]["load"][0]]
        row["utc"] = r["before"]["utc"]
        if r["tool"] == "evomerge":
            plan = _plan_now(work, r)
            row["plan_mb"] = round(plan["ram"] / MIB, 1)
            row["plan_in_flight_mb"] = round(plan["in_flight"] / MIB, 1)
            row["plan_error_pct"] = round(100 * (plan["ram"] / MIB - r["rss_mb"]) / r["rss_mb"], 1)
            agree = work / "results" / f"agree-{r['size']}-{r['method']}-r{r['rep']}.json"
            row["identical"] = json.loads(agree.read_text()).get("identical") if agree.exists() else None
        rows.append(row)
    return sorted(rows, key=lambda x: (x["params"], x["method"], x["tool"]))


def _search_plan_now(work: Path, r: dict) -> dict:
    """The current search plan for the run's space (the cached one when the space cannot be read)."""
    try:
        from evomerge.search.options import RunOptions
        from evomerge.search.preflight import search_plan
        from evomerge.search.spacefile import load_space

        space = load_space(work / r["size"] / "spaces" / f"{r['space']}.yaml")
        return search_plan(space, RunOptions(workers=r["workers"])).as_dict()
    except Exception:  # noqa: BLE001 - a report of what can be read
        return r.get("plan") or {}


def search_rows(work: Path) -> list[dict]:
    rows = []
    for r in _load(work, "search"):
        plan = _search_plan_now(work, r)
        tree = r.get("tree") or {}
        if r["workers"] > 1 and tree:  # Ray: the whole process tree (driver, daemons, actors), not the driver
            actors = [v for k, v in tree["each"].items() if "ray::Worker" in k]
            r = dict(r, rss_mb=tree["rss_mb"], peak_anon_mb=tree["anon_mb"], pss_mb=tree["pss_mb"],
                     worker_rss_mb=max((a["rss_mb"] for a in actors), default=None),
                     worker_anon_mb=max((a["anon_mb"] for a in actors), default=None))
        resident_mb = plan.get("resident", 0) / MIB
        rows.append({"size": r["size"], "params": r["params"], "space": r["space"], "workers": r["workers"],
                     "wall_s": r.get("wall_s"), "trials": r.get("trials"), "merge_s_median": r.get("merge_s_median"),
                     "eval_s_median": r.get("eval_s_median"), "rss_mb": r.get("rss_mb"),
                     "peak_anon_mb": r.get("peak_anon_mb"), "peak_file_mb": r.get("peak_file_mb"),
                     "resident_mb": round(resident_mb, 1), "plan_mb": round(plan.get("ram", 0) / MIB, 1),
                     "plan_error_pct": round(100 * (plan.get("ram", 0) / MIB - r["rss_mb"]) / r["rss_mb"], 1)
                     if plan else None,
                     "plan_vs_heap_pct": round(100 * (plan.get("ram", 0) / MIB - r["peak_anon_mb"]) / r["peak_anon_mb"], 1)
                     if plan else None,
                     "rss_over_resident": round(r["rss_mb"] / resident_mb, 2) if resident_mb else None,
                     "load": [r["before"]["load"][0], r["after"]["load"][0]], "utc": r["before"]["utc"],
                     **{k: r[k] for k in ("pss_mb", "worker_rss_mb", "worker_anon_mb") if k in r}})
    return sorted(rows, key=lambda x: (x["params"], x["space"], x["workers"]))


def fits(merges: list[dict], searches: list[dict]) -> dict:
    out: dict = {}
    for tool in ("evomerge", "mergekit"):
        for method in ("linear", "slerp", "ties"):
            rs = [r for r in merges if r["tool"] == tool and r["method"] == method]
            xs = [r["params"] for r in rs]
            out[f"merge/{tool}/{method}"] = {
                "sizes": sorted({r["size"] for r in rs}, key=lambda s: float(s[:-1])),
                "wall": fit(xs, [r["wall_s"] for r in rs]), "cpu": fit(xs, [r["cpu_s"] for r in rs]),
                "rss": fit(xs, [r["rss_mb"] for r in rs]),
                "rss_above_process": fit(xs, [r["rss_mb"] - PROCESS_MB for r in rs])}
    for space in ("task_arithmetic", "slerp"):
        rs = [r for r in searches if r["space"] == space and r["workers"] == 1]
        xs = [r["params"] for r in rs]
        out[f"search/{space}"] = {"sizes": [r["size"] for r in rs],
                                  "merge_per_trial": fit(xs, [r["merge_s_median"] or 0 for r in rs]),
                                  "rss": fit(xs, [r["rss_mb"] for r in rs])}
    return out


def targets(merges: list[dict], searches: list[dict], f: dict) -> list[dict]:
    """Issue 27's targets, each met or missed with the measurement."""
    t = []
    evo = [r for r in merges if r["tool"] == "evomerge"]
    for method in ("linear", "slerp", "ties"):
        rs = [r for r in evo if r["method"] == method]
        if rs:  # the plan (process + the tensors in flight) holds no shard: below it is below the bound
            worst = max(rs, key=lambda r: r["rss_mb"] / r["plan_mb"])
            t.append({"target": "export RSS <= one output shard + the tensors in flight (here: <= the plan, "
                                "process + tensors in flight, no shard)", "at": f"{method}, {', '.join(r['size'] for r in rs)}",
                      "measured": f"RSS / plan at most {worst['rss_mb'] / worst['plan_mb']:.2f} ({worst['size']}: "
                                  f"{worst['rss_mb']:.0f} / {worst['plan_mb']:.0f} MiB)",
                      "met": all(r["rss_mb"] <= r["plan_mb"] for r in rs)})
    for method in ("linear", "slerp", "ties"):
        k = (f[f"merge/evomerge/{method}"] or {}).get("rss_above_process")
        if k:
            t.append({"target": "export RSS independent of model size (exponent of RSS above the process ~ 0)",
                      "at": method, "measured": f"k = {k['k']}", "met": k["k"] <= 0.1})
    for method in ("linear", "slerp", "ties"):
        w, c = (f[f"merge/evomerge/{method}"] or {}).get("wall"), (f[f"merge/evomerge/{method}"] or {}).get("cpu")
        if w and c:  # wall time moves with the machine's load, CPU seconds much less: both must hold
            t.append({"target": f"merge time exponent <= {TIME_EXPONENT_TARGET} (wall and CPU)", "at": method,
                      "measured": f"wall k = {w['k']}, CPU k = {c['k']}",
                      "met": max(w["k"], c["k"]) <= TIME_EXPONENT_TARGET})
    for r in evo:
        mk = [m for m in merges if m["tool"] == "mergekit" and m["size"] == r["size"] and m["method"] == r["method"]]
        if r["method"] == "ties" and mk:
            ratio = mk[0]["wall_s"] / r["wall_s"]
            t.append({"target": f"TIES >= {TIES_TARGET}x faster than mergekit-yaml", "at": r["size"],
                      "measured": f"{ratio:.2f}x wall, {mk[0]['cpu_s'] / r['cpu_s']:.2f}x CPU", "met": ratio >= TIES_TARGET})
    for s in searches:
        if s["resident_mb"] and s["workers"] == 1:
            t.append({"target": f"search RSS <= {SEARCH_FACTOR}x the resident model (+ page cache)",
                      "at": f"{s['size']} {s['space']} x{s['workers']}",
                      "measured": f"heap {s['peak_anon_mb']:.0f} MiB = {s['peak_anon_mb'] / s['resident_mb']:.2f}x "
                                  f"the resident {s['resident_mb']:.0f} MiB",
                      "met": s["peak_anon_mb"] <= SEARCH_FACTOR * s["resident_mb"]})
    return t


def report(work: str | Path, *, markdown: str | None = None, plot: str | None = None) -> dict:
    work = Path(work)
    merges, searches = merge_rows(work), search_rows(work)
    f = fits(merges, searches)
    result = {"merges": merges, "searches": searches, "fits": f, "targets": targets(merges, searches, f),
              "runs": merge_runs(work)}
    if markdown:
        Path(markdown).write_text(to_markdown(result))
    if plot:
        draw(result, plot)
    return result


def _ratio(merges: list[dict], r: dict) -> str:
    mk = [m for m in merges if m["tool"] == "mergekit" and m["size"] == r["size"] and m["method"] == r["method"]]
    return f"{mk[0]['wall_s'] / r['wall_s']:.2f}x / {mk[0]['cpu_s'] / r['cpu_s']:.2f}x" if mk else "not run"


def to_markdown(res: dict) -> str:
    lines = ["| size | params | method | tool | wall s | CPU s | peak RSS MiB | of it heap | plan MiB (vs peak RSS) | "
             "mergekit / evomerge (wall / CPU) | same tensors | load before/after |", "|" + "---|" * 12]
    for r in res["merges"]:
        evo = r["tool"] == "evomerge"
        lines.append(f"| {r['size']} | {r['params'] / 1e9:.3f}B | {r['method']} | {r['tool']} | {r['wall_s']:.1f} | "
                     f"{r['cpu_s']:.1f}" + (f" ({r['runs']} runs)" if r["runs"] > 1 else "") + f" | {r['rss_mb']:.0f} | {r['peak_anon_mb']:.0f} | "
                     + (f"{r['plan_mb']:.0f} ({r['plan_error_pct']:+.0f}%)" if evo else "") + " | "
                     + (_ratio(res["merges"], r) if evo else "") + " | "
                     + ({True: "bit-identical", False: "DIFFER", None: "?"}[r.get("identical")] if evo else "")
                     + f" | {r['load'][0]:.1f} / {r['load'][1]:.1f} |")
    if res["searches"]:
        lines += ["", "| size | space | workers | trials | merge per trial (median) | eval per trial | peak RSS MiB | "
                  "of it heap | resident model MiB | heap / resident | plan MiB (vs heap, vs RSS) | load before/after |",
                  "|" + "---|" * 12]
        for s in res["searches"]:
            lines.append(f"| {s['size']} | {s['space']} | {s['workers']} | {s['trials']} | {s['merge_s_median']} s | "
                         f"{s['eval_s_median']} s | {s['rss_mb']:.0f} | {s['peak_anon_mb']:.0f} | {s['resident_mb']:.0f} | "
                         f"{s['peak_anon_mb'] / s['resident_mb']:.2f}x | {s['plan_mb']:.0f} ({s['plan_vs_heap_pct']:+.0f}%, "
                         f"{s['plan_error_pct']:+.0f}%) | "
                         f"{s['load'][0]:.1f} / {s['load'][1]:.1f} |")
    for s in res["searches"]:
        if s["workers"] > 1:
            lines.append(f"\n{s['size']} {s['space']} with {s['workers']} Ray workers: the "
                         f"process tree (driver, Ray's daemons, actors) summed: RSS {s['rss_mb']:.0f} MiB, PSS "
                         f"{s.get('pss_mb', 0):.0f} MiB, heap {s['peak_anon_mb']:.0f} MiB; one actor at most "
                         f"{s.get('worker_rss_mb') or 0:.0f} MiB RSS ({s.get('worker_anon_mb') or 0:.0f} MiB heap).")
    lines += ["", "| growth (power law, exponent k) | sizes | wall | CPU | peak RSS | RSS above the process |",
              "|---|---|---|---|---|---|"]
    for key, v in res["fits"].items():
        if key.startswith("merge/"):
            cells = [f"{v[m]['k']:.2f} (+-{v[m]['max_resid_pct']:.0f}%)" if v[m] else "-"
                     for m in ("wall", "cpu", "rss", "rss_above_process")]
            lines.append(f"| {key} | {', '.join(v['sizes'])} | " + " | ".join(cells) + " |")
        elif v.get("rss"):
            lines.append(f"| {key} (merge per trial / RSS) | {', '.join(v['sizes'])} | "
                         f"{v['merge_per_trial']['k'] if v['merge_per_trial'] else '-'} | | {v['rss']['k']} | |")
    lines += ["", "| target | at | measured | bound | met |", "|---|---|---|---|---|"]
    for t in res["targets"]:
        lines.append(f"| {t['target']} | {t['at']} | {t['measured']} | {t.get('bound', '')} | "
                     f"{'met' if t['met'] else '**MISSED**'} |")
    return "\n".join(lines) + "\n"


def draw(res: dict, path: str) -> None:
    """CPU seconds and peak RSS against parameters, log-log, one line per tool and method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    styles = {"evomerge": "-", "mergekit": "--"}
    colors = {"linear": "tab:blue", "slerp": "tab:green", "ties": "tab:red"}
    for tool in ("evomerge", "mergekit"):
        for method in ("linear", "slerp", "ties"):
            rs = sorted((r for r in res["merges"] if r["tool"] == tool and r["method"] == method),
                        key=lambda r: r["params"])
            if not rs:
                continue
            xs = [r["params"] / 1e9 for r in rs]
            for ax, key in zip(axes, ("cpu_s", "rss_mb")):
                ax.plot(xs, [r[key] for r in rs], styles[tool], color=colors[method], marker="o",
                        label=f"{tool} {method}")
    for ax, title in zip(axes, ("merge CPU seconds (user + sys; wall time moved with the load)",
                                "merge peak RSS (MiB; mergekit's includes its mapped sources)")):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("parameters (B)")
        ax.set_title(title, fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle("Cost growth with model size (benchmarks/cost_growth.py; 2 busy CPU cores, no GPU)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
