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

Each round runs one step of every variant, one after the other, so all see the same machine load (this
machine is shared and its speed drifts by tens of percent within minutes): `train_step()`, then the log
record (`_train_record`, where the alarms and the routing summaries run) written to the metrics sinks (where
W&B queues it). Logging every step is 10x the default rate, so the logging costs are upper bounds. A
variant's time is the median of its rounds; the ratio is over `off`'s median. Whole-step ratios on a loaded
machine carry a few percent of noise, so the time spent in each feature's own host code is also timed
(`own ms`: the spike check; the alarm streaks; the routing tape's begin / route / end; metrics.log, where
W&B only queues), as a share of the step (`own %`). The alarms' routing entropy runs inside the forward
and is in the whole-step ratio only.

    python benchmarks/observability.py              # 8 rounds (after a warm-up round)
    python benchmarks/observability.py --repeats 3  # a quick look
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
        mc.loss_spike_window = 2  # checking from the third step on
    if name == "record":
        mc.record_routing = os.path.join(workdir, "routes")
    if name == "replay":
        mc.replay_routing = os.path.join(workdir, "routes")
    if name == "wandb":
        mc.wandb_project, mc.wandb_save_dir = "moetrain-observability", os.path.join(workdir, "wandb")
    return cfg


class OwnTime:
    """Seconds spent inside some methods of some objects (their calls wrapped on the instances)."""

    def __init__(self) -> None:
        self.seconds = 0.0

    def wrap(self, obj, *names: str) -> None:
        for name in names:
            method = getattr(obj, name)

            def timed(*args, method=method, **kwargs):
                start = time.perf_counter()
                try:
                    return method(*args, **kwargs)
                finally:
                    self.seconds += time.perf_counter() - start
            setattr(obj, name, timed)


def instrument(name: str, trainer: Trainer) -> OwnTime:
    own = OwnTime()
    if name == "spikes":
        own.wrap(trainer.spikes, "check")
    elif name == "alarms":
        own.wrap(trainer.health, "update", "take_warnings")
    elif name in ("record", "replay"):
        own.wrap(trainer.routing_tape, "begin", "route", "end")
    own.wrap(trainer.metrics, "log")  # every variant: off's is the baseline of W&B's
    return own


def run_step(trainer: Trainer) -> float:
    """One step as fit() runs it, logged: seconds."""
    start = time.perf_counter()
    step = trainer.train_step()
    trainer.metrics.log(trainer._train_record(step, 0.0))
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=8, help="rounds of one step per variant")
    args = parser.parse_args(argv)
    os.environ.setdefault("WANDB_MODE", "offline")
    os.environ.setdefault("WANDB_SILENT", "true")
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as workdir:
        trainers = {name: Trainer(variant_config(name, workdir), quiet=True) for name in VARIANTS}
        for name in VARIANTS:
            run_step(trainers[name])  # warm-up round, not counted; the replay trainer replays what record wrote
        owns = {name: instrument(name, trainers[name]) for name in VARIANTS}
        times: dict[str, list[float]] = {name: [] for name in VARIANTS}
        for _ in range(args.repeats):
            for name in VARIANTS:
                times[name].append(run_step(trainers[name]))
        for trainer in trainers.values():
            trainer.metrics.close()
        routes = os.path.join(workdir, "routes", "train")
        record_bytes = sum(os.path.getsize(os.path.join(root, f)) for root, _, files in os.walk(routes) for f in files)
        recorded_steps = len(os.listdir(routes))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, default run (fp32 CPU), "
          f"{args.repeats} interleaved rounds of one logged step per variant (after a warm-up round)")
    base = statistics.median(times["off"])
    print("| variant | step ms (median) | ratio to off | own ms per step | own % of step |")
    print("|---|---|---|---|---|")
    for name in VARIANTS:
        median = statistics.median(times[name])
        own_ms = 1e3 * owns[name].seconds / args.repeats
        print(f"| {name} | {1e3 * median:.0f} | {median / base:.3f} | {own_ms:.2f} | {own_ms / (1e3 * median):.2%} |")
    print(f"routing record: {record_bytes / recorded_steps / 1024:.1f} KiB per step "
          f"({recorded_steps} steps, 2 MoE layers x 2048 tokens, uint8, npz)")


if __name__ == "__main__":
    main()
