"""The toy family's results table, computed with the real merge engine and the lm-eval evaluator.

Scores each member (base, experts), the naive merges (uniform linear, slerp t=0.5, task arithmetic
with unit weights, default TIES) and a small grid of tuned recipes. The grid is ranked on the
`select` split (never on `report`); the winner and the naive rows are then scored once on `report`.
Writes `evomerge/toy/data/scores.json` (read by tests/test_toy.py), `examples/toy_*.yaml`, and prints
the markdown table for docs/toy_family.md.

    .venv/bin/python scripts/toy_table.py            # full: grid + table (several minutes)
    .venv/bin/python scripts/toy_table.py --no-grid  # only the fixed rows
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HOME", "/tmp/evomerge-toy-hf")

REPO = Path(__file__).resolve().parents[1]


def rel(path: Path) -> str:
    """Model paths as written in the example YAMLs: relative to the repository root, with ./"""
    path = Path(path).resolve()
    return "./" + str(path.relative_to(REPO)) if path.is_relative_to(REPO) else str(path)


def naive_recipes(fam, slerp_pair: tuple[str, str]) -> dict[str, dict]:
    experts = [rel(fam.experts[s]) for s in fam.skills]
    base = rel(fam.base)
    a, b = slerp_pair
    return {
        "linear_uniform": {
            "merge_method": "linear",
            "models": [{"model": m, "parameters": {"weight": 1.0}} for m in experts],
            "dtype": "float32",
        },
        f"slerp_{a}_{b}_t0.5": {
            "merge_method": "slerp",
            "base_model": rel(fam.experts[a]),
            "models": [{"model": rel(fam.experts[a])}, {"model": rel(fam.experts[b])}],
            "parameters": {"t": 0.5},
            "dtype": "float32",
        },
        "task_arithmetic_w1": {
            "merge_method": "task_arithmetic",
            "base_model": base,
            "models": [{"model": m, "parameters": {"weight": 1.0}} for m in experts],
            "dtype": "float32",
        },
        "ties_default": {
            "merge_method": "ties",
            "base_model": base,
            "models": [{"model": m, "parameters": {"weight": 1.0, "density": 0.5}} for m in experts],
            "dtype": "float32",
        },
        "model_stock_default": {
            "merge_method": "model_stock",
            "base_model": base,
            "models": [{"model": m} for m in experts],
            "dtype": "float32",
        },
        "della_default": {  # epsilon 0.15, rescale and normalize on: mergekit's defaults
            "merge_method": "della",
            "base_model": base,
            "models": [{"model": m, "parameters": {"weight": 1.0, "density": 0.5}} for m in experts],
            "dtype": "float32",
            "random_seed": 0,
        },
        "breadcrumbs_default": {  # gamma 0.01, normalize and rescale off: mergekit's defaults
            "merge_method": "breadcrumbs",
            "base_model": base,
            "models": [{"model": m, "parameters": {"weight": 1.0, "density": 0.9}} for m in experts],
            "dtype": "float32",
        },
    }


def ta_recipe(fam, weights: dict[str, float]) -> dict:
    return {
        "merge_method": "task_arithmetic",
        "base_model": rel(fam.base),
        "models": [{"model": rel(fam.experts[s]), "parameters": {"weight": weights[s]}} for s in fam.skills],
        "dtype": "float32",
    }


def ties_recipe(fam, weights: dict[str, float], density: float, normalize: bool) -> dict:
    return {
        "merge_method": "ties",
        "base_model": rel(fam.base),
        "models": [{"model": rel(fam.experts[s]), "parameters": {"weight": weights[s], "density": density}}
                   for s in fam.skills],
        "parameters": {"normalize": normalize},
        "dtype": "float32",
    }


def slerp_recipe(fam, a: str, b: str, t_attn: float, t_mlp: float) -> dict:
    return {
        "merge_method": "slerp",
        "base_model": rel(fam.experts[a]),
        "models": [{"model": rel(fam.experts[a])}, {"model": rel(fam.experts[b])}],
        "parameters": {"t": [{"filter": "self_attn", "value": t_attn}, {"filter": "mlp", "value": t_mlp},
                             {"value": 0.5}]},
        "dtype": "float32",
    }


def grid_search(bench, fam, args, mix) -> list[tuple[float, str, dict]]:
    """A small hand grid on the select split: uniform task-arithmetic weights, then per-expert
    coordinate passes, then TIES densities around the best weights."""
    seen: dict[str, tuple[float, dict]] = {}

    def trial(name: str, recipe: dict) -> float:
        if name not in seen:
            bench.merge(recipe)
            row = bench.score(args.grid_split, limit=args.grid_limit)
            seen[name] = (mixture(row, mix), recipe)
            print(f"[{len(seen)}] {name} {seen[name][0]:.3f} "
                  + " ".join(f"{k}={v:.2f}" for k, v in row.items()), file=sys.stderr)
        return seen[name][0]

    def ta_name(w):
        return "ta_" + "_".join(f"{s}{w[s]:g}" for s in fam.skills)

    best_w, best = None, -1.0
    for u in [0.3, 0.5, 0.7, 0.9, 1.1]:
        w = {s: u for s in fam.skills}
        v = trial(ta_name(w), ta_recipe(fam, w))
        if v > best:
            best_w, best = w, v
    for _ in range(args.passes):
        for s in fam.skills:
            for f in [0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5]:
                w = dict(best_w, **{s: f})
                v = trial(ta_name(w), ta_recipe(fam, w))
                if v > best:
                    best_w, best = w, v
    if args.slerp_grid:
        a, b = args.slerp.split(",")
        for ta_, tm in [(x, y) for x in (0.2, 0.5, 0.8) for y in (0.2, 0.5, 0.8)]:
            trial(f"slerp_{a}_{b}_attn{ta_}_mlp{tm}", slerp_recipe(fam, a, b, ta_, tm))
    for density in [0.3, 0.5, 0.7, 0.9]:
        for normalize in [False, True]:
            name = f"ties_d{density}_n{int(normalize)}_" + ta_name(best_w)[3:]
            trial(name, ties_recipe(fam, best_w, density, normalize))
    return sorted(((v, n, r) for n, (v, r) in seen.items()), key=lambda x: -x[0])


class Bench:
    """A resident model + sources + evaluator; scores members and recipes."""

    def __init__(self, fam):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from evomerge.engine.checkpoints import Sources
        from evomerge.evaluation.evaluate import LMEvalEvaluator

        torch.set_num_threads(1)
        self.fam = fam
        os.chdir(REPO)
        self.sources = Sources.open([rel(p) for p in fam.models.values()])
        self.model = AutoModelForCausalLM.from_pretrained(fam.base, dtype=torch.float32).eval()
        tok = AutoTokenizer.from_pretrained(fam.tokenizer)
        self.ev = LMEvalEvaluator(tok, [f"toy_{s}" for s in fam.skills], str(fam.tasks_dir))

    def load_member(self, path: Path) -> None:
        import torch
        from transformers import AutoModelForCausalLM

        src = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).state_dict()
        with torch.no_grad():
            for k, v in self.model.state_dict().items():
                v.copy_(src[k])

    def merge(self, recipe: dict) -> None:
        from evomerge.engine.execution import merge_into
        from evomerge.engine.recipe import MergeRecipe
        from evomerge.engine.sinks import ModelSink

        merge_into(ModelSink(self.model), MergeRecipe.model_validate(recipe), self.sources)

    def score(self, split: str, limit: int | None = None, seed: int = 0, items: dict | None = None,
              label: str = "") -> dict[str, float]:
        """Exact match per skill; with `items`, also keep each item's score under `items[label]`."""
        res = self.ev.evaluate(self.model, split, limit=limit, seed=seed, per_item=items is not None)
        if items is not None:
            items[label] = {s: res.items[f"toy_{s}_{split}"]["exact_match"] for s in self.fam.skills}
        return {s: res.metrics[f"toy_{s}_{split}"]["exact_match"] for s in self.fam.skills}


def paired_delta(a: dict[str, list[float]], b: dict[str, list[float]], weights: dict[str, float],
                 iters: int = 2000, seed: int = 0) -> tuple[float, float, float]:
    """Mixture(a) - mixture(b) on the same items, with a 95% paired bootstrap interval (items
    resampled within each skill, the mixture weights kept)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    total = sum(weights.values())
    diff = {s: np.asarray(a[s]) - np.asarray(b[s]) for s in weights}
    point = sum(weights[s] * diff[s].mean() for s in weights) / total
    draws = np.zeros(iters)
    for s, d in diff.items():
        idx = rng.integers(0, len(d), size=(iters, len(d)))
        draws += weights[s] * d[idx].mean(axis=1) / total
    low, high = np.percentile(draws, [2.5, 97.5])
    return float(point), float(low), float(high)


def external_recipe(path: str) -> dict:
    """A recipe YAML (e.g. a search's best.yaml), model paths rewritten relative to the repository."""
    from evomerge.engine.recipe import load_recipe

    data = load_recipe(path).model_dump(exclude_none=True, by_alias=True)
    for entry in data.get("models") or []:
        entry["model"] = rel(Path(entry["model"]))
    if data.get("base_model"):
        data["base_model"] = rel(Path(data["base_model"]))
    return data


def mixture(row: dict[str, float], weights: dict[str, float]) -> float:
    return sum(row[s] * w for s, w in weights.items()) / sum(weights.values())


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--no-grid", action="store_true")
    ap.add_argument("--passes", type=int, default=1, help="coordinate passes over the experts")
    ap.add_argument("--grid-split", default="select")
    ap.add_argument("--grid-limit", type=int, default=None)
    ap.add_argument("--slerp", default="up,rev")
    ap.add_argument("--slerp-grid", action="store_true", help="also sweep slerp t for self_attn/mlp")
    ap.add_argument("--top", type=int, default=3, help="grid rows to score on report")
    ap.add_argument("--root", default=None, help="a family folder (default: the shipped one)")
    ap.add_argument("--recipe", action="append", default=[], metavar="LABEL=PATH",
                    help="also score this recipe YAML (e.g. a search's best.yaml) on report")
    ap.add_argument("--write", action="store_true", help="write scores.json and examples/toy_*.yaml")
    args = ap.parse_args()

    from evomerge.toy import family as toy
    from evomerge.engine.recipe import MergeRecipe

    fam = toy.load(args.root) if args.root else toy.family()
    bench = Bench(fam)
    mix = fam.mixture
    rows: dict[str, dict[str, float]] = {}
    items: dict[str, dict[str, list[float]]] = {}  # per-item report scores, for paired intervals
    recipes: dict[str, dict] = {}
    t0 = time.time()
    for name, path in fam.models.items():
        bench.load_member(path)
        rows[name] = bench.score("report", items=items, label=name)
    naive = naive_recipes(fam, tuple(args.slerp.split(",")))
    for name, recipe in naive.items():
        bench.merge(recipe)
        rows[name] = bench.score("report", items=items, label=name)
        recipes[name] = recipe
    for spec in args.recipe:
        name, _, path = spec.partition("=")
        recipes[name] = external_recipe(path)
        bench.merge(recipes[name])
        rows[name] = bench.score("report", items=items, label=name)
    print(f"fixed rows: {time.time() - t0:.0f}s", file=sys.stderr)

    grid_ranked: list[tuple[float, str, dict]] = []
    if not args.no_grid:
        t1 = time.time()
        grid_ranked = grid_search(bench, fam, args, mix)
        print(f"grid: {len(grid_ranked)} recipes in {time.time() - t1:.0f}s", file=sys.stderr)
        for rank, (value, name, recipe) in enumerate(grid_ranked[: args.top]):
            bench.merge(recipe)
            label = "best_grid" if rank == 0 else f"grid_{rank + 1}"
            rows[label] = bench.score("report", items=items, label=label)
            recipes[label] = recipe
            rows[label]["_select"] = value
            rows[label]["_name"] = name

    print("| model / recipe | " + " | ".join(fam.skills) + " | mixture |")
    print("|---|" + "---|" * (len(fam.skills) + 1))
    for name, row in rows.items():
        label = f"{name} ({row['_name']})" if "_name" in row else name
        print(f"| {label} | " + " | ".join(f"{row[s]:.3f}" for s in fam.skills) + f" | **{mixture(row, mix):.3f}** |")

    experts = [n for n in rows if n.startswith("expert_")]
    best_expert = max(experts, key=lambda n: mixture(rows[n], mix))
    best_naive = max(naive, key=lambda n: mixture(rows[n], mix))
    paired = {}
    for name in recipes:
        if name in naive:
            continue
        paired[name] = {ref: dict(zip(("delta", "ci95_low", "ci95_high"), paired_delta(items[name], items[ref], mix)))
                        for ref in (best_expert, best_naive)}
        print(f"{name}: " + "; ".join(f"vs {ref} {v['delta']:+.3f} [{v['ci95_low']:+.3f}, {v['ci95_high']:+.3f}]"
                                      for ref, v in paired[name].items()))

    if args.write:
        clean = {n: {s: r[s] for s in fam.skills} for n, r in rows.items()}
        out = {
            "split": "report",
            "mixture_weights": mix,
            "rows": clean,
            "mixture": {n: mixture(r, mix) for n, r in clean.items()},
            "grid_split": args.grid_split,
            "grid_top": [{"name": n, "select_mixture": v} for v, n, _ in grid_ranked[:10]],
            "paired_vs": {"best_expert": best_expert, "best_naive": best_naive},
            "paired": paired,
        }
        (fam.root / "scores.json").write_text(json.dumps(out, indent=2) + "\n")
        for name, recipe in recipes.items():
            path = REPO / "examples" / f"toy_{name}.yaml"
            comments = [f"toy family: {name}; report-split mixture {mixture(clean[name], mix):.3f}",
                        "run from the repository root: evomerge merge " + str(path.relative_to(REPO)) + " OUT"]
            path.write_text(MergeRecipe.model_validate(recipe).to_yaml(comments=comments))
    return 0


if __name__ == "__main__":
    sys.exit(main())
