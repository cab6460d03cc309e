"""Model-state memory per rank under ZeRO 0/1/2/3 (gloo, CPU processes), the largest model a per-rank budget
trains at 4 processes under ZeRO-2 and ZeRO-3, and the step time of ZeRO-3 against ZeRO-2 at DP 2.

Model state = the parameters, gradients and AdamW state a rank holds, plus ZeRO-3 parameters gathered and
not yet freed, counted from its tensors (moetrain.parallel.memory.model_state_bytes), not from RSS: exact
counts that do not depend on load. Measured after start-up and with a step's gradients and optimizer state
(just before they are cleared), max over ranks.

  1. bytes per rank, ZeRO 0/1/2/3 at DP 1, 2, 4 (DP 1: one process, every stage holds everything)
  2. the largest model of a grid (layers x hidden x experts) whose model state fits --budget-mib per rank at
     4 processes: bytes per parameter per rank measured on the base model for each stage, plus for ZeRO-3
     an allowance of one block's gathered parameters (held during its forward and backward); the chosen
     model is then trained one step and measured
  3. ZeRO-3 / ZeRO-2 step time at DP 2: both trainers in the same two processes, steps alternating, medians

    python benchmarks/memory_scaling.py                 # all three
    python benchmarks/memory_scaling.py --only bytes    # just table 1 (bytes | budget | time)
"""

from __future__ import annotations

import argparse
import itertools
import os
import socket
import statistics
import tempfile
import time

import torch
import torch.multiprocessing as mp
from parallel import config as parallel_benchmark_config  # benchmarks/parallel.py, beside this script

from moetrain.config import Config
from moetrain.model import GPT
from moetrain.parallel.memory import model_state_bytes, record_before_zero_grad
from moetrain.train.trainer import Trainer

MIB = 2**20


def config(data_dir: str, layers: int = 4, hidden: int = 128, experts: int = 8, **parallel) -> Config:
    """benchmarks/parallel.py's model, MoE every other layer, seq 64, micro-batch 2, global batch 8."""
    return parallel_benchmark_config(data_dir, parallel, layers=layers, hidden=hidden, experts=experts,
                                     expert_interval=2, seq=64, micro_batch=2, global_batch=8)


def write_data(data_dir: str) -> None:
    with open(os.path.join(data_dir, "corpus.txt"), "w") as f:
        f.write("the quick brown fox jumps over the lazy dog. " * 4000)


def parameters(cfg: Config) -> tuple[int, int]:
    """(whole model's parameters, the largest block's), counted on the meta device."""
    cfg = Config.from_dict(cfg.to_dict())
    cfg.model.vocab_size = 256
    with torch.device("meta"):
        model = GPT(cfg.model, cfg.moe, seed=0)
    return model.parameter_counts()["total"], max(sum(p.numel() for p in b.parameters()) for b in model.blocks)


def _init(rank: int, world: int, port: int) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)


def _measure(rank: int, world: int, port: int, cfg_dict: dict, results) -> None:
    _init(rank, world, port)
    trainer = Trainer(Config.from_dict(cfg_dict), quiet=True)
    held = {"start": model_state_bytes(trainer.model, trainer.optimizer)}
    record_before_zero_grad(trainer.model, trainer.optimizer, held)
    trainer.train_step()
    results[rank] = held


def _timed(rank: int, world: int, port: int, cfg_dicts: list[dict], steps: int, results) -> None:
    _init(rank, world, port)
    trainers = [Trainer(Config.from_dict(d), quiet=True) for d in cfg_dicts]
    times: list[list[float]] = [[] for _ in trainers]
    for step in range(steps + 1):
        for i, trainer in enumerate(trainers):
            start = time.perf_counter()
            trainer.train_step()
            if step:  # the first step of each warms up
                times[i].append(time.perf_counter() - start)
    results[rank] = [statistics.median(t) for t in times]


def _spawn(fn, world: int, *args) -> dict:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    results = mp.Manager().dict()
    mp.spawn(fn, args=(world, port, *args, results), nprocs=world, join=True)
    return dict(results)


def held_bytes(cfg: Config, world: int) -> dict[str, int]:
    """Max over ranks of the model-state bytes after start-up ("start") and with a step's state ("step")."""
    ranks = _spawn(_measure, world, cfg.to_dict())
    return {when: max(r[when]["total"] for r in ranks.values()) for when in ("start", "step")}


def bytes_table(data_dir: str) -> None:
    base = config(data_dir)
    whole, block = parameters(base)
    print(f"\n### Model state per rank (MiB, max over ranks): {whole / 1e6:.2f} M parameters, "
          f"{4 * whole / MIB:.2f} MiB of fp32 weights, largest block {4 * block / MIB:.2f} MiB\n")
    print("| ZeRO stage | DP 1: start / step | DP 2: start / step | DP 4: start / step |")
    print("|---|---|---|---|")
    for stage in (0, 1, 2, 3):
        cells = []
        for world in (1, 2, 4):
            got = held_bytes(config(data_dir, zero_stage=stage if world > 1 else 0), world)
            cells.append(f"{got['start'] / MIB:.2f} / {got['step'] / MIB:.2f}")
        print(f"| {stage} | " + " | ".join(cells) + " |")


def budget_table(data_dir: str, budget_mib: float) -> None:
    """Bytes per parameter per rank from the base model, then the largest grid model under the budget."""
    base = config(data_dir)
    whole, block = parameters(base)
    print(f"\n### Largest model within {budget_mib:g} MiB of model state per rank at 4 processes\n")
    print("| ZeRO stage | bytes/param/rank (base) | largest model (layers x hidden x experts) | parameters | "
          "measured MiB/rank (+ one gathered block) |")
    print("|---|---|---|---|---|")
    sizes = {}
    for stage in (2, 3):
        per_param = held_bytes(config(data_dir, zero_stage=stage), 4)["step"] / whole
        best = None
        for layers, hidden, experts in itertools.product((2, 4, 8, 16, 32), (64, 128, 256, 512), (4, 8, 16, 32)):
            total, largest = parameters(config(data_dir, layers, hidden, experts))
            need = per_param * total + (4 * largest if stage == 3 else 0)
            if need <= budget_mib * MIB and (best is None or total > best[1]):
                best = ((layers, hidden, experts), total)
        shape, total = best
        measured = held_bytes(config(data_dir, *shape, zero_stage=stage), 4)["step"]
        gathered = f" + {4 * parameters(config(data_dir, *shape))[1] / MIB:.2f}" if stage == 3 else ""
        sizes[stage] = total
        print(f"| {stage} | {per_param:.2f} | {' x '.join(map(str, shape))} | {total / 1e6:.2f} M | "
              f"{measured / MIB:.2f}{gathered} |")
    print(f"\nZeRO-3 trains a {sizes[3] / sizes[2]:.2f}x larger model than ZeRO-2 in the same budget.")


def time_table(data_dir: str, steps: int) -> None:
    cfgs = [config(data_dir, zero_stage=stage).to_dict() for stage in (2, 3)]
    ranks = _spawn(_timed, 2, cfgs, steps)
    zero2, zero3 = (statistics.median(r[i] for r in ranks.values()) for i in range(2))
    print(f"\n### Step time at DP 2 ({steps} timed steps each, alternating, medians)\n")
    print("| ZeRO-2 step s | ZeRO-3 step s | ZeRO-3 / ZeRO-2 |")
    print("|---|---|---|")
    print(f"| {zero2:.3f} | {zero3:.3f} | {zero3 / zero2:.2f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", choices=("bytes", "budget", "time"))
    parser.add_argument("--budget-mib", type=float, default=32.0, help="model-state budget per rank")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per stage")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as data_dir:
        write_data(data_dir)
        if args.only in (None, "bytes"):
            bytes_table(data_dir)
        if args.only in (None, "budget"):
            budget_table(data_dir, args.budget_mib)
        if args.only in (None, "time"):
            time_table(data_dir, args.steps)


if __name__ == "__main__":
    main()
