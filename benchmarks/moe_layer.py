"""MoE layer speed and memory against a dense FFN doing the same active work.

For each row: forward + backward of `moetrain.moe.MoE` (built-in experts) on T tokens, and of a
dense FFN of the expert's shape on k x T tokens (same active FLOPs), timed side by side in one
run (interleaved repetitions; medians, and the ratio of the fastest repetitions, which the
noise of a shared machine disturbs least). Like moetrain's Trainer, the process keeps freed
memory for reuse (moetrain.train.host_memory), for both sides. Memory: peak resident memory of a
fresh process running the same step, minus what it held before the step, MoE over dense; and the
bytes autograd saved for backward, MoE over dense.

    python benchmarks/moe_layer.py                 # the full table of the issue (slow: ~15 min)
    python benchmarks/moe_layer.py --quick         # E in {8, 64}, gelu, fewer repetitions
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

import torch

from moetrain.moe import MLP, MoE
from moetrain.train.host_memory import keep_freed_memory


def build(kind: str, experts: int, k: int, hidden: int, ffn: int, activation: str, tokens: int,
          capacity: str) -> tuple[torch.nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    if kind == "dense":
        return MLP(hidden, ffn, activation), torch.randn(k * tokens, hidden, requires_grad=True)
    drop = capacity != "dropless"
    layer = MoE(hidden, num_experts=experts, k=k, ffn_hidden_size=ffn, activation=activation,
                drop_tokens=drop, capacity_factor=float(capacity) if drop else 1.0,
                use_rts=False, top2_2nd_expert_sampling=False)
    return layer, torch.randn(tokens, hidden, requires_grad=True)


def step(module: torch.nn.Module, x: torch.Tensor) -> None:
    """One forward + backward from cleared gradients, as in a training step after zero_grad()."""
    module.zero_grad(set_to_none=True)
    x.grad = None
    out = module(x)
    out = out[0] if isinstance(out, tuple) else out
    out.backward(torch.ones_like(out))


def saved_bytes(module: torch.nn.Module, x: torch.Tensor) -> int:
    """Bytes autograd keeps for backward (each storage once)."""
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    params = {p.untyped_storage().data_ptr() for p in module.parameters()}
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = module(x)
    out = out[0] if isinstance(out, tuple) else out
    out.sum().backward()
    return sum(n for ptr, n in storages.items() if ptr not in params and ptr != x.untyped_storage().data_ptr())


def peak_memory_child(spec: dict) -> None:
    """Run in a fresh process: print how far one training step raises peak RSS (kB)."""
    module, x = build(**spec)
    resident_kb = int(open("/proc/self/statm").read().split()[1]) * resource.getpagesize() // 1024
    step(module, x)
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"peak_kb": peak_kb - resident_kb}))


def peak_memory(spec: dict) -> float:
    result = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)],
                            capture_output=True, text=True, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])["peak_kb"]


def time_pair(a, b, repeats: int) -> tuple[list[float], list[float]]:
    """Seconds of every repetition of fn a and fn b, interleaved so drift hits both."""
    ta, tb = [], []
    for fn in (a, b):
        fn()
    for _ in range(repeats):
        for fn, acc in ((a, ta), (b, tb)):
            start = time.perf_counter()
            fn()
            acc.append(time.perf_counter() - start)
    return ta, tb


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--child")
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--ffn", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    keep_freed_memory()  # as moetrain's Trainer does on a CPU: both sides reuse freed pages
    if args.child:
        peak_memory_child(json.loads(args.child))
        return
    experts_list = [8, 64] if args.quick else [8, 64, 128]
    activations = ["gelu"] if args.quick else ["gelu", "swiglu"]
    repeats = 3 if args.quick else args.repeats
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, tokens {args.tokens}, "
          f"hidden {args.hidden}, expert ffn {args.ffn}, fp32 CPU")
    print("| act | E | k | capacity | MoE ms | dense ms | time ratio (medians) | time ratio (fastest) "
          "| peak mem ratio | saved-for-backward ratio |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for activation in activations:
        for experts in experts_list:
            for k in (1, 2):
                for capacity in ("dropless", "1.25"):
                    common = dict(experts=experts, k=k, hidden=args.hidden, ffn=args.ffn,
                                  activation=activation, tokens=args.tokens, capacity=capacity)
                    moe, x_moe = build("moe", **common)
                    dense, x_dense = build("dense", **common)
                    runs_moe, runs_dense = time_pair(lambda: step(moe, x_moe),  # noqa: B023 (called at once)
                                                     lambda: step(dense, x_dense), repeats)  # noqa: B023
                    t_moe, t_dense = statistics.median(runs_moe), statistics.median(runs_dense)
                    mem_ratio = peak_memory(dict(kind="moe", **common)) / peak_memory(
                        dict(kind="dense", **common))
                    saved_ratio = saved_bytes(moe, x_moe) / saved_bytes(dense, x_dense)
                    print(f"| {activation} | {experts} | {k} | {capacity} | {t_moe * 1e3:.0f} | "
                          f"{t_dense * 1e3:.0f} | {t_moe / t_dense:.2f} | {min(runs_moe) / min(runs_dense):.2f} | "
                          f"{mem_ratio:.2f} | "
                          f"{saved_ratio:.2f} |", flush=True)


if __name__ == "__main__":
    main()
