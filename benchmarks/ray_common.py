"""Shared set-up of the Ray benchmarks (ray_throughput.py, ray_memory.py).

Why a separate module: both benchmarks must refuse to start Ray outside a loopback-only network
namespace, score the same toy family with the same fixed recipes, and time trials the same way.
"""

from __future__ import annotations

import os
import random
import socket
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
NETNS = ROOT / "scripts" / "netns.sh"

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def require_loopback_namespace(script: str) -> None:
    """Exit (status 2) unless this process sees only `lo`: Ray would advertise any other address."""
    import psutil

    others = {
        name: [a.address for a in addrs if a.family in (socket.AF_INET, socket.AF_INET6)]
        for name, addrs in psutil.net_if_addrs().items()
        if name != "lo"
    }
    others = {k: v for k, v in others.items() if v}
    if others or not os.environ.get("EVOMERGE_NETNS"):
        sys.exit(
            f"{script}: refusing to start Ray outside a loopback-only namespace (interfaces seen: "
            f"{others or 'only lo, but not under scripts/netns.sh'}). Run:\n"
            f"  {NETNS} -- {sys.executable} {script}"
        )


def toy_family(path: str | None):
    """The family at `path`, else the shipped one, else a quick rebuild under .cache/."""
    from evomerge.toy import family as toy

    if path:
        return toy.load(path)
    try:
        return toy.family()
    except Exception as exc:  # noqa: BLE001
        quick = ROOT / ".cache" / "bench" / "toy-quick"
        log(f"toy.family() unavailable ({exc}); using a quick family in {quick}")
        if (quick / "manifest.json").exists():
            return toy.load(quick)
        return toy.build(quick, quick=True, overwrite=True, log=None)


def worker_spec(fam, *, threads: int = 1, batch_size: int = 64):
    from evomerge.executors.worker import WorkerSpec

    sources = (str(fam.base),) + tuple(str(p) for p in fam.experts.values())
    return WorkerSpec(
        sources=sources,
        base=str(fam.base),
        tokenizer=str(fam.tokenizer),
        tasks=tuple(f"toy_{s}" for s in fam.skills),
        include_path=str(fam.tasks_dir),
        threads=threads,
        batch_size=batch_size,
    )


def recipes(fam, n: int, seed: int = 0) -> list[dict]:
    """n fixed candidate recipes of the kinds a search proposes (ties, slerp, linear), seeded."""
    rng = random.Random(seed)
    base = str(fam.base)
    experts = [str(p) for p in fam.experts.values()]
    out = []
    for i in range(n):
        kind = ("ties", "slerp", "linear")[i % 3]
        if kind == "ties":
            out.append({"merge_method": "ties", "base_model": base, "models": [
                {"model": e, "parameters": {"weight": round(rng.uniform(0.2, 1.0), 3),
                                            "density": round(rng.uniform(0.2, 1.0), 3)}} for e in experts]})
        elif kind == "slerp":
            out.append({"merge_method": "slerp", "base_model": base,
                        "models": [{"model": base}, {"model": rng.choice(experts)}],
                        "parameters": {"t": [round(rng.uniform(0, 1), 3) for _ in range(3)]}})
        else:
            out.append({"merge_method": "linear", "models": [
                {"model": e, "parameters": {"weight": round(rng.uniform(0.1, 1.0), 3)}} for e in experts]})
    return out


class TimedWorker:
    """`evomerge.executors.worker.Worker` plus wall-clock start/end stamps in the outcome's timings, so idle gaps
    between trials on one actor can be measured, and the CPU share the process got during the trial
    (on a machine busy with other work, this shows how much CPU the workers could have). Defined here
    (pickled by value into the actors)."""

    def __init__(self, spec):
        from evomerge.executors.worker import Worker

        self.inner = Worker(spec)

    def setup(self) -> None:
        self.inner.setup()

    def run(self, job):
        from dataclasses import replace

        start, cpu = time.time(), time.process_time()
        outcome = self.inner.run(job)
        end = time.time()
        # cpu_share: CPU seconds this process got per wall second of the trial (1.0 = one full core)
        timings = dict(outcome.timings, wall_start=start, wall_end=end,
                       cpu_share=(time.process_time() - cpu) / max(end - start, 1e-9))
        return replace(outcome, timings=timings)


def smaps(pid: int, paths: list[str] | None = None) -> dict[str, float]:
    """Memory of one process in MiB, from /proc: rss/pss/uss (smaps_rollup; uss = private clean + dirty)
    and pss_anon/pss_file, plus, over its mappings of files under `paths` (the source checkpoints):
    rss, pss, the private dirty part (pages written through a private mapping: copy-on-write, owned by
    this process alone) and the clean part's pss (page-cache pages, shared by every process mapping them).

    USS alone misleads for file mappings: a page-cache page mapped by a single process counts as
    "private clean" there, and moves to "shared" as soon as a second process maps it. PSS splits each
    shared page between its mappers, so summed over processes it counts every page once."""

    def parse(lines) -> dict[str, int]:
        kb: dict[str, int] = {}
        for line in lines:
            parts = line.split()
            if len(parts) >= 3 and parts[2] == "kB":
                key = parts[0].rstrip(":")
                kb[key] = kb.get(key, 0) + int(parts[1])
        return kb

    with open(f"/proc/{pid}/smaps_rollup") as f:
        kb = parse(f)
    mib = 1024.0
    out = {
        "rss_mib": kb.get("Rss", 0) / mib,
        "pss_mib": kb.get("Pss", 0) / mib,
        "uss_mib": (kb.get("Private_Clean", 0) + kb.get("Private_Dirty", 0)) / mib,
        "pss_anon_mib": kb.get("Pss_Anon", 0) / mib,
        "pss_file_mib": kb.get("Pss_File", 0) / mib,
    }
    if paths:
        files: set[str] = set()
        picked: list[str] = []
        current = False
        with open(f"/proc/{pid}/smaps") as f:
            for line in f:
                head = line.split()
                if not head:
                    continue
                if not head[0].endswith(":"):  # a mapping header: "start-end perms offset dev inode [path]"
                    name = head[5] if len(head) >= 6 else ""
                    current = any(name.startswith(p) for p in paths)
                    if current:
                        files.add(name)
                elif current:
                    picked.append(line)
        src = parse(picked)
        out.update(
            sources_rss_mib=src.get("Rss", 0) / mib,
            sources_pss_mib=src.get("Pss", 0) / mib,
            sources_private_dirty_mib=src.get("Private_Dirty", 0) / mib,
            sources_clean_pss_mib=(src.get("Pss", 0) - src.get("Private_Dirty", 0)) / mib,
            sources_files_mapped=len(files),
        )
    return out


def synthetic_family(fam, *, hidden: int, layers: int, experts: int = 2, seed: int = 0):
    """A bigger family on the toy family's tokenizer and tasks: a random bf16 Llama base (hidden, layers)
    and `experts` fine-tune-like variants (base + N(0, 0.002) noise). Built once under .cache/bench.
    Its scores are meaningless; it exists so that memory sizes are large enough to read."""
    import shutil

    from evomerge.toy.family import ToyFamily

    root = ROOT / ".cache" / "bench" / f"ray-synthetic-h{hidden}-l{layers}-e{experts}"
    skills = tuple(fam.skills[:experts])
    paths = {"base": root / "base", **{s: root / "experts" / s for s in skills}}
    if not (root / "done").exists():
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM

        log(f"building a synthetic family (hidden {hidden}, {layers} layers) in {root}")
        shutil.rmtree(root, ignore_errors=True)
        config = AutoConfig.from_pretrained(fam.base)
        heads = max(1, hidden // 64)
        config.update({"hidden_size": hidden, "intermediate_size": int(hidden * 8 / 3) // 64 * 64,
                       "num_hidden_layers": layers, "num_attention_heads": heads,
                       "num_key_value_heads": heads, "head_dim": hidden // heads})
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config).to(torch.bfloat16)
        state = {k: v.clone() for k, v in model.state_dict().items()}
        for name, path in paths.items():
            if name != "base":
                with torch.no_grad():
                    for k, p in model.state_dict().items():
                        p.copy_(state[k] + 0.002 * torch.randn_like(state[k], dtype=torch.float32).to(p.dtype))
            model.save_pretrained(path)
            for f in Path(fam.base).glob("tokenizer*"):
                shutil.copy(f, path / f.name)
        (root / "done").write_text("ok")
    return ToyFamily(root=root, tokenizer=Path(fam.tokenizer), base=paths["base"],
                     experts={s: paths[s] for s in skills}, tasks_dir=Path(fam.tasks_dir), skills=skills,
                     mixture={s: 1 / len(skills) for s in skills})
