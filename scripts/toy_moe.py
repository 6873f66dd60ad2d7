"""Does an MoE of the toy experts pay? Its report-split row beside the merges, with a paired interval.

Scores, on the toy family's `report` split (1,200 items), per item:
- the naive MoE (all four experts, 2 per token, hidden-state routers) and the MoE a search found
  (`--moe-best`, a best.yaml of `evomerge search search_spaces/toy_moe.yaml`);
- the best merge (`--merge-best`, default examples/toy_best_search.yaml) and the best expert (`next`);
- a diagnostic: the base's attention with one expert's MLP (what any frankenMoE keeps of that expert);
- the naive MoE built on the best merge instead of the base (its attention, norms and embeddings).
Prints a JSON object: per-skill rows, mixtures, total and active parameter counts, and the paired
bootstrap interval of each MoE against the best merge and the best expert (scripts/toy_table.py's
`paired_delta`). Writes examples/toy_moe_best.yaml (relative paths) when --moe-best is given.

    .venv/bin/python scripts/toy_moe.py --moe-best runs/toy_moe/best.yaml
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HOME", "/tmp/evomerge-toy-hf")

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))
from toy_table import external_recipe, mixture, paired_delta, rel  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--moe-best", help="best.yaml of a method: moe search")
    ap.add_argument("--merge-best", default=str(REPO / "examples" / "toy_best_search.yaml"))
    args = ap.parse_args()

    from evomerge.engine.checkpoints import Sources
    from evomerge.evaluation.evaluate import LMEvalEvaluator
    from evomerge.executors.worker import Worker, WorkerSpec
    from evomerge.moe.build import plan_moe
    from evomerge.moe.config import MoEConfig, load_moe_config
    from evomerge.toy.family import family

    fam = family()
    skills = list(fam.skills)
    weights = {s: 1.0 for s in skills}
    base = str(fam.base)
    experts = {s: str(fam.experts[s]) for s in skills}
    spec = WorkerSpec(sources=(base, *experts.values()), base=base, tasks=tuple(f"toy_{s}" for s in skills),
                      include_path=str(fam.tasks_dir))
    worker = Worker(spec)
    worker.setup()
    ev: LMEvalEvaluator = worker.evaluator

    naive = MoEConfig.from_dict({"base_model": base, "gate_mode": "hidden", "experts_per_token": 2, "dtype": "float32",
                                 "experts": [{"source_model": experts[s],
                                              "positive_prompts": [f"{s} abc=", f"{s} kite=", f"{s} moon="]}
                                             for s in ("up", "next", "rev", "sort")]})
    rows: dict[str, dict] = {}
    items: dict[str, dict] = {}

    def score(label: str, recipe: dict) -> None:
        model = worker.merge(recipe)
        res = ev.evaluate(model, "report", per_item=True)
        rows[label] = {s: round(res.metrics[f"toy_{s}_report"]["exact_match"], 4) for s in skills}
        rows[label]["mixture"] = round(mixture(rows[label], weights), 4)
        items[label] = {s: res.items[f"toy_{s}_report"]["exact_match"] for s in skills}
        print(f"[toy_moe] {label}: {rows[label]['mixture']:.3f}", file=sys.stderr)

    def params(cfg: MoEConfig) -> dict:
        sources = Sources.open(cfg.referenced_models())
        total, active = plan_moe(cfg, sources).parameters
        return {"total": total, "active_per_token": active}

    moes = {"moe_naive": naive}
    if args.moe_best:
        moes["moe_searched"] = load_moe_config(args.moe_best)
    for label, cfg in moes.items():
        score(label, cfg.to_dict())
    merge = external_recipe(args.merge_best)  # paths relative to the repository: make them absolute
    for entry in merge.get("models") or []:
        entry["model"] = str((REPO / entry["model"]).resolve())
    if merge.get("base_model"):
        merge["base_model"] = str((REPO / merge["base_model"]).resolve())
    score("best_merge", merge)
    score("expert_next", {"merge_method": "linear", "models": [{"model": experts["next"],
                                                                "parameters": {"weight": 1.0}}]})
    for s in ("up", "rev"):
        score(f"base_attention_{s}_mlp", {"merge_method": "linear", "models": [
            {"model": experts[s], "parameters": {"weight": [{"filter": "mlp", "value": 1.0}, {"value": 0.0}]}},
            {"model": base, "parameters": {"weight": [{"filter": "mlp", "value": 0.0}, {"value": 1.0}]}}]})
    # the same naive MoE with the best merge's attention instead of the base's: merge it to a temp folder
    import tempfile

    from evomerge.engine.merge import merge_to_dir

    with tempfile.TemporaryDirectory(prefix="toy-moe-") as tmp:
        merged = Path(tmp) / "best_merge"
        cwd = os.getcwd()
        os.chdir(REPO)  # the example recipe's paths are relative to the repository
        try:
            merge_to_dir(args.merge_best, merged, progress=False)
        finally:
            os.chdir(cwd)
        on_merge = Worker(WorkerSpec(sources=(str(merged), *experts.values()), base=str(merged),
                                     tasks=spec.tasks, include_path=spec.include_path))
        on_merge.setup()
        res = on_merge.evaluator.evaluate(on_merge.merge({**naive.to_dict(), "base_model": str(merged)}), "report")
        row = {s: round(res.metrics[f"toy_{s}_report"]["exact_match"], 4) for s in skills}
        row["mixture"] = round(mixture(row, weights), 4)
        rows["moe_naive_on_best_merge_attention"] = row
        print(f"[toy_moe] moe_naive_on_best_merge_attention: {row['mixture']:.3f}", file=sys.stderr)
    out = {"rows": rows, "parameters": {label: params(cfg) for label, cfg in moes.items()},
           "dense_parameters": sum(p.numel() for p in worker.model.parameters()), "paired": {}}
    for label in moes:
        for ref in ("best_merge", "expert_next"):
            d, lo, hi = paired_delta(items[label], items[ref], weights)
            out["paired"][f"{label}_minus_{ref}"] = {"delta": round(d, 4), "ci95": [round(lo, 4), round(hi, 4)]}
    if args.moe_best:
        data = moes["moe_searched"].to_dict()
        data["base_model"] = rel(Path(data["base_model"]))
        for e in data["experts"]:
            e["source_model"] = rel(Path(e["source_model"]))
        cfg = MoEConfig.from_dict(data)
        (REPO / "examples" / "toy_moe_best.yaml").write_text(cfg.to_yaml(comments=[
            "The MoE that `evomerge search search_spaces/toy_moe.yaml --trials 40` found on the toy family",
            "(scripts/toy_moe.py scores it). Build it: evomerge moe examples/toy_moe_best.yaml OUT"]))
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
