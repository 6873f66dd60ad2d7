"""MoE build benchmark: `evomerge moe` vs `mergekit-moe`, side by side, on 4 experts of the 271M models.

    python benchmarks/moe_speed.py                       # full run (~271M-param experts), prints JSON
    python benchmarks/moe_speed.py --size tiny --repeats 1 --work /tmp/bench-tiny   # smoke test (seconds)

What it does:
1. Reuses merge_speed.py's cached bf16 Llama-style models (`base`, `ft_a`, `ft_b`, built once) and adds two
   more fine-tune-like variants `ft_c`, `ft_d` (base + N(0, 0.002)), so that there are 4 experts.
2. Writes one mergekit-moe config per case: 4 experts (and 2 experts, to show how memory grows with the
   expert count), `gate_mode: hidden` (the default: the base runs on each expert's prompts) and
   `cheap_embed`, `dtype: bfloat16`, distinct positive prompts per expert.
3. For each repeat and case, runs `evomerge moe CFG OUT --overwrite --no-progress` and
   `mergekit-moe CFG OUT` as child processes through merge_speed's `python -I -S` wrapper (wall time,
   the child's own ru_maxrss and CPU seconds, sampled anonymous vs file-backed RSS); order alternates
   between repeats; outputs deleted and `sync` before each run.
4. Loads both outputs with transformers and compares every tensor (mergekit-moe 0.1.5 writes the
   experts fused as transformers 5 holds them in memory, evomerge writes one tensor per expert as
   `save_pretrained` does; loaded, they are the same model).
5. Prints one JSON object: medians, ratios (mergekit / evomerge wall, evomerge / mergekit RSS), the RSS
   of 4 experts over 2 experts for each tool, agreement, and the targets (faster, at no more memory).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from merge_speed import ROOT, SIZES, VENV_BIN, _median, build_models, run_child  # noqa: E402

EXTRA = ("ft_c", "ft_d")
PROMPTS = {"ft_a": ["the sum of two numbers", "add these"], "ft_b": ["write a short poem", "a rhyme about"],
           "ft_c": ["translate into french", "in german this is"], "ft_d": ["a python function that", "def main"]}


def build_extra(work: Path, size: str, seed: int = 7) -> dict[str, Path]:
    """ft_c, ft_d next to merge_speed's models (base + small noise), cached."""
    import torch
    from safetensors.torch import load_file, save_file

    models = build_models(work, size)
    root = models["base"].parent
    stamp = root / "MOE_EXTRA.json"
    want = {"seed": seed, "names": list(EXTRA), "base_mtime": (models["base"] / "model.safetensors").stat().st_mtime}
    paths = {**models, **{n: root / n for n in EXTRA}}
    if stamp.exists() and json.loads(stamp.read_text()) == want and all(
            (paths[n] / "model.safetensors").exists() for n in EXTRA):
        return paths
    base = load_file(str(models["base"] / "model.safetensors"))
    gen = torch.Generator().manual_seed(seed)
    for name in EXTRA:
        folder = paths[name]
        if folder.exists():
            shutil.rmtree(folder)
        shutil.copytree(models["base"], folder)
        tensors = {k: (t.float() + 0.002 * torch.randn(t.shape, generator=gen)).to(t.dtype).contiguous()
                   for k, t in base.items()}
        save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
        del tensors
    stamp.write_text(json.dumps(want))
    return paths


def write_configs(work: Path, models: dict[str, Path]) -> dict[str, Path]:
    import yaml

    folder = work / "moe_configs"
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for n_experts in (4, 2):
        for mode in ("hidden", "cheap_embed"):
            names = ["ft_a", "ft_b", "ft_c", "ft_d"][:n_experts]
            cfg = {"base_model": str(models["base"]), "gate_mode": mode, "dtype": "bfloat16", "experts_per_token": 2,
                   "experts": [{"source_model": str(models[n]), "positive_prompts": PROMPTS[n]} for n in names]}
            path = folder / f"moe{n_experts}_{mode}.yaml"
            path.write_text(yaml.safe_dump(cfg, sort_keys=False))
            out[f"{n_experts}_experts_{mode}"] = path
    return out


def tool_cmd(tool: str, cfg: Path, out: Path) -> list[str]:
    if tool == "evomerge":
        return [str(VENV_BIN / "evomerge"), "moe", str(cfg), str(out), "--overwrite", "--no-progress"]
    return [str(VENV_BIN / "mergekit-moe"), str(cfg), str(out)]


def compare(a: Path, b: Path) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    sa = AutoModelForCausalLM.from_pretrained(str(a), dtype=torch.bfloat16).state_dict()
    sb = AutoModelForCausalLM.from_pretrained(str(b), dtype=torch.bfloat16).state_dict()
    if sa.keys() != sb.keys():
        return {"identical": False, "error": f"names differ: {sorted(set(sa) ^ set(sb))[:5]}"}
    differing = [k for k in sa if sa[k].dtype != sb[k].dtype or not torch.equal(sa[k], sb[k])]
    worst = max(((float((sa[k].float() - sb[k].float()).abs().max()), k) for k in differing), default=(0.0, None))
    return {"tensors_compared": len(sa), "differing_tensors": len(differing), "max_abs_diff": worst[0],
            "worst_tensor": worst[1], "identical": not differing}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work", default=str(ROOT / ".cache" / "bench"), help="cache + scratch folder")
    ap.add_argument("--size", choices=sorted(SIZES), default="full")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--cases", default="4_experts_hidden,4_experts_cheap_embed,2_experts_hidden",
                    help="comma list of N_experts_MODE (N in 2, 4; MODE hidden or cheap_embed)")
    ap.add_argument("--keep-outputs", action="store_true")
    args = ap.parse_args(argv)

    work = Path(args.work)
    t0 = time.perf_counter()
    models = build_extra(work, args.size)
    configs = write_configs(work, models)
    cases = [c for c in args.cases.split(",") if c]
    for c in cases:
        if c not in configs:
            ap.error(f"unknown case {c!r}; choose from {', '.join(configs)}")
    for m in models.values():  # warm the page cache once, so that the first timed run is not penalized
        with open(m / "model.safetensors", "rb") as fh:
            while fh.read(1 << 24):
                pass
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    scratch = work / "moe_out"
    scratch.mkdir(parents=True, exist_ok=True)
    runs: dict[str, dict[str, list[dict]]] = {c: {"evomerge": [], "mergekit": []} for c in cases}
    agreement = {}
    for rep in range(args.repeats):
        for case in cases:
            order = ("evomerge", "mergekit") if rep % 2 == 0 else ("mergekit", "evomerge")
            for tool in order:
                out = scratch / f"{case}_{tool}"
                shutil.rmtree(out, ignore_errors=True)
                subprocess.call(["sync"])
                print(f"[bench] repeat {rep + 1}/{args.repeats} {case} {tool}", file=sys.stderr)
                runs[case][tool].append(run_child(tool_cmd(tool, configs[case], out), scratch / f"{case}_{tool}.log",
                                                  env))
            if case not in agreement:
                agreement[case] = compare(scratch / f"{case}_evomerge", scratch / f"{case}_mergekit")
    result: dict = {"benchmark": "moe_speed", "size": args.size, "model_config": SIZES[args.size],
                    "repeats": args.repeats, "cases": {}, "targets": {}}
    for case in cases:
        entry = {}
        for tool in ("evomerge", "mergekit"):
            r = runs[case][tool]
            entry[tool] = {"median_wall_s": _median(r, "wall_s"), "median_cpu_s": _median(r, "cpu_s"),
                           "median_rss_mb": _median(r, "rss_mb"), "median_peak_anon_mb": _median(r, "peak_anon_mb"),
                           "runs": r}
        e, m = entry["evomerge"], entry["mergekit"]
        if e["median_wall_s"] and m["median_wall_s"]:
            entry["speedup_mergekit_over_evomerge"] = round(m["median_wall_s"] / e["median_wall_s"], 2)
            entry["cpu_ratio_mergekit_over_evomerge"] = round(m["median_cpu_s"] / max(e["median_cpu_s"], 1e-9), 2)
            entry["rss_ratio_evomerge_over_mergekit"] = round(e["median_rss_mb"] / m["median_rss_mb"], 2)
            result["targets"][f"{case}_faster"] = {"value": entry["speedup_mergekit_over_evomerge"], "target": 1.0,
                                                    "met": entry["speedup_mergekit_over_evomerge"] > 1.0}
            result["targets"][f"{case}_rss_no_more"] = {"value": entry["rss_ratio_evomerge_over_mergekit"],
                                                        "target": 1.0,
                                                        "met": entry["rss_ratio_evomerge_over_mergekit"] <= 1.0}
        entry["agreement"] = agreement.get(case)
        result["cases"][case] = entry
    for tool in ("evomerge", "mergekit"):
        four, two = (result["cases"].get(f"{n}_experts_hidden", {}).get(tool, {}).get("median_rss_mb") for n in (4, 2))
        if four and two:
            result[f"{tool}_rss_4_over_2_experts"] = round(four / two, 2)
    result["all_targets_met"] = bool(result["targets"]) and all(t["met"] for t in result["targets"].values())
    result["seconds"] = round(time.perf_counter() - t0, 1)
    if not args.keep_outputs:
        shutil.rmtree(scratch, ignore_errors=True)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
