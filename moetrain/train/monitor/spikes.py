"""Loss spikes that stay finite: skip the optimizer step whose loss or gradient norm stands out.

A step is a spike when its loss (or its global gradient norm) exceeds the mean + K standard deviations of
the last W applied steps' values. The decision is made on the host from the two numbers the step already
copied there (the logged losses and the clipping norm), so it adds no host synchronisation; a skipped step
leaves weights, optimizer state and the expert biases untouched, exactly like a non-finite step.

Defaults, W = 128 and K = 6 (OLMo-core's): under a Gaussian, 6 sigma is exceeded about once in 10^9 steps,
so a healthy run never skips, while a real spike (a bad batch, an attention-logit blow-up) is usually tens
of sigmas; 128 steps is enough for a stable estimate of the deviation and short enough to follow the
falling loss curve (a falling loss sits below the window's mean, so the trend never looks like a spike).
No check before the window is full: early training moves too fast for a rolling estimate.
Spikes never enter the window, so a lasting jump is skipped step after step and the trainer's
consecutive-skip count (with the non-finite guard's) stops or rewinds the run (--max-skipped-steps,
--rewind-on-divergence).
"""

from __future__ import annotations

import math
from collections import deque

WATCHED = ("loss", "grad_norm")


class SpikeDetector:
    """Rolling windows of the applied steps' loss and gradient norm; `check` says whether a step is a spike."""

    def __init__(self, window: int, sigmas: float) -> None:
        self.window, self.sigmas = window, sigmas
        self.history = {name: deque(maxlen=window) for name in WATCHED}
        self.skipped = 0  # steps skipped as spikes, over the whole run (saved in checkpoints)
        self.last_spike = ""  # what made the last spike, for the console line

    def threshold(self, name: str) -> float:
        """mean + K std of the window (population deviation); inf until the window is full."""
        values = self.history[name]
        if len(values) < self.window:
            return math.inf
        mean = math.fsum(values) / len(values)
        std = math.sqrt(math.fsum((v - mean) ** 2 for v in values) / len(values))
        return mean + self.sigmas * std

    def check(self, loss: float, grad_norm: float) -> bool:
        """Whether the step with this (finite) loss and gradient norm is a spike (counted); if not, its values
        join the windows."""
        values = {"loss": loss, "grad_norm": grad_norm}
        over = [f"{name} {values[name]:.4g} > {self.threshold(name):.4g}" for name in WATCHED
                if values[name] > self.threshold(name)]
        if over:
            self.skipped += 1
            self.last_spike = f"{', '.join(over)} (mean + {self.sigmas:g} sigma of the last {self.window} steps)"
            return True
        for name in WATCHED:
            self.history[name].append(values[name])
        return False

    def state_dict(self) -> dict:
        return {"skipped": self.skipped, **{name: list(self.history[name]) for name in WATCHED}}

    def load_state_dict(self, state: dict, *, counts: bool = True) -> None:
        """The windows from a checkpoint; `counts=False` (a rewind) keeps this run's skip count."""
        for name in WATCHED:
            self.history[name] = deque(state.get(name, []), maxlen=self.window)
        if counts:
            self.skipped = int(state.get("skipped", 0))
