"""What a merge holds in memory, computed from its plan before any tensor is read (issue 27).

Why it exists: a merge or a search that does not fit should be refused before it starts, with numbers,
not found out an hour in (mergekit #549: more than 64 GB of RAM for two 7B models). The engine streams:
an export holds the process itself, the few tensors being merged at once (their inputs and the method's
scratch) and the finished outputs waiting to be written, never a whole model or a whole shard. The plan
knows every output tensor's shape, inputs and method, so that figure follows from it:

    peak = process + max over the plan's order of (the working sets of the `workers` tensors merged at
           once + the outputs still queued for the sink)
    working set of one tensor = its inputs as read (export: copies; search: views of the mapped files,
           so only dtype casts) + method scratch (SCRATCH: bytes per element, measured) + the output

`merge_memory(plan)` computes it (`merge.recipe_memory(path)` and `evomerge validate RECIPE` print it); the
search adds one resident model per worker (search/memory.py). The coefficients were measured on CPU with
torch 2.13 (one tensor per method in a fresh process; benchmarks/cost_growth.py checks whole merges at
0.1B-2B parameters and reports the estimate's error in docs/merge_benchmark.md). GPU figures use the
same working sets plus a CUDA context and were not measured on a GPU.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

from evomerge.engine.sinks import ITEM_SIZE

if TYPE_CHECKING:  # pragma: no cover
    from evomerge.engine.plan import MergePlan, TensorTask

# Method scratch while one output tensor is merged, in bytes per element: (fixed, per input tensor,
# factor when the inputs are float32), measured with bfloat16 inputs (base + 2 and base + 4) and float32
# inputs, rounded up. TIES-like methods sort |delta| (float32 values + int64 indices). linear and ties
# were raised to whole-merge measurements (issue 27: benchmarks/cost_growth.py at 0.1B-1B bf16 and
# tests/test_memory.py's fp32 merges), which include the allocator's slack that one tensor alone misses;
# the 2B runs were not used to set them (they check them).
SCRATCH: dict[str, tuple[float, float, float]] = {
    "linear": (16, 0, 0.35), "slerp": (14, 0, 0.6), "nearswap": (12, 0, 1.5), "passthrough": (2, 0, 1.5),
    "nuslerp": (9, 0, 1.5), "arcee_fusion": (27, 0, 1.5),
    "task_arithmetic": (0, 3.3, 2.0), "ties": (32, 3, 1.5), "dare_ties": (0, 6.7, 1.7),
    "dare_linear": (0, 7, 1.7), "breadcrumbs": (26, 2.1, 1.1), "breadcrumbs_ties": (28, 2.1, 1.1),
    "della": (35, 3.1, 1.0), "della_linear": (39, 3.1, 1.0), "model_stock": (0, 5.7, 1.5),
    "multislerp": (0, 6.9, 1.5), "karcher": (0, 11, 1.4), "sce": (6, 8.6, 1.4), "ram": (6, 11, 1.5),
    "ramplus_tl": (5, 16, 1.5),
}
DEFAULT_SCRATCH = (40, 16, 1.5)  # a method not measured: above every measured one
# Resident memory of an `evomerge merge` process before any tensor (Python, torch, safetensors,
# the engine, the plan), measured: 0.1B-2B merges minus their working sets.
EXPORT_PROCESS_BYTES = 330 * 10**6
CUDA_CONTEXT_BYTES = 600 * 10**6  # a CUDA context and torch's kernels on the device (typical, not measured)
SINK_QUEUE = 4  # finished tensors an export may hold: one in order, two queued for the writer, one writing


@dataclass(frozen=True)
class MergeMemory:
    """The peak memory of one merge, in bytes. `ram` is the process's resident memory; on a GPU `vram` is
    the device's share (the working sets) and `ram` keeps the inputs read and the outputs queued."""

    process: int  # the process before any tensor
    in_flight: int  # at the worst point of the plan: tensors being merged + outputs queued
    largest_tensor: str  # the output tensor with the largest working set
    largest_bytes: int  # its working set
    workers: int  # tensors merged at once
    device: str
    ram: int
    vram: int  # 0 on the CPU
    output_bytes: int  # the merged model's size

    def as_dict(self) -> dict:
        return asdict(self)


def scratch_per_element(method: str, n_inputs: int, input_bytes: int) -> float:
    """Bytes of method scratch per element of one output tensor (see SCRATCH)."""
    fixed, per_input, f32 = SCRATCH.get(method, DEFAULT_SCRATCH)
    per = fixed + per_input * n_inputs
    if input_bytes >= 8:
        return per * f32 * 2
    return per * f32 if input_bytes == 4 else per


def tensor_bytes(task: "TensorTask", method: str, sources, *, copies: bool) -> tuple[int, int]:
    """(working set while `task` is merged, its output) in bytes. `copies`: the inputs are read into
    fresh memory (export); otherwise they are views of the mapped files and only a dtype cast costs."""
    numel = 1
    for d in task.spec.shape:
        numel *= d
    stored = [ITEM_SIZE.get(sources.info(m, n).dtype, 4) for m, n in task.inputs]
    load = ITEM_SIZE.get(task.load_dtype, max(stored)) if task.load_dtype else max(stored)
    inputs = sum((s if copies else 0) + (load if load != s else 0) for s in stored) * numel
    out = numel * ITEM_SIZE.get(task.spec.dtype, 4)
    scratch = int(scratch_per_element(method, len(task.inputs), load) * numel)
    return inputs + scratch + out, out


def _window_peak(work: list[int], outs: list[int], workers: int, queue: int) -> tuple[int, int]:
    """(peak bytes, index of the first tensor of the worst window): `workers` consecutive tensors
    merged at once while the `queue` tensors before them wait for the sink."""
    best, where = 0, 0
    for i in range(len(work)):
        held = sum(work[i:i + workers]) + sum(outs[max(0, i - queue):i])
        if held > best:
            best, where = held, i
    return best, where


def merge_memory(p: "MergePlan", sources, *, workers: int | None = None, device: str = "cpu",
                 copies: bool = True, queue: int = SINK_QUEUE, process: int = EXPORT_PROCESS_BYTES) -> MergeMemory:
    """The peak memory of executing plan `p` (see the module's docstring). `copies`/`queue`: an export
    (`evomerge merge`) reads copies and queues for the shard writer; a search's resident model reads
    views and writes at once (`copies=False, queue=1`); `process` is the process without tensors."""
    from evomerge.engine.execution import DEFAULT_WORKERS

    workers = max(1, int(workers or DEFAULT_WORKERS))
    sizes = [tensor_bytes(t, p.method.name, sources, copies=copies) for t in p.tasks]
    work, outs = [w for w, _ in sizes], [o for _, o in sizes]
    peak, _ = _window_peak(work, outs, workers, queue)
    top = max(range(len(work)), key=work.__getitem__) if work else 0
    on_gpu = device != "cpu"
    if on_gpu:  # the GPU holds the working sets; the CPU the inputs read and the outputs queued back
        held_ram, _ = _window_peak(outs, outs, workers, queue)
        ram, vram = process + held_ram, CUDA_CONTEXT_BYTES + peak
    else:
        ram, vram = process + peak, 0
    return MergeMemory(process=process, in_flight=peak, largest_tensor=p.tasks[top].name if p.tasks else "",
                       largest_bytes=work[top] if work else 0, workers=workers, device=device, ram=ram,
                       vram=vram, output_bytes=sum(outs))


def give_back_freed() -> None:
    """Return the memory freed by the last merge to the OS (glibc's malloc_trim; elsewhere nothing).

    A search merges into its resident model trial after trial on two helper threads; glibc keeps what
    each thread's arena freed, so without this a 0.5B slerp search's heap grew from 1.2 GB to 2.1-2.8 GB
    over 4-6 trials (issue 27; measured, with MALLOC_ARENA_MAX=1 it stayed at 1.4 GB). The plan above
    assumes the working set is given back between trials. Costs 20-40 ms per call at 0.5B."""
    import ctypes
    import sys

    if not sys.platform.startswith("linux"):
        return
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc (musl): nothing to trim
        pass


def memory_lines(m: MergeMemory) -> list[str]:
    """`evomerge validate`'s lines for a merge."""
    from evomerge.engine.output import human_bytes as hb

    where = "RAM" if m.device == "cpu" else f"RAM, {hb(m.vram)} on {m.device}"
    return [f"  memory      merge: about {hb(m.ram)} {where} (the process {hb(m.process)}, {m.workers} tensors "
            f"at once: at most {hb(m.in_flight)}; largest {m.largest_tensor} {hb(m.largest_bytes)}); the "
            f"output is {hb(m.output_bytes)}, streamed to disk, never held whole"]

