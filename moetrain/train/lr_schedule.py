"""Learning-rate schedule: linear warmup, then cosine / linear decay to min_lr, or constant."""

from __future__ import annotations

import math

import torch

from moetrain.config import LR_DECAY_STYLES


class LRSchedule:
    """Megatron's warmup + decay schedule, as a pure function of the optimizer step.

    ``step`` is the 0-based count of optimizer steps already taken, so ``lr_at(step)`` is the LR of
    update number ``step + 1``; this equals Megatron's ``get_lr`` after its ``num_steps`` increment.
    Hence update 1 uses ``max_lr / warmup_iters`` (no wasted zero-LR step), update ``warmup_iters``
    uses ``max_lr``, update ``decay_iters`` uses ``min_lr``, and every later update keeps ``min_lr``.
    The "constant" style keeps ``max_lr`` after warmup and ignores ``min_lr`` and ``decay_iters``.
    Being stateless, resuming from a checkpoint only needs the restored step.
    """

    def __init__(self, max_lr: float, min_lr: float, warmup_iters: int, decay_iters: int, style: str = "cosine"):
        if style not in LR_DECAY_STYLES:
            raise ValueError(f"unknown LR decay style {style!r}; use one of {', '.join(LR_DECAY_STYLES)}")
        if min(max_lr, min_lr) < 0 or min(warmup_iters, decay_iters) < 0:
            raise ValueError(f"LR schedule values must be non-negative; got max_lr={max_lr}, min_lr={min_lr}, "
                             f"warmup_iters={warmup_iters}, decay_iters={decay_iters}")
        if style != "constant" and min_lr > max_lr:
            raise ValueError(f"min_lr={min_lr} is above max_lr={max_lr}; lower min_lr")
        if style != "constant" and decay_iters <= warmup_iters:
            raise ValueError(f"decay_iters={decay_iters} must exceed warmup_iters={warmup_iters} "
                             f"for {style} decay; raise decay_iters or use style 'constant'")
        self.max_lr = max_lr
        self.min_lr = min_lr
        self.warmup_iters = warmup_iters
        self.decay_iters = decay_iters
        self.style = style

    def lr_at(self, step: int) -> float:
        """LR for the update that follows ``step`` completed optimizer steps."""
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        update = step + 1
        if update <= self.warmup_iters:
            return self.max_lr * update / self.warmup_iters
        if self.style == "constant":
            return self.max_lr
        if update >= self.decay_iters:
            return self.min_lr
        decay_ratio = (update - self.warmup_iters) / (self.decay_iters - self.warmup_iters)
        if self.style == "linear":
            coeff = 1.0 - decay_ratio
        else:
            coeff = 0.5 * (1.0 + math.cos(math.pi * decay_ratio))
        return self.min_lr + coeff * (self.max_lr - self.min_lr)

    def apply(self, optimizer: torch.optim.Optimizer, step: int) -> float:
        """Set every param group's LR for the coming update and return it."""
        lr = self.lr_at(step)
        for group in optimizer.param_groups:
            group["lr"] = lr
        return lr
