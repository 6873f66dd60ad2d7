"""Fitness cost: items spent per trial for the same winner, and one scoring call against the model's own speed.

    python benchmarks/fitness_cost.py                          # both parts on the toy family, prints JSON
    python benchmarks/fitness_cost.py --part overhead --space OUT/space.yaml   # e.g. SmolLM2 (examples/smollm2)
    python benchmarks/fitness_cost.py --part strategies --seeds 5 --trials 60

Part `strategies`: the search of `--space` (default: the toy family's four-expert task-arithmetic space)
with each way of measuring fitness, over `--seeds` seeds and the same trial budget, in one run:
- (a) `full`: every item of the search limit (64 per task), as before;
- (b) `fidelity`: item-count rungs 8, 16, 32, 64 with successive halving (`fitness: fidelity`);
  `fidelity_hyperband` the same rungs with Hyperband; `fidelity_x4` rungs 4, 16, 64 with successive
  halving keeping a quarter;
- (c) `anchors`: 8 anchor items per task chosen from the references' per-item results (`fitness: anchors`);
- (d) `random`: the control for (c): a seeded random 8 items per task (`limit: 8`), no choosing;
  `random_3` the same with 3 items per task (21x fewer than (a), the stretch goal).
For each it reports the item evaluations of the search phase (the anchors' reference scoring included),
the search wall time, the winner's report-split score (after the usual select stage on the select
split; its difference from (a)'s, paired by seed, with a 95% t-interval), and the Spearman rank correlation between each trial's fitness and its full-limit fitness (every
finished trial, pruned ones at their last rung, re-scored here on the full limit).

Part `estimators`: offline, on the fixed trials of one `full` search (seed 0), the anchor estimate and a
random subset of the same size drawn 30 times each: Spearman with the full-limit fitness, and the regret
of the top 5 by the estimate (without the search reacting to the estimate).

Part `overhead`: for the space's search split (its `limit` items per task, the seeded subset a trial
scores), the median of `--repeats` timings of
- `evaluate`: one `LMEvalEvaluator.evaluate` call, as a trial makes it;
- `generate`: a plain batched `model.generate` of exactly the prompts lm-eval built for those items
  (same batch size, greedy, the task's `max_gen_toks`, left padding), without lm-eval;
and the ratio (target: at most 1.5x on the toy model). On the toy family it also times a multiple-choice
task made from the toy items: one evaluate call against a plain batched log-likelihood pass (one forward
pass per 64 (prompt, choice) pairs, the choice tokens' log-probabilities summed) of the same pairs.
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
TOY_SPACE = ROOT / "search_spaces" / "toy_task_arithmetic.yaml"
STRATEGIES = {  # name -> the search: settings it adds to the space's
    "full": {},
    "fidelity": {"fitness": "fidelity", "fidelity": {"limit": 8, "factor": 2}, "pruner": "successive_halving"},
    "fidelity_hyperband": {"fitness": "fidelity", "fidelity": {"limit": 8, "factor": 2}, "pruner": "hyperband"},
    "fidelity_x4": {"fitness": "fidelity", "fidelity": {"limit": 4, "factor": 4}, "pruner": "successive_halving"},
    "anchors": {"fitness": "anchors", "anchors": {"items": 8}},
    "random": {"limit": 8},
    "random_3": {"limit": 3},  # the stretch goal: 3 items per task, 21x fewer
}


def _median_seconds(repeats: int, fn) -> float:
    """Median wall time of `repeats` calls of `fn`."""
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def overhead(space_path: str, repeats: int) -> dict:
    import torch

    from evomerge.executors.worker import Worker
    from evomerge.search.jobs import worker_spec
    from evomerge.search.spacefile import load_space

    space = load_space(space_path)
    worker = Worker(worker_spec(space))
    worker.setup()
    ev, model = worker.evaluator, worker.model
    limit, seed = space.budget.limit, space.budget.seed
    first = ev.evaluate(model, "search", limit=limit, seed=seed, per_item=True)  # warm-up; gives the prompts
    prompts = [p[0] for task in first.prompts.values() for _, p in sorted(task.items())]
    gen_tokens = max(int((leaf.task.config.generation_kwargs or {}).get("max_gen_toks") or 256)
                     for leaf in ev.view("search").leaves.values())

    t_eval = _median_seconds(repeats, lambda: ev.evaluate(model, "search", limit=limit, seed=seed))
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

    t_gen = _median_seconds(repeats, plain)
    ratio = t_eval / t_gen
    return {"space": space.name, "items": len(prompts), "batch": batch, "max_new_tokens": gen_tokens,
            "evaluate_s": round(t_eval, 3), "plain_generate_s": round(t_gen, 3),
            "ratio_evaluate_over_generate": round(ratio, 2), "target": 1.5, "met": ratio <= 1.5,
            "threads": torch.get_num_threads()}


MC_TASK = """\
task: toy_mc
dataset_path: json
dataset_kwargs: {{data_files: {{test: {file}}}}}
test_split: test
output_type: multiple_choice
doc_to_text: prompt
doc_to_choice: choices
doc_to_target: gold
target_delimiter: ""
metric_list: [{{metric: acc, aggregation: mean, higher_is_better: true}}]
metadata: {{version: 1.0}}
"""


def overhead_mc(repeats: int, items: int = 256) -> dict:
    """A multiple-choice task made from the toy `up` items (the answer among 4 answers of other items):
    one evaluate call vs a plain batched log-likelihood pass over the same (prompt, choice) pairs."""
    import random

    import torch

    from evomerge.evaluation.evaluate import LMEvalEvaluator
    from evomerge.evaluation.protocol import SplitSpec
    from evomerge.executors.worker import Worker
    from evomerge.search.jobs import worker_spec
    from evomerge.search.spacefile import load_space

    space = load_space(TOY_SPACE)
    worker = Worker(worker_spec(space))
    worker.setup()
    model, tok = worker.model, worker.evaluator.tokenizer
    from evomerge.toy.family import family

    rows = [json.loads(line) for line in (Path(family().tasks_dir) / "data" / "up_search.jsonl").read_text().splitlines()][:items]
    rng = random.Random(0)
    docs = []
    for i, r in enumerate(rows):
        others = rng.sample([x["answer"] for j, x in enumerate(rows) if j != i], 3)
        gold = rng.randrange(4)
        choices = others[:gold] + [r["answer"]] + others[gold:]
        docs.append({"prompt": r["prompt"], "choices": choices, "gold": gold})
    with tempfile.TemporaryDirectory(prefix="evomerge-mc-") as tmp:
        data = Path(tmp) / "mc.jsonl"
        data.write_text("".join(json.dumps(d) + "\n" for d in docs))
        (Path(tmp) / "toy_mc.yaml").write_text(MC_TASK.format(file=data))
        ev = LMEvalEvaluator(tok, ["toy_mc"], tmp, batch_size=64, splits=SplitSpec(mode="whole"))
        ev.evaluate(model, "search")  # warm-up (builds the task)

        t_eval = _median_seconds(repeats, lambda: ev.evaluate(model, "search"))
    pairs = [(d["prompt"], c) for d in docs for c in d["choices"]]
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id

    def plain() -> None:
        with torch.no_grad():
            for i in range(0, len(pairs), 64):
                ctx = [tok(p, add_special_tokens=False)["input_ids"] for p, _ in pairs[i:i + 64]]
                cont = [tok(c, add_special_tokens=False)["input_ids"] for _, c in pairs[i:i + 64]]
                seqs = [a + b for a, b in zip(ctx, cont)]
                width = max(map(len, seqs))
                ids = torch.tensor([s + [pad] * (width - len(s)) for s in seqs])
                logp = torch.log_softmax(model(input_ids=ids).logits.float(), dim=-1)
                for k, (a, b) in enumerate(zip(ctx, cont)):
                    pos = torch.arange(len(a) - 1, len(a) + len(b) - 1)
                    logp[k, pos, torch.tensor(b)].sum()

    t_plain = _median_seconds(repeats, plain)
    return {"task": "toy_mc (4 choices, from toy up items)", "items": len(docs), "requests": len(pairs),
            "evaluate_s": round(t_eval, 3), "plain_loglikelihood_s": round(t_plain, 3),
            "ratio_evaluate_over_loglikelihood": round(t_eval / t_plain, 2)}


def _variant(space_path: Path, settings: dict, seed: int, trials: int, folder: Path) -> Path:
    """The space file with `search:` settings replaced (written next to nothing: paths made absolute)."""
    import yaml

    data = yaml.safe_load(space_path.read_text())
    search = dict(data.get("search") or {})
    search.update(settings, seed=seed, trials=trials)
    data["search"] = search
    base = space_path.parent
    for key in ("tasks_dir",):
        v = data["objective"].get(key)
        if v and v != "toy" and not os.path.isabs(v):
            data["objective"][key] = str((base / v).resolve())
    fix = lambda p: p if str(p).startswith("toy:") or os.path.isabs(str(p)) else str((base / p).resolve())  # noqa: E731
    data["models"] = [fix(m) if isinstance(m, str) else {**m, "path": fix(m["path"])} for m in data["models"]]
    if isinstance(data.get("base_model"), str):
        data["base_model"] = fix(data["base_model"])
    out = folder / f"{space_path.stem}.yaml"
    out.write_text(yaml.safe_dump(data, sort_keys=False))
    return out


def _one_run(space, folder: Path, rescorer) -> dict:
    from optuna.trial import TrialState
    from scipy.stats import spearmanr

    from evomerge.search.fitness import ANCHORS_ATTR, ITEMS_ATTR
    from evomerge.search.run import run_search

    t0 = time.perf_counter()
    result = run_search(space, folder / "run", progress=False, evidence=False, log=lambda *_: None)
    wall = time.perf_counter() - t0
    study = result.study
    finished = [t for t in study.get_trials(deepcopy=False) if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    anchors = study.user_attrs.get(ANCHORS_ATTR) or {}
    items = sum(int(t.user_attrs.get(ITEMS_ATTR, 0)) for t in study.trials) + int(anchors.get("reference_items", 0))
    starts = [t.datetime_start for t in study.trials if t.datetime_start]
    ends = [t.datetime_complete for t in study.trials if t.datetime_complete]
    search_s = (max(ends) - min(starts)).total_seconds() + float(anchors.get("seconds", 0.0))
    estimated = [t.value if t.state == TrialState.COMPLETE else t.intermediate_values[max(t.intermediate_values)]
                 for t in finished]
    row = {"items": items, "trials": len(finished), "pruned": sum(t.state == TrialState.PRUNED for t in finished),
           "search_s": round(search_s, 2), "run_s": round(wall, 2),
           "winner": result.winner.label if result.winner else None,
           "winner_report": result.winner.scores["report"]["score"] if result.winner else None}
    if rescorer is not None:
        full = [rescorer(t.params) for t in finished]
        row["spearman_vs_full"] = round(float(spearmanr(estimated, full).statistic), 4)
    return row


def strategies(space_path: Path, seeds: int, trials: int, only: list[str]) -> dict:
    from evomerge.executors.worker import TrialJob, Worker
    from evomerge.search.jobs import worker_spec
    from evomerge.search.score import score
    from evomerge.search.spacefile import load_space
    from evomerge.search.suggest import build_recipe

    reference = load_space(space_path)
    worker = Worker(worker_spec(reference))  # re-scores every trial on the full limit (rank correlation)
    worker.setup()

    def rescorer(params: dict) -> float:
        out = worker.run(TrialJob(0, build_recipe(reference, params).to_dict(), "search", reference.budget.limit,
                                  reference.budget.seed))
        return float(score(out.metrics, reference.objective, "search"))

    rows: dict[str, list[dict]] = {}
    with tempfile.TemporaryDirectory(prefix="evomerge-fitness-") as tmp:
        for name in only:
            for seed in range(seeds):
                folder = Path(tmp) / f"{name}-{seed}"
                folder.mkdir()
                space = load_space(_variant(space_path, STRATEGIES[name], seed, trials, folder))
                row = _one_run(space, folder, None if name == "full" else rescorer)
                row["seed"] = seed
                rows.setdefault(name, []).append(row)
                print(json.dumps({"strategy": name, **row}), file=sys.stderr, flush=True)
    summary = {}
    base = rows.get("full")
    for name, rs in rows.items():
        s = {"items_mean": statistics.mean(r["items"] for r in rs),
             "search_s_mean": round(statistics.mean(r["search_s"] for r in rs), 2),
             "winner_report_mean": round(statistics.mean(r["winner_report"] for r in rs if r["winner_report"] is not None), 4),
             "spearman_mean": (round(statistics.mean(r["spearman_vs_full"] for r in rs), 3)
                               if "spearman_vs_full" in rs[0] else 1.0)}
        if base:
            s["fewer_items_than_full"] = round(statistics.mean(r["items"] for r in base) / s["items_mean"], 2)
            s["report_minus_full_points"] = round(100 * (s["winner_report_mean"] - statistics.mean(
                r["winner_report"] for r in base)), 2)
            if name != "full" and len(rs) > 1:  # paired by seed: a 95% t-interval of the mean difference
                from scipy import stats

                diff = [100 * (r["winner_report"] - b["winner_report"]) for r, b in zip(rs, base)]
                lo, hi = stats.t.interval(0.95, len(diff) - 1, loc=statistics.mean(diff), scale=stats.sem(diff))
                s["report_minus_full_ci95"] = [round(float(lo), 2), round(float(hi), 2)]
            # the target: at least 5x fewer items, the winner's mean report score at most 1 point below (a)'s
            s["target_met"] = bool(s["fewer_items_than_full"] >= 5 and s["report_minus_full_points"] >= -1.0)
        summary[name] = s
    return {"space": reference.name, "seeds": seeds, "trials": trials, "strategies": STRATEGIES,
            "summary": summary, "runs": rows}


def estimators(space_path: Path, trials: int, k: int = 8, draws: int = 30) -> dict:
    """Offline, on a fixed set of trials (those of one `full` search, seed 0): how well the anchor
    estimate and a random subset of the same size rank them, without the search reacting to either.
    Every trial and reference is scored item by item on the full limit once; each estimator is then
    drawn `draws` times. Reports the Spearman correlation with the full-limit fitness and the regret of
    the top 5 by the estimate (full-limit best minus the best of those 5, in points on the search split)."""
    import numpy as np
    from scipy.stats import spearmanr

    from evomerge.executors.worker import TrialJob, Worker
    from evomerge.search.fitness import anchor_plan
    from evomerge.search.jobs import worker_spec
    from evomerge.search.run import run_search
    from evomerge.search.score import objective_rows
    from evomerge.search.spacefile import load_space
    from evomerge.search.suggest import build_recipe, reference_recipes

    with tempfile.TemporaryDirectory(prefix="evomerge-estimators-") as tmp:
        space = load_space(_variant(space_path, {}, 0, trials, Path(tmp)))
        study = run_search(space, Path(tmp) / "run", progress=False, select=False, write=False, evidence=False,
                           log=lambda *_: None).study
    worker = Worker(worker_spec(space))
    worker.setup()

    def items(recipe: dict) -> dict[str, list[float]]:
        out = worker.run(TrialJob(0, recipe, "search", space.budget.limit, space.budget.seed, per_item=True))
        return objective_rows(out.items, space.objective, "search")

    refs = reference_recipes(space)
    references = {label: items(r) for label, r in refs}
    scored = [items(build_recipe(space, t.params).to_dict()) for t in study.trials]
    tasks = sorted(scored[0])
    full = np.array([np.mean([np.mean(t[name]) for name in tasks]) for t in scored])

    def estimate(plan, t):
        return np.mean([sum(w * t[n][j] for j, w in zip(plan[n]["picks"], plan[n]["weights"])) for n in tasks])

    def judge(make) -> dict:
        rho, regret = [], []
        for d in range(draws):
            plan = make(d)
            e = np.array([estimate(plan, t) for t in scored])
            rho.append(spearmanr(e, full).statistic)
            regret.append(100 * (full.max() - full[np.argsort(-e)[:5]].max()))
        return {"spearman": round(float(np.mean(rho)), 3), "top5_regret_points": round(float(np.mean(regret)), 2)}

    n = len(scored[0][tasks[0]])

    def random_plan(d):
        rng = np.random.default_rng(1000 + d)
        return {name: {"picks": sorted(rng.choice(n, k, replace=False).tolist()), "weights": [1 / k] * k}
                for name in tasks}

    return {"trials": len(scored), "references": len(refs), "items_per_task": k, "draws": draws,
            "anchors": judge(lambda d: anchor_plan(references, k, d)), "random": judge(random_plan)}


def main() -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--space", default=str(TOY_SPACE))
    ap.add_argument("--part", choices=("all", "overhead", "strategies", "estimators"), default="all")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--trials", type=int, default=60)
    ap.add_argument("--only", default=",".join(STRATEGIES), help="comma-separated strategies (default: all)")
    args = ap.parse_args()
    out: dict = {"benchmark": "fitness_cost"}
    if args.part in ("all", "overhead"):
        out["overhead"] = overhead(args.space, args.repeats)
        if Path(args.space).resolve() == TOY_SPACE.resolve():
            out["overhead_multiple_choice"] = overhead_mc(args.repeats)
    if args.part in ("all", "strategies"):
        out["strategies"] = strategies(Path(args.space).resolve(), args.seeds, args.trials, args.only.split(","))
    if args.part in ("all", "estimators"):
        out["estimators"] = estimators(Path(args.space).resolve(), args.trials)
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
