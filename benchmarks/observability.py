"""The cost of issue 27's observability features on the default run, each as a ratio to the same run with
everything off, measured side by side.

Variants, each a Trainer of `moetrain train`'s defaults (4 layers, hidden 256, seq 256, micro batch 8,
8 experts top-1 every other layer, the built-in corpus) differing only in:

  off      --no-expert-alarms (and nothing else of the issue)
  spikes   --skip-loss-spikes (the check on the host after the step's one copy)
  alarms   the expert-health alarms (the default: routing entropy in every forward, streaks at log time)
  record   --record-routing DIR (every token's experts written each step)
  replay   --replay-routing DIR (the record just written, loaded each step and forced on the routers)
  wandb    --wandb-project (WANDB_MODE=offline: records queued to the worker thread)

A timed block is one log interval (10 steps, --log-interval 10): each step's `train_step()`, then the log
record (`_train_record`, where the alarms and the routing summaries run) written to the metrics sinks (where
W&B queues it), as `fit()` does. Blocks are interleaved, variant after variant, `--repeats` times, so all see
the same machine load; a variant's time is the median of its blocks, the ratio is over `off`'s median. The
`log ms` column is the time the W&B variant's trainer spent inside `metrics.log` per record, against `off`'s:
W&B's network and disk work runs in its worker thread.

    python benchmarks/observability.py              # 3 interleaved blocks of 10 steps per variant
    python benchmarks/observability.py --repeats 1  # a quick look
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import torch

from moetrain.config import Config
from moetrain.train.trainer import Trainer

VARIANTS = ("off", "spikes", "alarms", "record", "replay", "wandb")
LOG_INTERVAL = 10


def variant_config(name: str, workdir: str) -> Config:
    cfg = Config()
    cfg.training.save, cfg.training.device, cfg.training.progress_bar = None, "cpu", False
    cfg.training.log_interval = LOG_INTERVAL
    mc = cfg.monitor
    mc.expert_alarms = name == "alarms"
    mc.skip_loss_spikes = name == "spikes"
    if name == "spikes":
        mc.loss_spike_window = LOG_INTERVAL  # checking from the second block on
    if name == "record":
        mc.record_routing = os.path.join(workdir, "routes")
    if name == "replay":
        mc.replay_routing = os.path.join(workdir, "routes")
    if name == "wandb":
        mc.wandb_project, mc.wandb_save_dir = "moetrain-observability", os.path.join(workdir, "wandb")
    return cfg


def run_block(trainer: Trainer) -> tuple[float, float]:
    """One log interval as fit() runs it: seconds in all, and seconds inside metrics.log."""
    start = time.perf_counter()
    for _ in range(LOG_INTERVAL):
        step = trainer.train_step()
    record = trainer._train_record(step, 0.0)
    logged = time.perf_counter()
    trainer.metrics.log(record)
    end = time.perf_counter()
    return end - start, end - logged


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="interleaved blocks per variant")
    args = parser.parse_args(argv)
    os.environ.setdefault("WANDB_MODE", "offline")
    os.environ.setdefault("WANDB_SILENT", "true")
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as workdir:
        trainers = {name: Trainer(variant_config(name, workdir), quiet=True) for name in VARIANTS}
        # the replay trainer replays the steps the record trainer writes just before it, block by block
        times: dict[str, list[float]] = {name: [] for name in VARIANTS}
        log_times: dict[str, list[float]] = {name: [] for name in VARIANTS}
        for _ in range(args.repeats + 1):  # the first round warms up and is not counted
            for name in VARIANTS:
                seconds, log_seconds = run_block(trainers[name])
                times[name].append(seconds)
                log_times[name].append(log_seconds)
        for trainer in trainers.values():
            trainer.metrics.close()
        routes = os.path.join(workdir, "routes", "train")
        record_bytes = sum(os.path.getsize(os.path.join(root, f)) for root, _, files in os.walk(routes) for f in files)
        recorded_steps = len(os.listdir(routes))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, default run (fp32 CPU), "
          f"{args.repeats} interleaved blocks of {LOG_INTERVAL} steps per variant (after one warm-up block)")
    base = statistics.median(times["off"][1:])
    print("| variant | step ms (median block / 10) | ratio to off | log ms per record |")
    print("|---|---|---|---|")
    for name in VARIANTS:
        median = statistics.median(times[name][1:])
        log_ms = 1e3 * statistics.median(log_times[name][1:])
        print(f"| {name} | {1e3 * median / LOG_INTERVAL:.0f} | {median / base:.3f} | {log_ms:.2f} |")
    print(f"routing record: {record_bytes / recorded_steps / 1024:.1f} KiB per step "
          f"({recorded_steps} steps, 2 MoE layers x 2048 tokens, uint8, npz)")


if __name__ == "__main__":
    main()
