"""Executing a merge plan: every planned tensor computed and written into a sink, in plan order.

Why it exists: one plan, two sinks. The same code computes each output tensor for the resident model
of a search (`ModelSink`) and for the shards of `evomerge merge` (`ShardedSafetensorsSink`), so they
agree bit for bit. It fixes the torch thread count merges run with (see DEFAULT_MERGE_THREADS), reads
and merges on helper threads while the caller writes in order, and checks the `--device` a command
runs on (`resolve_device`). The search's workers call `merge_into`; `merge.merge_to_dir` calls `execute`.
"""

from __future__ import annotations

import functools
import os
from typing import TYPE_CHECKING, Any

from evomerge.errors import ConfigError
from evomerge.engine.plan import MergePlan, TensorTask, plan
from evomerge.engine.recipe import MergeRecipe

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from evomerge.engine.checkpoints import Sources
    from evomerge.engine.methods import MergeMethod

# torch's CPU reductions (slerp's norms, DARE's L1 rescale) split their work by thread count, so the
# same merge computed with 1 and with 2 threads can differ in the last bit. Every merge therefore runs
# with one fixed thread count (restored afterwards), so the in-memory merge scored by a search worker
# (whatever its own thread setting) and the export are identical. Override with EVOMERGE_MERGE_THREADS
# (or `evomerge merge --threads`); search and export must then use the same value.
DEFAULT_MERGE_THREADS = 2
DEFAULT_WORKERS = 2  # tensors merged at once (see `execute`)


def merge_threads(threads: int | None = None) -> int:
    """The torch thread count merges run with: `threads`, else $EVOMERGE_MERGE_THREADS, else 2."""
    if threads is not None:
        return int(threads)
    env = os.environ.get("EVOMERGE_MERGE_THREADS")
    if env:
        try:
            value = int(env)
        except ValueError:
            raise ConfigError(f"EVOMERGE_MERGE_THREADS must be a positive integer, got {env!r}",
                              where="EVOMERGE_MERGE_THREADS", fix="unset it or set e.g. 2") from None
        if value >= 1:
            return value
        raise ConfigError(f"EVOMERGE_MERGE_THREADS must be a positive integer, got {env!r}",
                          where="EVOMERGE_MERGE_THREADS", fix="unset it or set e.g. 2")
    return DEFAULT_MERGE_THREADS


def execute(p: MergePlan, sink: Any, sources: "Sources", *, progress: bool = False, device: str = "cpu",
            workers: int | None = None, threads: int | None = None) -> None:
    """Compute every planned tensor and write it into `sink`, in plan order.

    Tensors are read and merged on `workers` helper threads (default 2) while the caller writes the
    finished ones in order. Reads release the GIL and TIES' top-k (sort/select) is single-threaded in
    torch, so this overlaps I/O and keeps both cores busy; measured on this (loaded, 2-core) machine, the
    same torch ops issued from a helper thread also ran 5-30x faster than from the main thread with
    2 intra-op threads (cause not established; results are identical). Results do not depend on `workers`: each tensor is computed by the same ops,
    DARE from its own generator (tests compare workers=1 and 2 bit for bit). The arithmetic runs with
    `merge_threads(threads)` torch threads (see DEFAULT_MERGE_THREADS), restored afterwards.
    `workers=1` computes everything on the calling thread.
    """
    import torch

    n_threads = merge_threads(threads)
    if workers is None:
        workers = DEFAULT_WORKERS
    old_threads = torch.get_num_threads()
    if n_threads != old_threads:
        torch.set_num_threads(n_threads)
    try:
        _execute(p, sink, sources, progress=progress, device=device, workers=max(1, int(workers)))
    finally:
        if torch.get_num_threads() != old_threads:
            torch.set_num_threads(old_threads)



def _execute(p: MergePlan, sink: Any, sources: "Sources", *, progress: bool, device: str, workers: int) -> None:
    prepare = getattr(sink, "prepare", None)
    if prepare is not None:
        prepare(p.specs)
    compute = functools.partial(_compute, p.method, sources, device)
    out = _Written(sink, len(p.tasks), progress)
    pool = None
    try:
        if workers <= 1:
            for task in p.tasks:
                out.write(task.name, compute(task))
        else:
            from concurrent.futures import ThreadPoolExecutor

            pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="evomerge-merge")
            _in_order(pool, p.tasks, compute, out, workers)
    except BaseException:
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
            pool = None
        abort = getattr(sink, "abort", None)
        if abort is not None:
            abort()
        raise
    finally:
        if pool is not None:
            pool.shutdown(wait=True)
        out.close()
    sink.finish()


def _compute(method: "MergeMethod", sources: "Sources", device: str, task: TensorTask) -> "torch.Tensor":
    """One output tensor: its inputs read (moved to `device`, cast to the load dtype, re-indexed to the
    output vocabulary when the recipe chose one), merged with the tensor's own generator, cast to its
    output dtype."""
    import torch

    tensors = {}
    for model, name in task.inputs:
        x = sources.tensor(model, name)
        if device != "cpu":
            x = x.to(device)
        if task.load_dtype is not None and x.dtype != getattr(torch, task.load_dtype):
            x = x.to(getattr(torch, task.load_dtype))
        tensors[model] = x
    if task.vocabulary is not None:  # rows re-indexed to the recipe's output vocabulary
        tensors = task.vocabulary.rows(tensors, task.base)
    generator = None
    if task.seed is not None:
        generator = torch.Generator(device=device).manual_seed(task.seed)
    out = method.merge(tensors, task.base, task.model_params, task.global_params, generator=generator)
    want = getattr(torch, task.spec.dtype)
    return out if out.dtype == want else out.to(want)


def _in_order(pool, tasks: list[TensorTask], compute, out: "_Written", workers: int) -> None:
    """Compute on the pool's threads, at most `workers` tensors ahead, and write in plan order."""
    from collections import deque

    window: deque = deque()
    for task in tasks:
        window.append((task, pool.submit(compute, task)))
        if len(window) > workers:
            done, future = window.popleft()
            out.write(done.name, future.result())
    while window:
        done, future = window.popleft()
        out.write(done.name, future.result())


class _Written:
    """The sink's writes, counted on a progress bar (tqdm) when asked for."""

    def __init__(self, sink: Any, total: int, progress: bool):
        self.sink, self.bar = sink, None
        if progress:
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc="merging", unit="tensor", dynamic_ncols=True)

    def write(self, name: str, tensor: "torch.Tensor") -> None:
        self.sink.write(name, tensor)
        if self.bar is not None:
            self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def merge_into(sink: Any, recipe: MergeRecipe, sources: "Sources", *, progress: bool = False,
               threads: int | None = None, workers: int | None = None) -> None:
    """Merge `recipe` from the opened `sources` into `sink` (ModelSink or ShardedSafetensorsSink).

    Cheap to call once per trial: the plan's structure is cached on `sources`; only parameter values
    are resolved again. `threads`/`workers`: see `execute`."""
    p = plan(recipe, sources)
    execute(p, sink, sources, progress=progress, device=sources.device, threads=threads, workers=workers)


def resolve_device(device: str) -> str:
    """`auto` -> cuda when this machine has a GPU, else cpu; cpu, cuda and cuda:N are checked against the
    machine (a ConfigError naming --device otherwise). Returns the device to use."""
    if device == "cpu":
        return device
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ConfigError(f"unknown device {device!r}", where="--device", fix="use cpu, cuda, cuda:N or auto") from None
    if dev.type not in ("cpu", "cuda"):
        raise ConfigError(f"device type {dev.type!r} is not supported", where="--device", fix="use cpu, cuda or cuda:N")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError("CUDA is not available on this machine", where="--device", fix="use --device cpu (or auto)")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ConfigError(f"there is no GPU {dev.index} (this machine has {torch.cuda.device_count()})",
                              where="--device", fix=f"use cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    return device
