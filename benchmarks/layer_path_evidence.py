"""Does data-flow merging pay? DFS alone, PS alone, PS+DFS, the identity path and the parents, on one report split.

    HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 .venv/bin/python benchmarks/layer_path_evidence.py                 # toy
    .venv/bin/python benchmarks/layer_path_evidence.py --family ~/.cache/evomerge/smollm2-0.1.2-e9f158bae3f2 --trials 24

The protocol (fixed before any run; the same for both families):
- anchor: the PS space's first model (toy: `up`; SmolLM2: `add`), donor: its second (`rev`).
- PS alone: the PS space as shipped (toy: search_spaces/toy_slerp_gradient.yaml, SLERP gradients of up and
  rev; SmolLM2: the family's space.yaml, task arithmetic of add and rev over the base), `--trials` trials.
- DFS alone: a layer path over [anchor, donor] (search_spaces/toy_layer_path.yaml's settings: 2 edits of
  repeat/swap/skip, gain 0.5-1.5), `--trials` trials, the same objective.
- PS+DFS (chained runs, as docs/layer_path.md describes): the PS winner merged to a folder with
  `evomerge merge`, then a layer path with that folder as the anchor and both experts as donors,
  `--trials` trials.
- the identity path: the anchor's own path exported through the passthrough export (a plain model).
Every search selects its winner on `select` (top-k re-scored) and the same seed 0. The winners, the
identity path and the parents are then scored once on the report split by `evomerge eval`'s code
(`comparison.eval_models`): each mixture with a 95% bootstrap interval and the paired difference from
the anchor (interval, paired-bootstrap p, McNemar); then PS alone, PS+DFS and the donor against DFS alone,
and PS+DFS against PS alone.
Parameter counts are read from each folder's safetensors headers. Prints one JSON object (the tables
as markdown under `markdown`); runs and models go under --work (default ./.cache/layer_path_evidence/<family>).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PATH_SETTINGS = {"edits": 2, "ops": ["repeat", "swap", "skip"], "gain": {"low": 0.5, "high": 1.5}}


def ps_space_file(family: str | None) -> Path:
    return ROOT / "search_spaces" / "toy_slerp_gradient.yaml" if family is None else Path(family).expanduser() / "space.yaml"


def path_space(ps, models: list[dict], anchor: str, name: str, work: Path) -> Path:
    """A layer-path space file (absolute paths) with the PS space's objective, splits, protocol and limit."""
    import yaml

    obj = ps.objective
    data = {"name": name, "models": models, "method": "layer_path", "layer_path": {"anchor": anchor, **PATH_SETTINGS},
            "objective": {"tasks_dir": obj.tasks_dir, "tasks": [t.model_dump() for t in obj.tasks],
                          "splits": _splits(obj.splits), "protocol": obj.protocol.model_dump(mode="json")},
            "search": {"limit": ps.budget.limit, "seed": 0, "top_k": ps.budget.top_k}}
    path = work / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def _splits(splits) -> dict:
    if splits.mode == "named":
        return dict(splits.names)
    return {"carve": splits.fractions.model_dump(), "seed": splits.seed}


def search_and_merge(space_file: Path, trials: int, work: Path, label: str, threads: int) -> dict:
    """One search (its winner chosen on select), its best.yaml merged into work/<label>."""
    from evomerge.engine.merge import merge_to_dir
    from evomerge.search.run import run_search
    from evomerge.search.spacefile import load_space

    space = load_space(space_file).with_overrides(trials=trials)
    run, model = work / f"run-{label}", work / label
    for folder in (run, model):
        shutil.rmtree(folder, ignore_errors=True)
    t0 = time.perf_counter()
    result = run_search(space, run, progress=False, evidence=False, threads_per_worker=threads,
                        log=lambda *a, **k: print(*a, file=sys.stderr))
    seconds = time.perf_counter() - t0
    merge_to_dir(run / "best.yaml", model, progress=False)
    w = result.winner
    out = {"space": str(space_file), "trials": trials, "seconds": round(seconds, 1), "winner": w.label,
           "search": w.scores.get("search", {}).get("score"), "select": w.scores.get("select", {}).get("score"),
           "model": str(model), "recipe": w.recipe.to_dict()}
    out.update(_shape(w.recipe, space))
    out["select_candidates"] = [{"label": c.label, **_shape(c.recipe, space), "search": c.scores.get("search", {}).get("score"),
                                 "select": c.scores["select"].get("score")}
                                for c in result.candidates if c.trial is not None and "select" in c.scores]
    return out


def _shape(recipe, space) -> dict:
    """A path's description and depth (a passthrough recipe), else its method."""
    if recipe.merge_method != "passthrough":
        return {"method": recipe.merge_method}
    from evomerge.engine.layer_path import describe, path_steps

    steps = path_steps(recipe)
    return {"path": describe(steps, {m.path: m.name for m in space.models}), "depth": len(steps)}


def identity(anchor: str, dtype: str, work: Path) -> str:
    """The anchor's identity path, exported like any path."""
    from evomerge.engine.checkpoints import Sources
    from evomerge.engine.layer_path import Step, path_recipe
    from evomerge.engine.merge import merge_to_dir

    sources = Sources.open([anchor])
    n = sources.num_layers(anchor)
    sources.close()
    recipe = work / "identity.yaml"
    recipe.write_text(path_recipe([Step(anchor, i) for i in range(n)], dtype=dtype).to_yaml())
    shutil.rmtree(work / "identity", ignore_errors=True)
    merge_to_dir(recipe, work / "identity", progress=False)
    return str(work / "identity")


def parameters(folder: str) -> int:
    from evomerge.engine.checkpoints import Sources

    sources = Sources.open([folder])
    try:
        ck = sources.checkpoint(folder)
        total = 0
        for info in ck.tensors.values():
            n = 1
            for d in info.shape:
                n *= d
            total += n
        return total
    finally:
        sources.close()


def run_all(family: str | None, trials: int, work: Path, threads: int) -> dict:
    from evomerge.search.spacefile import load_space

    ps_file = ps_space_file(family)
    ps = load_space(ps_file)
    anchor, donor = ps.models[0], ps.models[1]
    runs = {"ps": search_and_merge(ps_file, trials, work, "ps", threads)}
    dfs_file = path_space(ps, [{"name": m.name, "path": m.path} for m in (anchor, donor)], anchor.name, "dfs_space", work)
    runs["dfs"] = search_and_merge(dfs_file, trials, work, "dfs", threads)
    models = [{"name": "ps", "path": runs["ps"]["model"]}, {"name": anchor.name, "path": anchor.path},
              {"name": donor.name, "path": donor.path}]
    runs["ps_dfs"] = search_and_merge(path_space(ps, models, "ps", "ps_dfs_space", work), trials, work, "ps_dfs", threads)
    folders = {anchor.name: anchor.path, "identity": identity(anchor.path, ps.dtype, work), "dfs": runs["dfs"]["model"],
               "ps": runs["ps"]["model"], "ps_dfs": runs["ps_dfs"]["model"], donor.name: donor.path}
    return {"anchor": anchor.name, "donor": donor.name, "runs": runs, "folders": folders, "dfs_space": str(dfs_file)}


def tables(done: dict, work: Path) -> dict:
    """The report split, three times over the same items: every model against the anchor; PS alone, PS+DFS
    and the donor against DFS alone; PS+DFS against PS alone (paired differences need a shared reference)."""
    from evomerge.search.comparison import eval_models, markdown

    folders = done["folders"]
    link = work / "eval"  # folder names are the table's labels
    shutil.rmtree(link, ignore_errors=True)
    link.mkdir()
    for label, path in folders.items():
        (link / label).symlink_to(Path(path).resolve(), target_is_directory=True)
    quiet = lambda *a, **k: print(*a, file=sys.stderr)  # noqa: E731
    orders = {"vs_anchor": list(folders), "vs_dfs": ["dfs", "ps", "ps_dfs", done["donor"]], "vs_ps": ["ps", "ps_dfs"]}
    results = {name: eval_models([str(link / k) for k in order], space=done["dfs_space"], log=quiet)
               for name, order in orders.items()}
    counts = {k: parameters(v) for k, v in folders.items()}
    rows = {k: {"mixture": v["mixture"], "tasks": v["tasks"], "parameters": counts[k]}
            for k, v in results["vs_anchor"]["models"].items()}
    for name, result in results.items():
        for k, paired in result["paired_vs_first"].items():
            rows[k][name] = {"delta": paired["delta"], "p_bootstrap": paired["p_bootstrap"],
                             "p_mcnemar": paired["p_mcnemar"]}
    params = "\n".join(f"- {k}: {n / 1e6:.2f}M parameters" for k, n in counts.items())
    text = "\n".join(markdown(r) for r in results.values())
    return {"rows": rows, "markdown": text + "\n" + params + "\n"}


def main(argv=None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--family", default=None, help="a SmolLM2 family folder (examples/smollm2/build.py); default: toy")
    ap.add_argument("--trials", type=int, default=40, help="trials of each of the three searches")
    ap.add_argument("--threads", type=int, default=1, help="torch threads of the search worker")
    ap.add_argument("--work", default=None)
    args = ap.parse_args(argv)
    name = "toy" if args.family is None else Path(args.family).expanduser().name
    work = Path(args.work or ROOT / ".cache" / "layer_path_evidence" / name).resolve()
    work.mkdir(parents=True, exist_ok=True)
    done = run_all(args.family, args.trials, work, args.threads)
    out = {"benchmark": "layer_path_evidence", "family": name, "trials": args.trials, "anchor": done["anchor"],
           "donor": done["donor"], "runs": done["runs"], **tables(done, work)}
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
