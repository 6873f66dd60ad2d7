"""The steps of benchmarks/cost_growth.py: models, merge runs, search runs, each cached as JSON.

Why a separate module: cost_growth.py is the command line and the order of the steps; this holds what
each step measures, so that every measurement is one function writing one cached result file.
Reuses merge_speed.py's runner (a `python -I -S` wrapper around each child: wall, CPU, its own
ru_maxrss, sampled heap vs file-backed RSS), its recipes and its output comparison.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import merge_speed

ROOT = Path(__file__).resolve().parent.parent
MODELS = ("base", "ft_a", "ft_b")
BUILD_VERSION = 1
# Llama shapes (vocab 32000, untied embeddings, bf16): 0.106B, 0.478B, 1.03B, 2.02B parameters
SIZES = {
    "0.1b": dict(hidden_size=768, num_hidden_layers=8, intermediate_size=2048, num_attention_heads=12,
                 num_key_value_heads=12),
    "0.5b": dict(hidden_size=1280, num_hidden_layers=20, intermediate_size=3456, num_attention_heads=20,
                 num_key_value_heads=20),
    "1b": dict(hidden_size=2048, num_hidden_layers=20, intermediate_size=5632, num_attention_heads=32,
               num_key_value_heads=8),
    "2b": dict(hidden_size=2560, num_hidden_layers=27, intermediate_size=6912, num_attention_heads=40,
               num_key_value_heads=8),
}
VOCAB = 32000
SOURCE_SHARD = "2GB"
MIB = 2**20


def log(msg: str) -> None:
    print(f"[cost_growth {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def env_for(work: Path) -> dict:
    return dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
                HF_HOME=str(work / "hf_home"), TOKENIZERS_PARALLELISM="false", RAY_USAGE_STATS_ENABLED="0")


def machine_state() -> dict:
    """The load average and free memory now (every quoted figure carries them)."""
    mem = {}
    with open("/proc/meminfo") as fh:
        for line in fh:
            key, value = line.split(":")
            if key in ("MemTotal", "MemAvailable"):
                mem[key] = round(int(value.split()[0]) / 2**20, 2)
    return {"load": [round(x, 2) for x in os.getloadavg()], "mem_gib": mem,
            "utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def _save(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2))
    os.replace(tmp, path)


# ------------------------------------------------------------------------------------------------
# Models
# ------------------------------------------------------------------------------------------------
def model_config(size: str) -> dict:
    return dict(SIZES[size], vocab_size=VOCAB, max_position_embeddings=2048, tie_word_embeddings=False,
                bos_token_id=1, eos_token_id=2, pad_token_id=3)


def build(work: Path, size: str, seed: int = 0) -> dict[str, Path]:
    """base, ft_a, ft_b under WORK/models-SIZE, written tensor by tensor (cached)."""
    root = work / f"models-{size}"
    paths = {m: root / m for m in MODELS}
    stamp = root / "BUILT.json"
    want = {"version": BUILD_VERSION, "size": size, "seed": seed, "config": model_config(size)}
    if stamp.exists() and {k: v for k, v in json.loads(stamp.read_text()).items() if k in want} == want:
        return paths
    t0 = time.perf_counter()
    log(f"building {size} under {root}")
    shutil.rmtree(root, ignore_errors=True)
    n_params = _write_weights(paths, model_config(size), seed)
    for folder in paths.values():
        _write_side_files(folder, model_config(size))
    info = dict(want, params=n_params, bytes_per_model=2 * n_params, build_s=round(time.perf_counter() - t0, 1),
                built=machine_state())
    stamp.write_text(json.dumps(info, indent=2))
    log(f"built {size}: {n_params / 1e9:.3f}B parameters in {info['build_s']} s")
    return paths


def _write_weights(paths: dict[str, Path], cfg: dict, seed: int) -> int:
    """Random bf16 weights, one tensor at a time into each model's streaming shards."""
    import torch

    from evomerge.engine.sinks import ShardedSafetensorsSink, TensorSpec

    specs = merge_speed._tensor_specs(cfg)
    sinks = {m: ShardedSafetensorsSink(p, SOURCE_SHARD, background=False) for m, p in paths.items()}
    for sink in sinks.values():
        sink.prepare([TensorSpec(n, tuple(s), "bfloat16") for n, s in specs])
    gen = torch.Generator().manual_seed(seed)
    total = 0
    for name, shape in specs:
        if name.endswith("norm.weight"):
            base = 1.0 + 0.05 * torch.randn(shape, generator=gen)
        else:
            base = 0.02 * torch.randn(shape, generator=gen)
        sinks["base"].write(name, base.to(torch.bfloat16))
        for m in MODELS[1:]:  # fine-tune-like: base + N(0, 0.002)
            sinks[m].write(name, (base + 0.002 * torch.randn(shape, generator=gen)).to(torch.bfloat16))
        total += base.numel()
        del base
    for sink in sinks.values():
        sink.finish()
    return total


def _write_side_files(folder: Path, cfg: dict) -> None:
    from transformers import GenerationConfig, LlamaConfig

    lc = LlamaConfig(**cfg)
    lc.architectures = ["LlamaForCausalLM"]
    lc.dtype = "bfloat16"
    lc.save_pretrained(folder)
    GenerationConfig(bos_token_id=1, eos_token_id=2, pad_token_id=3).save_pretrained(folder)
    merge_speed._write_tokenizer(folder, cfg["vocab_size"])


def built_info(work: Path, size: str) -> dict:
    return json.loads((work / f"models-{size}" / "BUILT.json").read_text())


# ------------------------------------------------------------------------------------------------
# Merges
# ------------------------------------------------------------------------------------------------
def merge_run(work: Path, size: str, models: dict[str, Path], method: str, tool: str, rep: int,
              *, force: bool = False) -> dict | None:
    """One `evomerge merge` or `mergekit-yaml` run, cached as results/merge-SIZE-METHOD-TOOL-rREP.json."""
    res = work / "results" / f"merge-{size}-{method}-{tool}-r{rep}.json"
    if res.exists() and not force:
        return json.loads(res.read_text())
    cfg = merge_speed.write_configs(work / size, models)[method]
    out = work / "out" / f"{size}-{method}-{tool}"
    shutil.rmtree(out, ignore_errors=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    (work / "logs").mkdir(parents=True, exist_ok=True)
    os.sync()
    before = machine_state()
    extra = ["--quiet"] if tool == "mergekit" else []
    log(f"{size} {method} {tool} (load {before['load'][0]})")
    r = merge_speed.run_child(merge_speed.tool_cmd(tool, cfg, out, extra), work / "logs" / f"{res.stem}.log",
                              env_for(work))
    r.update(size=size, method=method, tool=tool, rep=rep, params=built_info(work, size)["params"],
             before=before, after=machine_state(), engine=merge_speed.engine_digest())
    if tool == "evomerge":
        r["plan"] = merge_plan(cfg)
    log(f"  -> {r.get('wall_s')} s, {r.get('rss_mb')} MB, rc {r.get('rc')}")
    if r.get("rc") == 0:
        _save(res, r)
    return r


def merge_plan(cfg: Path) -> dict:
    """The engine's memory plan for an export of this recipe (what `evomerge validate` prints)."""
    from evomerge.engine.merge import recipe_memory

    return recipe_memory(cfg).as_dict()


def compare(work: Path, size: str, method: str, rep: int) -> None:
    """Both tools' outputs tensor by tensor, once both exist; then the outputs are deleted."""
    res = work / "results" / f"agree-{size}-{method}-r{rep}.json"
    outs = {t: work / "out" / f"{size}-{method}-{t}" for t in ("evomerge", "mergekit")}
    if res.exists() or not all((o / "config.json").exists() for o in outs.values()):
        return
    log(f"comparing {size} {method}")
    _save(res, merge_speed.compare_outputs(outs["evomerge"], outs["mergekit"]))
    for o in outs.values():
        shutil.rmtree(o, ignore_errors=True)


# ------------------------------------------------------------------------------------------------
# Searches
# ------------------------------------------------------------------------------------------------
def space_text(space: str, models: dict[str, Path], trials: int) -> str:
    """A task-arithmetic space (base + 2) or a slerp space (ft_a, ft_b; a 3-point t gradient), bf16,
    scored on toy_up with 2 items per trial (the scores mean nothing; the costs are the point)."""
    b, a, c = (str(models[m].resolve()) for m in MODELS)
    head = f"name: cost_{space}\nmodels: [{a}, {c}]\n"
    if space == "task_arithmetic":
        body = (f"base_model: {b}\nmethod: task_arithmetic\nparameters:\n  task_arithmetic:\n"
                "    weight: {low: 0.0, high: 1.0}\n")
    else:
        body = "method: slerp\nparameters:\n  slerp:\n    t: {points: 3}\n"
    return (head + body + "dtype: bfloat16\nobjective:\n  tasks_dir: toy\n  tasks: [toy_up]\n"
            f"search: {{trials: {trials}, seed: 0, limit: 2, top_k: 1, sampler: random}}\n")


def search_run(work: Path, size: str, models: dict[str, Path], space: str, *, workers: int, trials: int,
               force: bool = False) -> dict | None:
    """One `evomerge search` (pre-flight, study, trials; no select/report) in a child process, cached as
    results/search-SIZE-SPACE-wWORKERS.json: its peak RSS, the per-trial merge times, the memory plan."""
    res = work / "results" / f"search-{size}-{space}-w{workers}.json"
    if res.exists() and not force:
        return json.loads(res.read_text())
    folder = work / size / "spaces"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{space}.yaml"
    path.write_text(space_text(space, models, trials))
    out = work / "out" / f"search-{size}-{space}-w{workers}"
    shutil.rmtree(out, ignore_errors=True)
    (work / "logs").mkdir(parents=True, exist_ok=True)
    before = machine_state()
    log(f"{size} search {space} x{workers} (load {before['load'][0]})")
    cmd = [sys.executable, str(Path(__file__).resolve().parent / "cost_growth.py"), "--_search", str(path),
           str(out), str(workers)]
    r = merge_speed.run_child(cmd, work / "logs" / f"{res.stem}.log", env_for(work))
    child = out / "child.json"
    if r.get("rc") == 0 and child.exists():
        r.update(json.loads(child.read_text()))
    r.update(size=size, space=space, workers=workers, params=built_info(work, size)["params"],
             before=before, after=machine_state(), engine=merge_speed.engine_digest())
    log(f"  -> {r.get('wall_s')} s, {r.get('rss_mb')} MB, merge/trial {r.get('merge_s_median')} s, rc {r.get('rc')}")
    if r.get("rc") == 0:
        _save(res, r)
        shutil.rmtree(out / "study", ignore_errors=True)
    return r


def search_child(space_path: str, out: str, workers: str) -> int:
    """The search itself (run in the child that search_run measures); writes OUT/child.json."""
    from evomerge.search.options import RunOptions
    from evomerge.search.preflight import search_plan
    from evomerge.search.run import run_search
    from evomerge.search.spacefile import load_space

    space = load_space(space_path)
    plan = search_plan(space, RunOptions(workers=int(workers))).as_dict()
    tree = TreeSampler()
    tree.start()
    t0 = time.perf_counter()
    try:
        result = run_search(space, out, workers=int(workers), select=False, write=False, evidence=False,
                            progress=False, log=lambda *_: None)
    finally:
        tree.done.set()
        tree.join()
    wall = time.perf_counter() - t0
    trials = [t for t in result.study.trials if t.user_attrs.get("timings")]
    merges = sorted(t.user_attrs["timings"].get("merge", 0.0) for t in trials[1:])  # the first is a warm-up
    evals = sorted(t.user_attrs["timings"].get("eval", 0.0) for t in trials[1:])
    setup = [t.user_attrs["timings"].get("setup") for t in trials if t.user_attrs["timings"].get("setup")]
    info = {"trials": len(trials), "search_s": round(wall, 2), "merge_s": [round(x, 3) for x in merges],
            "merge_s_median": round(merges[len(merges) // 2], 3) if merges else None,
            "eval_s_median": round(evals[len(evals) // 2], 3) if evals else None, "setup_s": setup,
            "plan": plan, "tree": tree.result()}
    Path(out).mkdir(parents=True, exist_ok=True)
    (Path(out) / "child.json").write_text(json.dumps(info, indent=2))
    return 0


class TreeSampler(threading.Thread):
    """The memory of this process and all its descendants (Ray's daemons and actors), sampled every
    0.5 s: the peak of the sums (RSS, heap, PSS) and each process's own peak RSS and heap."""

    def __init__(self, every: float = 0.5):
        super().__init__(daemon=True)
        self.every, self.done = every, threading.Event()
        self.peak = {"rss_mb": 0.0, "anon_mb": 0.0, "pss_mb": 0.0, "processes": 0}
        self.each: dict[str, dict] = {}

    def run(self) -> None:
        import psutil

        me = psutil.Process()
        while not self.done.is_set():
            total = {"rss_mb": 0.0, "anon_mb": 0.0, "pss_mb": 0.0}
            procs = [me, *me.children(recursive=True)]
            for p in procs:
                try:
                    m = p.memory_full_info()
                    name = f"{p.pid}:{' '.join(p.cmdline()[:2])[-60:]}"
                except (psutil.Error, OSError):
                    continue
                anon = getattr(m, "rss", 0) - getattr(m, "shared", 0)
                row = {"rss_mb": m.rss / MIB, "anon_mb": anon / MIB, "pss_mb": getattr(m, "pss", 0) / MIB}
                for k, v in row.items():
                    total[k] += v
                mine = self.each.setdefault(name, {"rss_mb": 0.0, "anon_mb": 0.0})
                mine["rss_mb"], mine["anon_mb"] = max(mine["rss_mb"], row["rss_mb"]), max(mine["anon_mb"], row["anon_mb"])
            for k, v in total.items():
                self.peak[k] = max(self.peak[k], v)
            self.peak["processes"] = max(self.peak["processes"], len(procs))
            self.done.wait(self.every)

    def result(self) -> dict:
        r = {k: round(v, 1) for k, v in self.peak.items()}
        r["each"] = {k: {kk: round(vv, 1) for kk, vv in v.items()} for k, v in self.each.items()}
        return r
