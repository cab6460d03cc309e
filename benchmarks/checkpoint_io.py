"""What the checkpoint manifest's hashing costs: save and load of a large single-process checkpoint with
and without it, side by side (interleaved, in one process, so a loaded machine slows both alike).

The checkpoint holds `--gb` GiB of fp32 weights and an optimizer state of twice that (Adam's two moments,
as a real run's state.pt), plus a tokenizer file. Three digests, each in the same code: chunked sha256
(now: 16 MiB chunks hashed on all cores), a whole-file sha256 (before: one core per file), and none (a
constant, so the difference is exactly the hashing and the reading it needs). Loads read the files the
save just wrote (page cache), the case where hashing weighs most. Saves hash each file while it is
flushed to disk (since this benchmark was written; the first table in BENCHMARKS.md is from before).

    python benchmarks/checkpoint_io.py                  # 1 GiB of weights, 3 repeats
    python benchmarks/checkpoint_io.py --gb 0.25 --repeats 2
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
import resource
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from moetrain.checkpoint import integrity, load_checkpoint, save_checkpoint, storage  # noqa: E402

TENSORS = 32


def build_state(gib: float) -> tuple[dict, dict]:
    """Weights of `gib` GiB in TENSORS tensors, and an Adam-like optimizer state twice that size."""
    numel = int(gib * 2**30 / 4 / TENSORS)
    weights = {f"layer{i}.weight": torch.randn(numel) for i in range(TENSORS)}
    moments = {i: {"step": torch.tensor(1.0), "exp_avg": torch.randn(numel), "exp_avg_sq": torch.rand(numel)}
               for i in range(TENSORS)}
    return weights, {"state": moments, "param_groups": [{"lr": 1e-3, "params": list(range(TENSORS))}]}


@contextlib.contextmanager
def hashing(variant: str):
    """The checkpoint code with this variant's digest: "chunked" (now), "whole-file" (the digest manifests held
    before: one sha256 per file, on one core) or "none" (a constant: no hashing, no reading back)."""
    saved = integrity.file_digest, integrity.whole_file_sha256
    if variant == "whole-file":
        integrity.file_digest = integrity.whole_file_sha256
    elif variant == "none":
        integrity.file_digest = integrity.whole_file_sha256 = lambda path: "none"
    storage.file_digest = integrity.file_digest
    try:
        yield
    finally:
        integrity.file_digest, integrity.whole_file_sha256 = saved
        storage.file_digest = integrity.file_digest


VARIANTS = ("chunked", "whole-file", "none")


def timed(function) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process's threads): on a loaded machine the CPU time is the steadier."""
    def cpu() -> float:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        return usage.ru_utime + usage.ru_stime

    wall, used = time.perf_counter(), cpu()
    function()
    return time.perf_counter() - wall, cpu() - used


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gb", type=float, default=1.0, help="GiB of fp32 weights (the optimizer state is 2x)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dir", default=None, help="where to write (default: a temporary directory)")
    args = parser.parse_args()
    torch.manual_seed(0)
    weights, optimizer = build_state(args.gb)
    files = {"tokenizer.json": "{}" * 1000}
    times: dict[tuple[str, str], list[tuple[float, float]]] = {}
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        for repeat in range(args.repeats):
            for variant in VARIANTS[repeat % len(VARIANTS):] + VARIANTS[:repeat % len(VARIANTS)]:  # rotate order
                save_dir = os.path.join(tmp, variant)
                with hashing(variant):
                    times.setdefault(("save", variant), []).append(timed(functools.partial(
                        save_checkpoint, save_dir, 1, model_state=weights, optimizer_state=optimizer, extra={},
                        files=files)))
                    times.setdefault(("load", variant), []).append(timed(functools.partial(load_checkpoint, save_dir)))
                shutil.rmtree(save_dir)
        size = sum(t.numel() * 4 for t in weights.values()) * 3 / 2**30
    print(f"checkpoint: {size:.2f} GiB (weights {args.gb:g} GiB + optimizer state), {args.repeats} repeats, "
          f"median wall seconds (CPU seconds); hashing threads here: {integrity.hashing_threads(1 << 40)}")
    print("| operation | chunked sha256 (now) | whole-file sha256 (before) | no hashing "
          "| hashing's share of the wall time now / before |")
    print("|---|---|---|---|---|")
    for operation in ("save", "load"):
        cells, wall = [], {}
        for variant in VARIANTS:
            runs = times[(operation, variant)]
            wall[variant] = statistics.median(w for w, _ in runs)
            cells.append(f"{wall[variant]:.2f} s ({statistics.median(c for _, c in runs):.2f} s)")
        shares = " / ".join(f"{(wall[v] - wall['none']) / wall[v]:.0%}" for v in VARIANTS[:2])
        print(f"| {operation} | {' | '.join(cells)} | {shares} |")


if __name__ == "__main__":
    main()
