"""Merge speed benchmark: `evomerge merge` vs `mergekit-yaml`, side by side, plus a plain-copy reference.

    python benchmarks/merge_speed.py                      # full run (~270M-param models), prints JSON
    python benchmarks/merge_speed.py --tools mergekit     # one side only
    python benchmarks/merge_speed.py --size tiny --repeats 1   # smoke test (seconds)

What it does:
1. Builds once (cached under --work, default ./.cache/bench) three bf16 Llama-style checkpoints: a random
   `base` and two fine-tune-like variants `ft_a`, `ft_b` (base + small Gaussian noise), each a folder with
   model.safetensors, config.json, generation_config.json and a tiny local word-level tokenizer whose vocab
   size equals the model's. They load with AutoModelForCausalLM.
2. Writes one mergekit YAML per method: linear (3 models), ties (base + 2, density 0.5), slerp (2 models,
   t 0.5), and the 13 methods added to match mergekit's list (base + 2 where the method takes it; della at
   density 1, so that no random draw differs), all `dtype: bfloat16`, absolute paths.
3. For each repeat, for each method, runs `evomerge merge CFG OUT --overwrite --no-progress` and
   `mergekit-yaml CFG OUT --quiet` as child processes (order alternates between repeats), plus once per
   repeat a "plain copy" child: read every source tensor of the 3 models from safetensors and write one
   model's worth of tensors to one safetensors file (the minimal I/O of a 3-model linear merge, same
   Python + torch start-up). Each child is started by a tiny `python -I -S` wrapper that measures its
   wall time, its own ru_maxrss and CPU seconds (os.wait4) and samples its anonymous vs file-backed
   resident memory. Output folders are deleted and `sync` is called before each timed run.
4. Compares the two tools' outputs tensor by tensor (max abs diff, number of differing elements).
5. Prints one JSON object: medians, ratios, targets and whether each is met.

Times on a shared machine are noisy: compare the ratios of interleaved runs, not absolute times.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent

SIZES = {
    # hidden, layers, intermediate, vocab, heads, kv heads
    "full": dict(hidden_size=1024, num_hidden_layers=16, intermediate_size=2816, vocab_size=32000,
                 num_attention_heads=16, num_key_value_heads=16),
    "tiny": dict(hidden_size=64, num_hidden_layers=2, intermediate_size=176, vocab_size=512,
                 num_attention_heads=4, num_key_value_heads=4),
}
MODELS = ("base", "ft_a", "ft_b")
ADDED = ("breadcrumbs", "breadcrumbs_ties", "della", "della_linear", "model_stock", "nuslerp", "multislerp",
         "karcher", "sce", "nearswap", "ram", "ramplus_tl", "arcee_fusion")
METHODS = ("linear", "ties", "slerp") + ADDED
# min mergekit/evomerge time ratio; the methods added later must never be slower (1.0)
TARGETS = {"linear": 2.0, "slerp": 2.0, "ties": 3.0, **{m: 1.0 for m in ADDED}}
PLAIN_COPY_FACTOR = 2.0  # evomerge linear must take at most this many times the plain copy
BUILD_VERSION = 1  # bump when the builder changes, to rebuild the cache


# ------------------------------------------------------------------------------------------------
# Model builder
# ------------------------------------------------------------------------------------------------
def _tensor_specs(cfg: dict) -> list[tuple[str, tuple[int, ...]]]:
    """Names and shapes of a LlamaForCausalLM state dict, read from a meta-device model."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    with torch.device("meta"):
        model = LlamaForCausalLM(LlamaConfig(**cfg))
    return [(n, tuple(t.shape)) for n, t in model.state_dict().items()]


def _write_tokenizer(folder: Path, vocab_size: int) -> None:
    """A word-level tokenizer with exactly `vocab_size` entries (no network, ~1 MB)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>", "<pad>"]
    vocab = {tok: i for i, tok in enumerate(specials)}
    for i in range(len(specials), vocab_size):
        vocab[f"w{i}"] = i
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>",
                                   eos_token="</s>", pad_token="<pad>")
    fast.save_pretrained(folder)


def build_models(work: Path, size: str, seed: int = 0) -> dict[str, Path]:
    """Build (or reuse) base, ft_a, ft_b under work/models-<size>. Returns name -> folder."""
    root = work / f"models-{size}"
    stamp = root / "BUILT.json"
    paths = {m: root / m for m in MODELS}
    want = {"version": BUILD_VERSION, "size": size, "seed": seed, "config": SIZES[size]}
    if stamp.exists() and json.loads(stamp.read_text()) == want and all(
        (p / "model.safetensors").exists() for p in paths.values()
    ):
        return paths

    import torch
    from safetensors.torch import save_file
    from transformers import GenerationConfig, LlamaConfig

    t0 = time.perf_counter()
    if root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True)
    cfg = dict(SIZES[size], max_position_embeddings=2048, tie_word_embeddings=False,
               bos_token_id=1, eos_token_id=2, pad_token_id=3)
    specs = _tensor_specs(cfg)
    gen = torch.Generator().manual_seed(seed)
    base: dict[str, torch.Tensor] = {}
    for name, shape in specs:
        if name.endswith("norm.weight"):
            t = 1.0 + 0.05 * torch.randn(shape, generator=gen)
        else:
            t = 0.02 * torch.randn(shape, generator=gen)
        base[name] = t.to(torch.bfloat16)
    noise = {"ft_a": 0.002, "ft_b": 0.002}  # ~10% of the weights' scale: fine-tune-like deltas
    for m in MODELS:
        if m == "base":
            tensors = base
        else:
            tensors = {
                n: (t.float() + noise[m] * torch.randn(t.shape, generator=gen)).to(torch.bfloat16)
                for n, t in base.items()
            }
        folder = paths[m]
        folder.mkdir()
        save_file({n: t.contiguous() for n, t in tensors.items()}, folder / "model.safetensors",
                  metadata={"format": "pt"})
        lc = LlamaConfig(**cfg)
        lc.architectures = ["LlamaForCausalLM"]
        lc.dtype = "bfloat16"
        lc.save_pretrained(folder)
        GenerationConfig(bos_token_id=1, eos_token_id=2, pad_token_id=3).save_pretrained(folder)
        _write_tokenizer(folder, cfg["vocab_size"])
        if m != "base":
            del tensors
    stamp.write_text(json.dumps(want))
    print(f"[bench] built {size} models in {time.perf_counter() - t0:.1f}s under {root}", file=sys.stderr)
    return paths


def write_configs(work: Path, models: dict[str, Path]) -> dict[str, Path]:
    b, a, c = (str(models[m].resolve()) for m in MODELS)
    texts = {
        "linear": f"""merge_method: linear
models:
  - model: {b}
    parameters: {{weight: 1.0}}
  - model: {a}
    parameters: {{weight: 1.0}}
  - model: {c}
    parameters: {{weight: 1.0}}
dtype: bfloat16
""",
        "ties": f"""merge_method: ties
base_model: {b}
models:
  - model: {a}
    parameters: {{weight: 1.0, density: 0.5}}
  - model: {c}
    parameters: {{weight: 1.0, density: 0.5}}
dtype: bfloat16
""",
        "slerp": f"""merge_method: slerp
base_model: {a}
models:
  - model: {a}
  - model: {c}
parameters:
  t: 0.5
dtype: bfloat16
""",
    }
    two = {"base": b, "models": (a, c)}  # the base plus two fine-tunes, each method's natural form

    def task_vectors(method: str, params: str, shared: str = "") -> str:
        return (f"merge_method: {method}\nbase_model: {b}\nmodels:\n"
                + "".join(f"  - model: {m}\n    parameters: {{{params}}}\n" for m in two["models"])
                + (f"parameters: {{{shared}}}\n" if shared else "") + "dtype: bfloat16\n")

    def plain(method: str, shared: str = "", base: bool = True, models=two["models"]) -> str:
        return (f"merge_method: {method}\n" + (f"base_model: {b}\n" if base else "") + "models:\n"
                + "".join(f"  - model: {m}\n" for m in models)
                + (f"parameters: {{{shared}}}\n" if shared else "") + "dtype: bfloat16\n")

    texts.update({
        "breadcrumbs": task_vectors("breadcrumbs", "weight: 1.0, density: 0.9, gamma: 0.01"),
        "breadcrumbs_ties": task_vectors("breadcrumbs_ties", "weight: 1.0, density: 0.9, gamma: 0.01"),
        # density 1: no random draw, so both tools compute the same tensors (the arithmetic is compared)
        "della": task_vectors("della", "weight: 1.0, density: 1.0, epsilon: 0.1"),
        "della_linear": task_vectors("della_linear", "weight: 1.0, density: 1.0, epsilon: 0.1"),
        "model_stock": plain("model_stock"),
        "nuslerp": task_vectors("nuslerp", "weight: 0.5"),
        "multislerp": task_vectors("multislerp", "weight: 0.5"),
        "karcher": plain("karcher", base=False, models=(b, a, c)),
        "sce": plain("sce", "select_topk: 0.5"),
        "nearswap": plain("nearswap", "t: 0.001", models=(a,)),
        "ram": plain("ram"),
        "ramplus_tl": plain("ramplus_tl"),
        "arcee_fusion": plain("arcee_fusion", models=(a,)),
    })
    out = {}
    cfg_dir = work / "configs"
    cfg_dir.mkdir(parents=True, exist_ok=True)
    for method, text in texts.items():
        p = cfg_dir / f"{method}.yaml"
        p.write_text(text)
        out[method] = p
    return out


# ------------------------------------------------------------------------------------------------
# Plain copy (runs in a child process: `merge_speed.py --_plain-copy OUT SRC...`)
# ------------------------------------------------------------------------------------------------
def plain_copy_child(out: str, sources: list[str]) -> None:
    t0 = time.perf_counter()
    import torch  # noqa: F401  (same start-up cost as a merge tool)
    from safetensors import safe_open
    from safetensors.torch import save_file

    t1 = time.perf_counter()
    handles = [safe_open(str(Path(s) / "model.safetensors"), framework="pt") for s in sources]
    names = list(handles[0].keys())
    result = {}
    for name in names:
        # get_tensor returns a view of the memory map (safetensors >= 0.7): clone() makes it read every
        # source byte once, the least any merge does with its inputs
        ts = [h.get_tensor(name).clone() for h in handles]
        result[name] = ts[0]
        del ts
    t2 = time.perf_counter()
    Path(out).mkdir(parents=True, exist_ok=True)
    save_file(result, str(Path(out) / "model.safetensors"), metadata={"format": "pt"})
    t3 = time.perf_counter()
    print(json.dumps({"import_s": t1 - t0, "read_s": t2 - t1, "write_s": t3 - t2}))


# ------------------------------------------------------------------------------------------------
# Running children
# ------------------------------------------------------------------------------------------------
# Linux keeps the forking process's RSS as a floor of the child's ru_maxrss (the old mm's high-water
# mark survives fork + exec). This benchmark imports torch, so it starts each tool through a tiny
# `python -I -S` wrapper (~10 MB) that spawns the tool and reports the tool's own wait4 rusage.
_WRAPPER = r"""
import json, os, sys, threading, time
res, cmd = sys.argv[1], sys.argv[2:]
peak = {"RssAnon": 0, "RssFile": 0}
done = threading.Event()


def poll(pid):  # peak anonymous vs file-backed (memory-mapped) resident memory, sampled every 20 ms
    path = "/proc/%d/status" % pid
    while not done.is_set():
        try:
            with open(path) as fh:
                for line in fh:
                    key = line.split(":")[0]
                    if key in peak:
                        peak[key] = max(peak[key], int(line.split()[1]))
        except (OSError, ValueError, IndexError):
            pass
        done.wait(0.02)


t0 = time.perf_counter()
pid = os.posix_spawn(cmd[0], cmd, os.environ)
th = threading.Thread(target=poll, args=(pid,), daemon=True)
th.start()
_, status, ru = os.wait4(pid, 0)
wall = time.perf_counter() - t0
done.set()
with open(res, "w") as fh:
    json.dump({"wall_s": wall, "maxrss_kb": ru.ru_maxrss, "user_s": ru.ru_utime, "sys_s": ru.ru_stime,
               "peak_anon_kb": peak["RssAnon"], "peak_file_kb": peak["RssFile"],
               "rc": os.waitstatus_to_exitcode(status)}, fh)
"""


def run_child(cmd: list[str], log: Path, env: dict) -> dict:
    """Run cmd through the wrapper: wall seconds and the tool's own peak RSS (ru_maxrss)."""
    res_file = log.with_suffix(".rusage.json")
    res_file.unlink(missing_ok=True)
    with open(log, "w") as fh:
        rc = subprocess.call([sys.executable, "-I", "-S", "-c", _WRAPPER, str(res_file), *cmd],
                             stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    if rc != 0 or not res_file.exists():
        return {"rc": rc if rc else -1, "error": "wrapper failed: " + log.read_text()[-2000:]}
    u = json.loads(res_file.read_text())
    res = {"wall_s": round(u["wall_s"], 3), "rss_mb": round(u["maxrss_kb"] / 1024, 1),
           "user_s": round(u["user_s"], 2), "sys_s": round(u["sys_s"], 2),
           "cpu_s": round(u["user_s"] + u["sys_s"], 2),
           "peak_anon_mb": round(u["peak_anon_kb"] / 1024, 1),  # sampled; heap, not page cache
           "peak_file_mb": round(u["peak_file_kb"] / 1024, 1),  # sampled; memory-mapped file pages
           "rc": u["rc"]}
    if u["rc"] != 0:
        res["error"] = log.read_text()[-2000:]
    return res


def tool_cmd(tool: str, cfg: Path, out: Path, extra: list[str]) -> list[str]:
    if tool == "evomerge":
        return [str(VENV_BIN / "evomerge"), "merge", str(cfg), str(out), "--overwrite", "--no-progress", *extra]
    if tool == "mergekit":
        return [str(VENV_BIN / "mergekit-yaml"), str(cfg), str(out), *extra]
    raise ValueError(tool)


def _index(folder: Path) -> dict[str, Path]:
    from safetensors import safe_open

    where = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as h:
            for k in h.keys():
                where[k] = f
    return where


def compare_outputs(a: Path, b: Path) -> dict:
    """Tensor-by-tensor agreement of two merged folders (all tensors, in float32)."""
    import torch
    from safetensors import safe_open

    ia, ib = _index(a), _index(b)
    common = sorted(set(ia) & set(ib))
    max_abs, n_diff, n_total, worst = 0.0, 0, 0, None
    dtypes = set()
    for name in common:
        with safe_open(str(ia[name]), framework="pt") as ha, safe_open(str(ib[name]), framework="pt") as hb:
            x, y = ha.get_tensor(name), hb.get_tensor(name)
        dtypes.add(f"{x.dtype}/{y.dtype}")
        if x.shape != y.shape:
            return {"error": f"shape mismatch on {name}: {tuple(x.shape)} vs {tuple(y.shape)}"}
        d = (x.float() - y.float()).abs()
        m = float(d.max()) if d.numel() else 0.0
        if m > max_abs:
            max_abs, worst = m, name
        n_diff += int((d > 0).sum())
        n_total += d.numel()
    return {
        "tensors_compared": len(common),
        "only_in_evomerge": sorted(set(ia) - set(ib))[:5],
        "only_in_mergekit": sorted(set(ib) - set(ia))[:5],
        "dtypes": sorted(dtypes),
        "max_abs_diff": max_abs,
        "worst_tensor": worst,
        "frac_elements_differing": n_diff / max(n_total, 1),
        "identical": n_diff == 0 and set(ia) == set(ib),
    }


def engine_digest() -> str:
    """Hash of the merge engine's sources, to tell which version of evomerge a result belongs to."""
    import hashlib

    h = hashlib.sha256()
    pkg = ROOT / "evomerge"
    eng = pkg / "engine"
    files = [pkg / "cli.py", *(eng / f for f in ("merge.py", "checkpoints.py", "sinks.py", "recipe.py", "modelcard.py"))]
    for f in sorted([*(f for f in files if f.exists()), *eng.glob("methods/*.py")]):
        h.update(f.name.encode())
        h.update(f.read_bytes())
    return h.hexdigest()[:12]


def count_params(path: Path) -> int:
    import math

    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as h:
        return sum(math.prod(h.get_slice(k).get_shape()) for k in h.keys())


def markdown_table(result: dict) -> str:
    """The results as a Markdown table (what docs/merge_benchmark.md shows)."""
    rows = ["| merge | tool | wall (median) | CPU s (median) | peak RSS | of it heap (anon) | speedup (wall / CPU) | target | same tensors |",
            "|---|---|---|---|---|---|---|---|---|"]
    for method, entry in result["methods"].items():
        for tool in ("evomerge", "mergekit"):
            if tool not in entry or entry[tool]["median_wall_s"] is None:
                continue
            e = entry[tool]
            speed = target = same = ""
            if tool == "evomerge" and "speedup_mergekit_over_evomerge" in entry:
                speed = f"{entry['speedup_mergekit_over_evomerge']:.2f}x / {entry['cpu_ratio_mergekit_over_evomerge']:.2f}x"
                key = f"{method}_speed_ge_{TARGETS[method]:g}x"
                t = result["targets"].get(key)
                if t:
                    target = f">= {TARGETS[method]:g}x: {'met' if t['met'] else 'MISSED'}"
                a = entry.get("agreement", {})
                if "identical" in a:
                    same = "bit-identical" if a["identical"] else (
                        f"max abs diff {a['max_abs_diff']:.3g}, {100 * a['frac_elements_differing']:.2f}% of elements")
            anon = e.get("median_peak_anon_mb")
            rows.append(f"| {method} | {tool} | {e['median_wall_s']:.1f} s | {e['median_cpu_s']:.1f} | "
                        f"{e['median_rss_mb'] / 1024:.2f} GB | {'' if anon is None else f'{anon / 1024:.2f} GB'} | "
                        f"{speed} | {target} | {same} |")
    pc = result.get("plain_copy")
    if pc and pc["median_wall_s"]:
        rows.append(f"| plain copy (3 read, 1 written) | python + safetensors | {pc['median_wall_s']:.1f} s | "
                    f"{pc['median_cpu_s']:.1f} | {pc['median_rss_mb'] / 1024:.2f} GB | | | | |")
    return "\n".join(rows) + "\n"


def _median(runs: list[dict], key: str):
    vals = [r[key] for r in runs if r.get("rc") == 0]
    return round(statistics.median(vals), 3) if vals else None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work", default=str(ROOT / ".cache" / "bench"), help="cache + scratch folder")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--tools", default="evomerge,mergekit", help="evomerge,mergekit or one of them")
    ap.add_argument("--size", choices=sorted(SIZES), default="full")
    ap.add_argument("--no-plain-copy", action="store_true")
    ap.add_argument("--mergekit-args", default="--quiet", help="extra mergekit-yaml flags")
    ap.add_argument("--evomerge-args", default="", help="extra evomerge merge flags")
    ap.add_argument("--keep-outputs", action="store_true", help="leave merged folders under WORK/out")
    ap.add_argument("--markdown", help="also write the results table (Markdown) to this file")
    ap.add_argument("--_plain-copy", nargs="+", dest="plain_copy", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.plain_copy:
        plain_copy_child(args.plain_copy[0], args.plain_copy[1:])
        return 0

    work = Path(args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    tools = [t.strip() for t in args.tools.split(",") if t.strip()]
    if not methods or set(methods) - set(METHODS):
        ap.error(f"--methods: choose from {','.join(METHODS)}")
    if not tools or set(tools) - {"evomerge", "mergekit"}:
        ap.error("--tools: evomerge, mergekit or both")
    for tool in tools:
        exe = VENV_BIN / ("evomerge" if tool == "evomerge" else "mergekit-yaml")
        if not exe.exists():
            ap.error(f"{exe} not found (install the test extra for mergekit: pip install -e '.[test]')")
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               HF_HOME=str(work / "hf_home"), TOKENIZERS_PARALLELISM="false")
    os.environ.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")

    t_build = time.perf_counter()
    models = build_models(work, args.size)
    build_s = time.perf_counter() - t_build
    cfgs = write_configs(work, models)
    out_root, log_root = work / "out", work / "logs"
    out_root.mkdir(exist_ok=True)
    log_root.mkdir(exist_ok=True)

    # Warm the page cache (untimed) so that the first timed run is not the only cold one.
    for m in MODELS:
        with open(models[m] / "model.safetensors", "rb") as fh:
            while fh.read(1 << 24):
                pass

    extra = {"evomerge": args.evomerge_args.split(), "mergekit": args.mergekit_args.split()}
    digest_start = engine_digest()
    started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    runs: dict[str, dict[str, list[dict]]] = {m: {t: [] for t in tools} for m in methods}
    plain: list[dict] = []
    for rep in range(args.repeats):
        order = tools if rep % 2 == 0 else list(reversed(tools))
        if not args.no_plain_copy:
            out = out_root / "plain_copy"
            shutil.rmtree(out, ignore_errors=True)
            os.sync()
            cmd = [sys.executable, str(Path(__file__).resolve()), "--_plain-copy", str(out),
                   *(str(models[m]) for m in MODELS)]
            log = log_root / f"plain_copy.{rep}.log"
            r = run_child(cmd, log, env)
            if r["rc"] == 0:
                r["phases"] = json.loads(log.read_text().strip().splitlines()[-1])
            plain.append(r)
            print(f"[bench] rep {rep} plain_copy {r['wall_s']}s {r['rss_mb']}MB", file=sys.stderr)
        for method in methods:
            for tool in order:
                out = out_root / f"{tool}-{method}"
                shutil.rmtree(out, ignore_errors=True)
                os.sync()
                r = run_child(tool_cmd(tool, cfgs[method], out, extra[tool]),
                              log_root / f"{tool}-{method}.{rep}.log", env)
                runs[method][tool].append(r)
                print(f"[bench] rep {rep} {method} {tool} {r['wall_s']}s {r['rss_mb']}MB rc={r['rc']}",
                      file=sys.stderr)

    result: dict = {
        "benchmark": "merge_speed",
        "command": "python benchmarks/merge_speed.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                    "platform": platform.platform()},
        "models": {"size": args.size, **SIZES[args.size], "dtype": "bfloat16",
                   "params_per_model": None, "bytes_per_model": (models["base"] / "model.safetensors").stat().st_size},
        "build_s": round(build_s, 1),
        "started_utc": started,
        "finished_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "evomerge_source_digest": digest_start if engine_digest() == digest_start
        else f"{digest_start} -> {engine_digest()} (evomerge changed DURING the run)",
        "repeats": args.repeats,
        "flags": {"evomerge": "merge CFG OUT --overwrite --no-progress " + args.evomerge_args,
                  "mergekit": "mergekit-yaml CFG OUT " + args.mergekit_args},
        "methods": {},
        "targets": {},
    }
    try:
        import torch  # noqa: F401
        import importlib.metadata as md

        result["versions"] = {p: md.version(p) for p in ("torch", "mergekit", "safetensors", "transformers")}
        result["versions"]["evomerge"] = md.version("evomerge")
    except Exception:  # noqa: BLE001
        pass
    result["models"]["params_per_model"] = count_params(models["base"] / "model.safetensors")

    if plain:
        result["plain_copy"] = {
            "what": "read all tensors of the 3 models from safetensors, write one model (1 safetensors file)",
            "median_wall_s": _median(plain, "wall_s"), "median_rss_mb": _median(plain, "rss_mb"),
            "median_cpu_s": _median(plain, "cpu_s"), "runs": plain,
        }
    for method in methods:
        entry: dict = {}
        for tool in tools:
            rs = runs[method][tool]
            entry[tool] = {"median_wall_s": _median(rs, "wall_s"), "median_rss_mb": _median(rs, "rss_mb"),
                           "median_cpu_s": _median(rs, "cpu_s"), "median_peak_anon_mb": _median(rs, "peak_anon_mb"),
                           "runs": rs}
        if set(tools) == {"evomerge", "mergekit"}:
            e, k = entry["evomerge"], entry["mergekit"]
            if e["median_wall_s"] and k["median_wall_s"]:
                entry["speedup_mergekit_over_evomerge"] = round(k["median_wall_s"] / e["median_wall_s"], 2)
                entry["rss_ratio_evomerge_over_mergekit"] = round(e["median_rss_mb"] / k["median_rss_mb"], 3)
                # CPU seconds (user + sys) are less disturbed than wall time by other load on the machine
                entry["cpu_ratio_mergekit_over_evomerge"] = round(k["median_cpu_s"] / e["median_cpu_s"], 2)
                eo, ko = out_root / f"evomerge-{method}", out_root / f"mergekit-{method}"
                try:
                    entry["agreement"] = compare_outputs(eo, ko)
                except Exception as exc:  # noqa: BLE001
                    entry["agreement"] = {"error": repr(exc)}
                t = TARGETS[method]
                result["targets"][f"{method}_speed_ge_{t:g}x"] = {
                    "value": entry["speedup_mergekit_over_evomerge"],
                    "met": entry["speedup_mergekit_over_evomerge"] >= t}
                result["targets"][f"{method}_rss_le_mergekit"] = {
                    "value": entry["rss_ratio_evomerge_over_mergekit"],
                    "met": entry["rss_ratio_evomerge_over_mergekit"] <= 1.0}
        if plain and "evomerge" in tools and method == "linear" and entry["evomerge"]["median_wall_s"]:
            ratio = entry["evomerge"]["median_wall_s"] / result["plain_copy"]["median_wall_s"]
            entry["evomerge_over_plain_copy"] = round(ratio, 2)
            result["targets"][f"linear_within_{PLAIN_COPY_FACTOR:g}x_plain_copy"] = {
                "value": round(ratio, 2), "met": ratio <= PLAIN_COPY_FACTOR}
        if plain and "mergekit" in tools and method == "linear" and entry["mergekit"]["median_wall_s"]:
            entry["mergekit_over_plain_copy"] = round(
                entry["mergekit"]["median_wall_s"] / result["plain_copy"]["median_wall_s"], 2)
        result["methods"][method] = entry
    if result["targets"]:
        result["all_targets_met"] = all(v["met"] for v in result["targets"].values())

    if not args.keep_outputs:
        shutil.rmtree(out_root, ignore_errors=True)
    if args.markdown:
        Path(args.markdown).write_text(markdown_table(result))
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
