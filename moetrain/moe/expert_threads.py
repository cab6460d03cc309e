"""Run experts side by side on single-threaded CPU worker threads.

On a CPU, one expert's matmuls over its few rows, split across all cores by the BLAS library,
run well below the machine's matmul rate (too little work per core per call); whole experts on
separate cores run near it. So on a multi-threaded CPU the experts are cut into contiguous ranges
and a pool with one worker per torch thread, each worker single-threaded, takes the ranges
largest first (BENCHMARKS.md, "MoE layer"). GPUs run all experts as one grouped GEMM instead.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from queue import Empty, SimpleQueue

import torch
from torch import Tensor

TASKS_PER_WORKER = 8  # enough to even out uneven expert loads, few enough to amortise Python
# From this many rows per expert on, the BLAS library's own split of each expert's GEMMs over all
# threads is as fast (BENCHMARKS.md, "Training throughput"), and the workers would only add
# contention with its spinning OpenMP threads.
THREADED_BELOW_ROWS_PER_EXPERT = 512

_pool: ThreadPoolExecutor | None = None
_pool_workers = 0


def use_expert_threads(x: Tensor, num_experts: int) -> bool:
    """Threaded experts on a CPU with several threads, at least two experts per thread, and
    blocks small enough (fewer than THREADED_BELOW_ROWS_PER_EXPERT rows per expert on average)
    that the BLAS library splits them poorly. Decided from shapes: the workers need the rows per
    expert on the host, which is free on a CPU. Never inside torch.compile, which traces one graph.
    """
    if x.device.type != "cpu" or torch.compiler.is_compiling():
        return False
    threads = torch.get_num_threads()
    return threads > 1 and num_experts >= 2 * threads and x.shape[0] < THREADED_BELOW_ROWS_PER_EXPERT * num_experts


def expert_tasks(counts: list[int], workers: int) -> list[slice]:
    """Contiguous expert ranges of about 1 / (TASKS_PER_WORKER * workers) of the rows each (at
    least one expert), largest first so that the last ones to finish are small."""
    target = max(1, sum(counts) // (TASKS_PER_WORKER * workers))
    tasks, first, rows = [], 0, 0
    for e, count in enumerate(counts):
        rows += count
        if rows >= target or e == len(counts) - 1:
            tasks.append(slice(first, e + 1))
            first, rows = e + 1, 0
    return sorted(tasks, key=lambda task: -sum(counts[task]))


def run_experts_threaded(counts: list[int], fn: Callable[[slice, slice], object]) -> None:
    """fn(expert_range, row_range) over all experts, on the workers; returns when all are done.

    Gradient mode is thread-local, so the workers run fn under no_grad explicitly.
    """
    global _pool, _pool_workers
    workers = torch.get_num_threads()
    if _pool is None or _pool_workers != workers:
        if _pool is not None:
            _pool.shutdown()
        _pool = ThreadPoolExecutor(workers, thread_name_prefix="moetrain-experts",
                                   initializer=torch.set_num_threads, initargs=(1,))
        _pool_workers = workers
    starts = [0, *itertools.accumulate(counts)]
    queue: SimpleQueue[slice] = SimpleQueue()
    for task in expert_tasks(counts, workers):
        queue.put(task)

    def drain() -> None:
        with torch.no_grad():
            while True:
                try:
                    task = queue.get_nowait()
                except Empty:
                    return
                fn(task, slice(starts[task.start], starts[task.stop]))

    for future in [_pool.submit(drain) for _ in range(workers)]:
        future.result()


def _forget_pool_after_fork() -> None:
    """A forked child has none of the parent's threads: it builds its own pool when needed."""
    global _pool, _pool_workers
    _pool, _pool_workers = None, 0


os.register_at_fork(after_in_child=_forget_pool_after_fork)
