"""Parallel layouts on this machine (gloo, 1, 2 and 4 CPU processes): step time, all-to-all share,
and optimizer-state memory per rank under ZeRO 0/1/2.

Every layout trains the same model through `Trainer.train_step()` on the same global batch of
synthetic tokens. Reported per layout, medians over the timed steps, from rank 0:

  step s         wall time of one optimizer step
  all-to-all     share of the step spent inside the expert dispatcher's all-to-all calls (waiting
                 for the slowest rank included: that is what the exchange costs the step)
  optim MiB      bytes of AdamW state (exp_avg, exp_avg_sq, step) this rank holds, max over ranks
  grads MiB      peak bytes of gradients this rank holds during backward and reduction: every local
                 parameter's under ZeRO 0/1; its owned share plus the bucket in flight under ZeRO 2

A second table gives, for plain data parallelism (DP 2, DP 4), the share of the step spent waiting
on the data-parallel gradient all-reduce with the all-reduce after backward ("after") and overlapped
with the last micro-batch's backward ("overlap", OverlappedAllReduce): the time inside
`GradientSync.reduce()`, which runs every all-reduce in the first mode and only finishes and waits
for the launched ones in the second. The two modes alternate step by step in the same processes,
so both see the same load.

Every process runs one thread. This machine has 2 cores, so 4 processes oversubscribe it: step
times there measure the code path, not a speed-up. The memory columns are exact counts and do not
depend on load.

    python benchmarks/parallel.py            # 2 warm-up + 5 timed steps per layout
    python benchmarks/parallel.py --quick    # 1 + 2
    python benchmarks/parallel.py --only overlap   # just the all-reduce wait table (--only layouts: the first)
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from moetrain.checkpoint.layout import optimizer_states
from moetrain.config import Config
from moetrain.moe import dispatcher as dispatcher_module
from moetrain.train.trainer import Trainer

LAYOUTS = [  # (name, world size, parallel config)
    ("1 process", 1, {}),
    ("DP 2", 2, {}),
    ("EP 2 (DP 2)", 2, {"expert_parallel_size": 2}),
    ("TP 2", 2, {"tensor_parallel_size": 2}),
    ("PP 2", 2, {"pipeline_parallel_size": 2}),
    ("DP 4, ZeRO 0", 4, {}),
    ("DP 4, ZeRO 1", 4, {"zero_stage": 1}),
    ("DP 4, ZeRO 2", 4, {"zero_stage": 2}),
    ("DP 4 x EP 4, ZeRO 2", 4, {"zero_stage": 2, "expert_parallel_size": 4}),
]


def config(data_dir: str, parallel: dict, *, layers: int = 4, hidden: int = 128, experts: int = 8,
           expert_interval: int = 1, seq: int = 128, micro_batch: int = 4, global_batch: int = 16) -> Config:
    """A llama-style MoE (top-2, dropless) on the byte corpus in `data_dir`, `parallel` setting ParallelConfig."""
    cfg = Config()
    m = cfg.model
    m.style, m.num_layers, m.hidden_size, m.num_attention_heads, m.seq_length = "llama", layers, hidden, 8, seq
    cfg.moe.num_experts, cfg.moe.expert_interval, cfg.moe.topk = [experts], expert_interval, 2
    cfg.moe.drop_tokens, cfg.moe.top2_2nd_expert_sampling = False, False
    cfg.data.tokenizer_type, cfg.data.data_path = "byte", [data_dir]
    cfg.data.cache_dir, cfg.data.split = os.path.join(data_dir, "cache"), "100,0,0"
    t = cfg.training
    t.micro_batch_size, t.global_batch_size, t.train_iters = micro_batch, global_batch, 1000
    t.device, t.progress_bar, t.eval_interval, t.save = "cpu", False, 0, None
    for key, value in parallel.items():
        setattr(cfg.parallel, key, value)
    return cfg


def _tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


def _join(rank: int, world: int, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)  # one thread per process: 2 threads on a busy 2-core box stall in OpenMP barriers


def _worker(rank: int, world: int, port: int, data_dir: str, parallel: dict, steps: tuple[int, int],
            results) -> None:
    _join(rank, world, port)
    exchange = [0.0]
    timed = dispatcher_module._all_to_all

    def all_to_all(*args, **kwargs):
        start = time.perf_counter()
        out = timed(*args, **kwargs)
        exchange[0] += time.perf_counter() - start
        return out

    dispatcher_module._all_to_all = all_to_all
    trainer = Trainer(config(data_dir, parallel), quiet=True)
    peak_grads = [0]
    optimizer = trainer.optimizer
    if getattr(optimizer, "stage", 0) == 2:
        reduce_bucket = optimizer._reduce_bucket

        def counting_reduce(bucket):  # gradients only pile up until a bucket is reduced: sample here
            held = _tensor_bytes(p.grad for p in trainer.grad_specs if p.grad is not None)
            peak_grads[0] = max(peak_grads[0], held + _tensor_bytes(optimizer.reduced.values()))
            reduce_bucket(bucket)
        optimizer._reduce_bucket = counting_reduce
    else:  # every local parameter's gradient is whole at the end of backward
        peak_grads[0] = _tensor_bytes(trainer.grad_specs)
    warmup, timed_steps = steps
    for _ in range(warmup):
        trainer.train_step()
    times, shares = [], []
    for _ in range(timed_steps):
        exchange[0] = 0.0
        if world > 1:
            dist.barrier()
        start = time.perf_counter()
        trainer.train_step()
        elapsed = time.perf_counter() - start
        times.append(elapsed)
        shares.append(exchange[0] / elapsed)
    states = optimizer_states(trainer.optimizer, list(trainer.model.parameters()))
    optim_bytes = _tensor_bytes(v for state in states.values() for v in state.values())
    results[rank] = (statistics.median(times), statistics.median(shares), optim_bytes, peak_grads[0])
    if world > 1:
        dist.destroy_process_group()


def _overlap_worker(rank: int, world: int, port: int, data_dir: str, steps: tuple[int, int], results) -> None:
    """Median step time and share of it inside GradientSync.reduce(), per mode, modes alternating."""
    _join(rank, world, port)
    trainer = Trainer(config(data_dir, {}), quiet=True)
    sync = trainer.grad_sync
    overlapped, reduce = sync.overlapped, sync.reduce
    waited = [0.0]

    def timed_reduce():
        start = time.perf_counter()
        reduce()
        waited[0] += time.perf_counter() - start

    sync.reduce = timed_reduce
    warmup, timed_steps = steps
    runs = {"after": ([], []), "overlap": ([], [])}
    for i in range(2 * (warmup + timed_steps)):
        mode = ("after", "overlap")[i % 2]
        sync.overlapped = overlapped if mode == "overlap" else None  # None: all-reduce after backward
        waited[0] = 0.0
        dist.barrier()
        start = time.perf_counter()
        trainer.train_step()
        elapsed = time.perf_counter() - start
        if i >= 2 * warmup:
            runs[mode][0].append(elapsed)
            runs[mode][1].append(waited[0] / elapsed)
    results[rank] = {mode: (statistics.median(t), statistics.median(w)) for mode, (t, w) in runs.items()}
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--only", choices=["layouts", "overlap"], help="print only this table")
    args = parser.parse_args()
    steps = (1, 2) if args.quick else (2, 5)
    import tempfile

    import moetrain.data.corpus as corpus

    with tempfile.TemporaryDirectory() as data_dir:
        with open(os.path.join(data_dir, "corpus.txt"), "w") as f:
            f.write("\n".join(corpus.default_corpus())[:400_000])
        print(f"model: llama style, 4 layers, hidden 128, 8 experts top-2 in every layer (dropless), seq 128, "
              f"global batch 16 sequences; {steps[1]} timed steps after {steps[0]} warm-up; load average "
              f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
        if args.only != "overlap":
            layouts_table(data_dir, steps)
        if args.only != "layouts":
            overlap_table(data_dir, steps)


def layouts_table(data_dir: str, steps: tuple[int, int]) -> None:
    print(f"{'layout':<22} {'step s':>8} {'all-to-all':>11} {'optim MiB':>10} {'grads MiB':>10}")
    for name, world, parallel in LAYOUTS:
        results = mp.Manager().dict()
        mp.spawn(_worker, args=(world, _free_port(), data_dir, parallel, steps, results), nprocs=world)
        step = statistics.median(r[0] for r in results.values())
        share = max(r[1] for r in results.values())
        optim = max(r[2] for r in results.values()) / 2**20
        grads = max(r[3] for r in results.values()) / 2**20
        print(f"{name:<22} {step:>8.3f} {share:>10.1%} {optim:>10.2f} {grads:>10.2f}", flush=True)


def overlap_table(data_dir: str, steps: tuple[int, int]) -> None:
    """DP all-reduce wait, after backward vs overlapped, each world size in one set of processes."""
    print("\nDP all-reduce wait (share of the step inside GradientSync.reduce, max over ranks; step s: median)")
    print(f"{'layout':<8} {'after: step s':>14} {'wait':>7} {'overlap: step s':>16} {'wait':>7}")
    for world in (2, 4):
        results = mp.Manager().dict()
        mp.spawn(_overlap_worker, args=(world, _free_port(), data_dir, steps, results), nprocs=world)
        row = []
        for mode in ("after", "overlap"):
            row += [statistics.median(r[mode][0] for r in results.values()), max(r[mode][1] for r in results.values())]
        print(f"{f'DP {world}':<8} {row[0]:>14.3f} {row[1]:>7.1%} {row[2]:>16.3f} {row[3]:>7.1%}", flush=True)


if __name__ == "__main__":
    main()
