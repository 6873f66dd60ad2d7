"""What a search holds in memory, and the refusal of a search that cannot fit (issue 27).

Why it exists: a search that runs out of memory dies an hour in, after Ray has started and the study has
been written (mergekit #341, #549). Its memory follows from the space before any model is loaded: every
worker process holds one resident model in the space's score dtype, the working set of one in-memory
merge (engine/memory.py with views of the mapped sources: `copies=False`, written at once: `queue=1`)
and the process itself (Python, torch, transformers, lm-eval: measured on the toy family). The sources
are memory-mapped and shared between workers: page cache, which the kernel gives back, so not counted.
With Ray (`--workers N`) the driver process and Ray's daemons come on top (the driver keeps the
pre-flight's checked model, but never writes it: its pages are the mapped checkpoint's, page cache).
On a GPU each worker's VRAM holds the resident model, the merge's working set and a CUDA context; its
RAM still holds the process and, while transformers loads it, the model once.

Not counted: activations while scoring (they grow with the protocol's batch size and the items' length).

`search_memory` computes the plan, `memory_lines` prints it (`evomerge validate SPACE`), `check_fits`
refuses (the pre-flight, before anything is written) a plan above what is available: MemAvailable from
/proc/meminfo, torch's free device memory for cuda, or the limits the environment sets
(EVOMERGE_MEMORY_LIMIT, EVOMERGE_VRAM_LIMIT: e.g. "16GB"; a budget to stay within, and the seam tests
use). The search's constants were measured on CPU; the GPU terms were not measured on a GPU.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass

from evomerge.engine.memory import CUDA_CONTEXT_BYTES, merge_memory
from evomerge.engine.output import human_bytes as hb
from evomerge.engine.sinks import ITEM_SIZE, parse_size
from evomerge.errors import ConfigError

# Resident memory of a search worker process before its model: Python, torch, transformers, datasets,
# lm-eval, the tasks. Measured: `evomerge search` on the toy family (0.7M parameters) peaks at 721 MiB.
SEARCH_PROCESS_BYTES = 760 * 10**6
# Ray's own processes on this machine (GCS, raylet, dashboard and its agents, idle workers): measured
# 800 MiB of RSS (480 MiB of heap) over 9 processes with 2 workers (benchmarks/cost_growth.py --steps ray).
RAY_DAEMON_BYTES = 850 * 10**6
RAM_ENV, VRAM_ENV = "EVOMERGE_MEMORY_LIMIT", "EVOMERGE_VRAM_LIMIT"
# A search's in-memory merge holds more per element than an export's (engine/memory.py's coefficients):
# it reads bf16 views of the mapped files, so every float32 temporary is new, and the two merge threads
# free into their own arenas. Measured (benchmarks/cost_growth.py, heap above the resident model and the
# process): slerp needed 1.1x the export's working set at 0.5B and 1.5x at 1B; task arithmetic 0.7-0.9x.
IN_MEMORY_FACTOR = 1.6


@dataclass(frozen=True)
class SearchMemory:
    """The peak memory of one search, in bytes (see the module's docstring)."""

    workers: int
    device: str
    dtype: str  # the resident model's dtype (the space's score dtype)
    resident: int  # one resident model
    merge: int  # one in-memory merge's working set (the largest over the space's methods)
    process: int  # one worker process without its model
    driver: int  # Ray: the driver process and Ray's daemons; 0 in process
    sources: int  # the source files, mapped and shared (page cache, not counted)
    vram_per_worker: int  # 0 on the CPU

    @property
    def on_gpu(self) -> bool:
        return self.device != "cpu"

    @property
    def ram_per_worker(self) -> int:
        """On a GPU the model passes through RAM once while transformers loads it."""
        return self.process + (self.resident if self.on_gpu else self.resident + self.merge)

    @property
    def ram(self) -> int:
        return self.driver + self.workers * self.ram_per_worker

    def as_dict(self) -> dict:
        return dict(asdict(self), ram=self.ram, ram_per_worker=self.ram_per_worker)


def search_memory(plans: list, sources, *, dtype: str, workers: int = 1, device: str = "cpu",
                  source_bytes: int = 0) -> SearchMemory:
    """The plan of a search whose candidates plan as `plans` (engine MergePlans or MoE plans, e.g. each
    method's baseline recipe) against the opened `sources`."""
    item = ITEM_SIZE.get(dtype, 4)
    resident, merge = 0, 0
    for p in plans:
        resident = max(resident, sum(_numel(s.shape) for s in p.specs) * item)
        if hasattr(p, "tasks"):  # an MoE plan is built once per structure, not merged per trial
            m = merge_memory(p, sources, device=device, copies=False, queue=1, process=0)
            merge = max(merge, int(IN_MEMORY_FACTOR * (m.vram - CUDA_CONTEXT_BYTES if device != "cpu" else m.ram)))
    workers = max(1, int(workers))
    # the driver's pre-flight model is never merged into: its pages stay the mapped checkpoint's
    driver = 0 if workers == 1 else SEARCH_PROCESS_BYTES + RAY_DAEMON_BYTES
    vram = CUDA_CONTEXT_BYTES + resident + merge if device != "cpu" else 0
    return SearchMemory(workers=workers, device=device, dtype=dtype, resident=resident, merge=merge,
                        process=SEARCH_PROCESS_BYTES, driver=driver, sources=source_bytes, vram_per_worker=vram)


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


def memory_lines(m: SearchMemory) -> list[str]:
    """`evomerge validate SPACE`'s lines."""
    who = "in process" if m.workers == 1 else f"{m.workers} Ray workers"
    per = (f"per worker {hb(m.ram_per_worker)}: the process {hb(m.process)} + one resident model "
           f"{hb(m.resident)} ({m.dtype})" + ("" if m.on_gpu else f" + one merge's working set {hb(m.merge)}"))
    lines = [f"memory      search ({who}, {m.device}): about {hb(m.ram)} RAM; {per}"
             + (f"; the driver and Ray {hb(m.driver)}" if m.driver else "")]
    if m.on_gpu:
        lines.append(f"            {hb(m.vram_per_worker)} on {m.device} per worker: the resident model, one merge's "
                     f"working set {hb(m.merge)}, a CUDA context {hb(CUDA_CONTEXT_BYTES)}")
    lines.append(f"            sources {hb(m.sources)} memory-mapped, shared by the workers (page cache, not "
                 "counted); activations while scoring not counted")
    return lines


def available_ram() -> tuple[int | None, str]:
    """(bytes, where the figure comes from): EVOMERGE_MEMORY_LIMIT, else MemAvailable; None if unknown."""
    if os.environ.get(RAM_ENV):
        return parse_size(os.environ[RAM_ENV], where=RAM_ENV), RAM_ENV
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024, "MemAvailable"
    except OSError:
        pass
    return None, "unknown"


def available_vram(device: str) -> tuple[int | None, str]:
    """(bytes, where from) on one GPU: EVOMERGE_VRAM_LIMIT, else torch's free memory of `device`."""
    if os.environ.get(VRAM_ENV):
        return parse_size(os.environ[VRAM_ENV], where=VRAM_ENV), VRAM_ENV
    try:
        import torch

        if not torch.cuda.is_available():
            return None, "unknown"
        index = int(device.split(":")[1]) if ":" in device else torch.cuda.current_device()
        return int(torch.cuda.mem_get_info(index)[0]), f"free on {device}"
    except (ImportError, RuntimeError, ValueError):
        return None, "unknown"


def check_fits(m: SearchMemory, *, where: str) -> None:
    """Refuse a plan above the memory available (one line with the numbers and a way out)."""
    ram, ram_from = available_ram()
    if ram is not None and m.ram > ram:
        raise ConfigError(f"this search needs about {hb(m.ram)} of RAM ({m.workers} worker(s) x "
                          f"{hb(m.ram_per_worker)}" + (f" + {hb(m.driver)} driver and Ray" if m.driver else "")
                          + f"), and {hb(ram)} is available ({ram_from})", where=where, fix=_fix(m, ram))
    if m.on_gpu:
        vram, vram_from = available_vram(m.device)
        if vram is not None and m.vram_per_worker > vram:
            raise ConfigError(f"each worker needs about {hb(m.vram_per_worker)} on {m.device}, and {hb(vram)} is "
                              f"available ({vram_from})", where=where,
                              fix="use a smaller dtype in the space (bfloat16), or --device cpu")


def _fix(m: SearchMemory, ram: int) -> str:
    tips = []
    if m.workers > 1:
        n = (ram - m.driver) // max(1, m.ram_per_worker)
        if n >= 2:
            tips.append(f"--workers {min(n, m.workers - 1)}")
        elif m.process + m.resident + m.merge <= ram:
            tips.append("--workers 1 (in process: no Ray driver and daemons)")
    if ITEM_SIZE.get(m.dtype, 4) > 2:
        tips.append("out_dtype: bfloat16 in the space (half the resident model)")
    tips.append(f"free memory, or set {RAM_ENV} if more is really free")
    return "; ".join(tips)


__all__ = ["SearchMemory", "available_ram", "available_vram", "check_fits", "memory_lines", "search_memory"]
