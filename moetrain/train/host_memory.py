"""Keep freed host memory in the process instead of handing it back to the kernel after each step.

glibc serves large allocations (activations, the experts' weight gradients: hundreds of MB at
64+ experts) with fresh mmap()s and unmaps them on free, so every training step page-faults
them in again: 4 KiB at a time, each page zeroed by the kernel. On the 2-core CPU machine that
was 20-25% of an MoE layer's step at 64 experts (BENCHMARKS.md, "MoE layer"). Serving them from
the heap and never trimming it lets the next step reuse the same pages, as jemalloc or tcmalloc
would. The process keeps its peak footprint; set MOETRAIN_KEEP_FREED_MEMORY=0 to opt out.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

_M_TRIM_THRESHOLD = -1  # glibc mallopt parameters (malloc.h)
_M_MMAP_MAX = -4


def keep_freed_memory() -> bool:
    """Make glibc malloc reuse freed memory (no mmap per allocation, no trimming).

    Returns whether it applied: False on a non-glibc C library or when opted out.
    """
    if os.environ.get("MOETRAIN_KEEP_FREED_MEMORY", "1") == "0":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))
