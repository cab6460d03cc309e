"""Profiler traces (--profile, --profile-step-start, --profile-step-end, --profile-ranks; Megatron's flags):
torch.profiler over training steps [start, end) on the chosen ranks, a Chrome / TensorBoard trace per rank,
and a one-screen table of the top ops at the end.

The trace goes to `{--tensorboard-dir or --save}/profile/rank{r}.pt.trace.json` (chrome://tracing or Perfetto
open it; TensorBoard's profiler plugin finds it by its `.pt.trace.json` ending). CPU ops are always recorded,
CUDA kernels too when a GPU is in use: the same code on both. Outside those steps nothing is recorded or timed.
"""

from __future__ import annotations

import os

import torch
from torch.profiler import ProfilerActivity, profile

from moetrain.config import Config

TOP_OPS = 15


class StepProfiler:
    """Starts torch.profiler before step `start` and stops it after step `end - 1`, on the ranks asked for."""

    def __init__(self, cfg: Config, rank: int, device: torch.device) -> None:
        mc = cfg.monitor
        self.start, self.end = mc.profile_step_start, mc.profile_step_end
        self.enabled = mc.profile and rank in mc.profile_ranks
        directory = cfg.training.tensorboard_dir or cfg.training.save or "."
        self.path = os.path.join(directory, "profile", f"rank{rank}.pt.trace.json")
        self.activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        self.running: profile | None = None
        self.summary: str | None = None  # the top-ops table, once the profiled steps are done

    def step_started(self, iteration: int) -> None:
        if self.enabled and self.running is None and self.summary is None and self.start <= iteration < self.end:
            self.running = profile(activities=self.activities, record_shapes=False)
            self.running.__enter__()

    def step_finished(self, iteration: int) -> None:
        """After the step that began at `iteration - 1`: stop once the last profiled step is done."""
        if self.running is not None and iteration >= self.end:
            self.stop()

    def stop(self) -> None:
        """Stop (also when the run ends early), write the trace and make the summary."""
        if self.running is None:
            return
        self.running.__exit__(None, None, None)
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        self.running.export_chrome_trace(self.path)
        self.summary = top_ops_table(self.running, cuda=ProfilerActivity.CUDA in self.activities) + \
            f"\ntrace: {self.path}"
        self.running = None


def top_ops_table(prof: profile, cuda: bool) -> str:
    """The TOP_OPS ops with the most self time (on the GPU when profiled there), one line each."""
    events = prof.key_averages()
    device_time = "self_device_time_total" if hasattr(events[0], "self_device_time_total") else "self_cuda_time_total"
    key = device_time if cuda else "self_cpu_time_total"
    total = sum(getattr(event, key) for event in events) or 1.0
    top = sorted(events, key=lambda event: getattr(event, key), reverse=True)[:TOP_OPS]
    where = "GPU" if cuda else "CPU"
    lines = [f"profile: top {len(top)} ops by self {where} time",
             f"{'op':<48} {'calls':>7} {'self ms':>10} {'share':>7}"]
    lines += [f"{event.key[:48]:<48} {event.count:>7} {getattr(event, key) / 1e3:>10.2f} "
              f"{getattr(event, key) / total:>7.1%}" for event in top]
    return "\n".join(lines)
