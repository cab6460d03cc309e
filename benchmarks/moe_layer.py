"""MoE layer speed against a dense FFN doing the same active work, and against peer MoE layers.

For each row (E experts, top-k, T tokens): forward + backward of
- `dense`: a dense FFN of the expert's shape on k x T tokens (same active FLOPs: the yardstick),
- `moetrain`: `moetrain.moe.MoE` dropless, and `moetrain-cf1.25` with capacity factor 1.25,
- `deepspeed`: `deepspeed.moe.layer.MoE` with drop_tokens=False, `deepspeed-cf1.25` with 1.25,
- `transformers`: transformers' `MixtralSparseMoeBlock` (dropless),
the peers when installed, every layer with the same expert shape (SwiGLU unless --activation gelu)
and the same router-free cost of noise (no jitter, no RTS, no second-expert sampling). Gradients
are cleared before every step, as a training step does; repetitions are interleaved over the
variants in one process, and each row reports the dense median and, per variant, the median over
rounds of its time over the dense step of the same round (machine drift cancels within a round). On
a GPU (--device cuda) the rows also report TFLOP/s (active FLOPs: 3 x 2 x kT x 3df for SwiGLU) and
the ratio to the card's measured rate for a dense GEMM of the same shape.

    python benchmarks/moe_layer.py                          # CPU fp32: E {8,64,128} x k {1,2} x T {4096,8192}
    python benchmarks/moe_layer.py --experts 8 --k 2 --tokens 4096 --variants dense moetrain transformers
    python benchmarks/moe_layer.py --device cuda --dtype bf16 --tokens 16384 --hidden 4096 --ffn 14336 --experts 8 --k 2
    python benchmarks/moe_layer.py --memory                 # + peak memory / saved-for-backward vs dense
    python benchmarks/moe_layer.py --router-memory          # router peak memory, E=256, k=8, 32768 tokens
"""

from __future__ import annotations

import argparse
import contextlib
import json
import resource
import statistics
import subprocess
import sys
import time

import torch
from torch import nn

from moetrain.moe import MLP, MoE
from moetrain.train.host_memory import keep_freed_memory

VARIANTS = ("dense", "moetrain", "moetrain-cf1.25", "deepspeed", "deepspeed-cf1.25", "transformers")


class _PeerExpert(nn.Module):
    """One expert for DeepSpeed: moetrain's MLP layout (fc1 d -> 2f for SwiGLU, fc2 f -> d)."""

    def __init__(self, hidden: int, ffn: int, activation: str) -> None:
        super().__init__()
        self.mlp = MLP(hidden, ffn, activation)

    def forward(self, x):
        return self.mlp(x)


def build(kind: str, experts: int, k: int, hidden: int, ffn: int, activation: str, tokens: int,
          device: str = "cpu") -> tuple[nn.Module, torch.Tensor] | None:
    """The module of one variant and its input; None when its library is not installed."""
    torch.manual_seed(0)
    with torch.device(device):  # parameters made in place: large GPU rows build in seconds
        built = _build_on_device(kind, experts, k, hidden, ffn, activation, tokens)
    if built is None:
        return None
    module, x = built
    return module, x.detach().requires_grad_()


def _build_on_device(kind, experts, k, hidden, ffn, activation, tokens):
    x = torch.randn(tokens, hidden)
    if kind == "dense":
        module = MLP(hidden, ffn, activation)
        x = torch.randn(k * tokens, hidden)
    elif kind.startswith("moetrain"):
        drop = kind.endswith("cf1.25")
        module = MoE(hidden, num_experts=experts, k=k, ffn_hidden_size=ffn, activation=activation,
                     drop_tokens=drop, capacity_factor=1.25 if drop else 1.0,
                     use_rts=False, top2_2nd_expert_sampling=False)
    elif kind.startswith("deepspeed"):
        try:
            from deepspeed.moe.layer import MoE as DeepSpeedMoE
            from deepspeed.utils import logger
        except ImportError:
            return None
        logger.setLevel("ERROR")
        drop = kind.endswith("cf1.25")
        module = DeepSpeedMoE(hidden, _PeerExpert(hidden, ffn, activation), num_experts=experts,
                              ep_size=1, k=k, capacity_factor=1.25 if drop else 1.0,
                              drop_tokens=drop, use_rts=False, top2_2nd_expert_sampling=False)
        x = x.view(1, tokens, hidden)
    elif kind == "transformers":
        if activation != "swiglu":
            return None
        try:
            from transformers import MixtralConfig
            from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock
        except ImportError:
            return None
        config = MixtralConfig(hidden_size=hidden, intermediate_size=ffn, num_local_experts=experts,
                               num_experts_per_tok=k, router_jitter_noise=0.0)
        module = MixtralSparseMoeBlock(config)
        with torch.no_grad():
            for param in module.parameters():
                param.normal_(0.0, 0.02)
        x = x.view(1, tokens, hidden)
    else:
        raise ValueError(f"unknown variant {kind!r}; choose from {VARIANTS}")
    return module, x


def step(module: nn.Module, x: torch.Tensor, dtype: str) -> None:
    """One forward + backward from cleared gradients, as in a training step after zero_grad()."""
    module.zero_grad(set_to_none=True)
    x.grad = None
    autocast = (torch.autocast(x.device.type, dtype=torch.bfloat16) if dtype == "bf16"
                else contextlib.nullcontext())
    with autocast:
        out = module(x)
    out = out[0] if isinstance(out, tuple) else out
    out.float().backward(torch.ones_like(out, dtype=torch.float32))


SETTLE_ROUNDS = 8  # at most this many warm-up rounds; a CPU row's heap settles in 2-4
SETTLED_FAULTS = 256  # page faults per round (1 MiB) that count as settled: Python's own churn


def settle(fns: dict) -> None:
    """Warm-up rounds over all variants until one round page-faults no new memory (at most
    SETTLE_ROUNDS).

    With freed memory kept (`keep_freed_memory`), the heap still grows for a few rounds while the
    variants' allocations fragment it, and every growth is paid in page faults (4 KiB each, zeroed
    by the kernel) inside whichever step hit it: with one warm-up round, the first row of a run
    (8192 tokens, k=1) charged ~100 MB of faults to some repetitions of one variant and not others.
    """
    for _ in range(SETTLE_ROUNDS):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        for fn in fns.values():
            fn()
        if resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before < SETTLED_FAULTS:
            break


def is_peer(kind: str) -> bool:
    return kind != "dense" and not kind.startswith("moetrain")


def guarded(kind: str, action, *args, **kwargs):
    """`action(...)`, or None when a peer (DeepSpeed, transformers) fails in any way (not installed as
    expected, out of memory, an API of another version): its cells say n/a, the row stands."""
    if not is_peer(kind):
        return action(*args, **kwargs)
    try:
        return action(*args, **kwargs)
    except Exception as error:  # noqa: BLE001 - a peer's failure of any kind is reported, never fatal
        print(f"# peer {kind} failed: {type(error).__name__}: {str(error).splitlines()[0][:200] if str(error) else ''}",
              file=sys.stderr, flush=True)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        return None


def timed_runs(fns: dict, repeats: int, device: str) -> dict[str, list[float]]:
    """Seconds of every repetition of each function, interleaved so drift hits all alike, after
    `settle` warmed every variant up."""
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    times: dict[str, list[float]] = {name: [] for name in fns}
    settle(fns)
    for _ in range(repeats):
        for name, fn in fns.items():
            sync()
            start = time.perf_counter()
            fn()
            sync()
            times[name].append(time.perf_counter() - start)
    return times


def matmul_tflops(m: int, n: int, k: int, device: str, repeats: int = 20) -> float:
    """Measured bf16 rate of one [m, k] @ [k, n] GEMM (TFLOP/s)."""
    a = torch.randn(m, k, device=device, dtype=torch.bfloat16)
    b = torch.randn(k, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    torch.cuda.synchronize()
    return 2 * m * n * k * repeats / (time.perf_counter() - start) / 1e12


def active_flops(k: int, tokens: int, hidden: int, ffn: int, activation: str) -> float:
    """Forward + backward FLOPs of the expert GEMMs: 3 x 2 x rows x (first + second matrix)."""
    first = 2 * ffn if activation == "swiglu" else ffn
    return 3 * 2 * k * tokens * (hidden * first + ffn * hidden)


def saved_bytes(module: nn.Module, x: torch.Tensor) -> int:
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


def _child(spec: dict) -> None:
    """Run in a fresh process: print how far one step (or a router forward + backward) raises
    peak RSS (kB)."""
    if spec.pop("router", False):
        from moetrain.moe import RoutingConfig, TopKRouter
        torch.manual_seed(0)
        router = TopKRouter(spec["hidden"], spec["experts"], RoutingConfig(k=spec["k"], drop_policy=spec["policy"]))
        x = torch.randn(spec["tokens"], spec["hidden"], requires_grad=True)
        resident_kb = int(open("/proc/self/statm").read().split()[1]) * resource.getpagesize() // 1024
        decision = router(x)
        (decision.weights.sum() + decision.l_aux + decision.z_loss).backward()
    else:
        module, x = build(**spec)
        resident_kb = int(open("/proc/self/statm").read().split()[1]) * resource.getpagesize() // 1024
        step(module, x, "fp32")
    print(json.dumps({"peak_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - resident_kb}))


def peak_kb(spec: dict) -> float:
    result = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)],
                            capture_output=True, text=True, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])["peak_kb"]


def router_memory() -> None:
    print("router forward + backward, E=256, k=8, 32768 tokens, hidden 1024, fp32 CPU: peak RSS growth")
    for policy in ("position", "probs"):
        kb = peak_kb(dict(router=True, experts=256, k=8, tokens=32768, hidden=1024, policy=policy))
        print(f"  drop_policy {policy}: {kb / 1024:.0f} MiB")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--experts", type=int, nargs="+", default=[8, 64, 128])
    parser.add_argument("--k", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--tokens", type=int, nargs="+", default=[4096, 8192])
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--ffn", type=int, default=1024)
    parser.add_argument("--activation", default="swiglu", choices=["swiglu", "gelu"])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"],
                        help="bf16: autocast over float32 parameters, as `--bf16` training runs")
    parser.add_argument("--memory", action="store_true",
                        help="also peak memory and saved-for-backward of moetrain vs dense (CPU)")
    parser.add_argument("--router-memory", action="store_true")
    parser.add_argument("--child")
    args = parser.parse_args()
    keep_freed_memory()  # as moetrain's Trainer does on a CPU: every side reuses freed pages
    if args.child:
        _child(json.loads(args.child))
        return
    if args.router_memory:
        router_memory()
        return
    on_gpu = args.device.startswith("cuda")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.device}, {args.dtype}, "
          f"hidden {args.hidden}, expert ffn {args.ffn}, {args.activation}, {args.repeats} repetitions")
    variants = [v for v in args.variants if v != "dense"]
    header = "| E | k | tokens | dense ms | " + " | ".join(f"{v} / dense" for v in variants) + " |"
    if on_gpu:
        header += " dense GEMM TFLOP/s | " + " | ".join(f"{v} TFLOP/s (share)" for v in variants) + " |"
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    for experts in args.experts:
        for k in args.k:
            for tokens in args.tokens:
                common = dict(experts=experts, k=k, hidden=args.hidden, ffn=args.ffn,
                              activation=args.activation, tokens=tokens, device=args.device)
                built = {v: guarded(v, build, v, **common) for v in ["dense", *variants]}
                fns = {v: (lambda m=m, x=x: step(m, x, args.dtype))
                       for v, pair in built.items() if pair is not None for m, x in [pair]}
                # one untimed step of each peer first: a peer that fails there is left out (n/a)
                fns = {v: fn for v, fn in fns.items() if not is_peer(v) or guarded(v, lambda fn=fn: fn() or True)}
                runs = timed_runs(fns, args.repeats, args.device)
                times = {v: statistics.median(t) for v, t in runs.items()}
                # each round's ratio to the dense step run next to it, then the median: drift in the
                # machine's speed between rounds cancels out of a pair
                cells = [f"{statistics.median(a / b for a, b in zip(runs[v], runs['dense'])):.2f}"
                         if v in runs else "n/a" for v in variants]
                line = f"| {experts} | {k} | {tokens} | {times['dense'] * 1e3:.1f} | " + " | ".join(cells) + " |"
                if on_gpu:
                    first = 2 * args.ffn if args.activation == "swiglu" else args.ffn
                    peak = matmul_tflops(k * tokens, first, args.hidden, args.device)
                    flops = active_flops(k, tokens, args.hidden, args.ffn, args.activation)
                    rates = [f"{flops / times[v] / 1e12:.0f} ({flops / times[v] / 1e12 / peak:.0%})"
                             if v in times else "n/a" for v in variants]
                    line += f" {peak:.0f} | " + " | ".join(rates) + " |"
                print(line, flush=True)
                if args.memory and "moetrain" in built:
                    spec = {key: value for key, value in common.items() if key != "device"}
                    mem = peak_kb(dict(kind="moetrain", **spec)) / peak_kb(dict(kind="dense", **spec))
                    saved = saved_bytes(*built["moetrain"]) / saved_bytes(*built["dense"])
                    print(f"|   | memory (moetrain / dense): peak {mem:.2f}, saved-for-backward {saved:.2f} |")
                del built, fns


if __name__ == "__main__":
    main()
