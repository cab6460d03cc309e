"""fp16 loss scaling, DeepSpeed-compatible (autocast lives in moetrain.precision)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from moetrain.parallel.data_parallel import by_device_and_dtype


class LossScaler:
    """fp16 loss scaling with the semantics of DeepSpeed's ``DynamicLossScaler`` / static ``LossScaler``.

    Dynamic mode, as read from ``deepspeed/runtime/fp16/loss_scaler.py``:

    * Every overflowing step is skipped. On an overflow, if ``hysteresis == 1`` or the hysteresis
      counter has reached 1, the scale halves (never below ``min_scale``); otherwise the counter is
      decremented and the scale is kept. So with the default ``hysteresis=2`` the first overflow only
      spends the counter and each further one halves the scale.
    * The counter is refilled to ``hysteresis`` when the scale grows, or on every clean step when
      ``consecutive_hysteresis`` is set.
    * A clean step doubles the scale when the number of consecutive clean steps *before* it is a
      positive multiple of ``scale_window``: after ``scale_window`` clean steps, the next clean
      update doubles it.

    One deliberate difference: DeepSpeed raises when it must back off below ``min_scale``; here the
    scale stays at ``min_scale`` and steps keep being skipped (``skipped_steps`` shows it).
    Static mode keeps ``static_scale`` forever but still reports overflows so that the trainer skips
    non-finite updates instead of writing NaN into the weights.
    """

    def __init__(
        self,
        dynamic: bool = True,
        initial_scale_power: int = 16,
        scale_window: int = 1000,
        hysteresis: int = 2,
        min_scale: float = 1.0,
        static_scale: float = 1.0,
        consecutive_hysteresis: bool = False,
    ):
        if scale_window < 1 or hysteresis < 1:
            raise ValueError(f"loss scaler needs scale_window >= 1 and hysteresis >= 1; "
                             f"got scale_window={scale_window}, hysteresis={hysteresis}")
        if min_scale <= 0 or static_scale <= 0:
            raise ValueError(f"loss scales must be positive; got min_scale={min_scale}, static_scale={static_scale}")
        self.dynamic = dynamic
        self.scale_window = scale_window
        self.hysteresis = hysteresis
        self.min_scale = float(min_scale)
        self.consecutive_hysteresis = consecutive_hysteresis
        self.loss_scale = float(2**initial_scale_power) if dynamic else float(static_scale)
        self.hysteresis_left = hysteresis
        self.clean_steps = 0  # consecutive non-overflowing steps since the last overflow
        self.skipped_steps = 0

    @classmethod
    def from_config(
        cls,
        loss_scale: float,
        initial_scale_power: int = 16,
        loss_scale_window: int = 1000,
        hysteresis: int = 2,
        min_loss_scale: float = 1.0,
        consecutive_hysteresis: bool = False,
    ) -> LossScaler:
        """Build from DeepSpeed's ``fp16`` section: ``loss_scale`` 0 means dynamic, > 0 a static scale."""
        if loss_scale < 0:
            raise ValueError(f"fp16 loss_scale must be 0 (dynamic) or positive (static); got {loss_scale}")
        return cls(
            dynamic=loss_scale == 0,
            initial_scale_power=initial_scale_power,
            scale_window=loss_scale_window,
            hysteresis=hysteresis,
            min_scale=min_loss_scale,
            static_scale=loss_scale if loss_scale > 0 else 1.0,
            consecutive_hysteresis=consecutive_hysteresis,
        )

    def scale(self, loss: torch.Tensor) -> torch.Tensor:
        """Multiply the loss so small fp16 gradients do not underflow in backward."""
        return loss * self.loss_scale

    def unscale_(self, params: Iterable[torch.nn.Parameter], device: torch.device | str = "cpu") -> torch.Tensor:
        """Divide gradients by the scale in place; return whether any gradient is inf or NaN, as a 0-d float
        tensor on `device` (the collectives' device; 1.0: overflow), not copied to the host: the trainer reads
        it with the step's other values in one copy.

        One fused pass per (device, dtype) group (torch's `_amp_foreach_non_finite_check_and_unscale_`, as
        torch.amp.GradScaler does). Under torch.distributed the flag is max-reduced over all ranks, because
        expert-parallel ranks hold different gradients and must all skip the same step; a rank holding no
        gradient joins the reduction too (with a 0), or the others would wait for it forever.
        """
        grads = [p.grad for p in params if p.grad is not None]
        found = torch.zeros((), dtype=torch.float32, device=device)
        for (grad_device, _), group in by_device_and_dtype(grads).items():
            found_here = torch.zeros(1, dtype=torch.float32, device=grad_device)
            inv_scale = torch.full((1,), 1.0 / self.loss_scale, dtype=torch.float32, device=grad_device)
            torch._amp_foreach_non_finite_check_and_unscale_(group, found_here, inv_scale)
            found = torch.maximum(found, found_here.to(found.device).squeeze(0))
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(found, op=torch.distributed.ReduceOp.MAX)
        return found

    def update(self, found_overflow: bool) -> None:
        """Record the outcome of one step: count a skip and back off, or count a clean step and grow."""
        if found_overflow:
            self.skipped_steps += 1
            self.clean_steps = 0
            if not self.dynamic:
                return
            if self.hysteresis_left <= 1:
                self.loss_scale = max(self.loss_scale / 2.0, self.min_scale)
            else:
                self.hysteresis_left -= 1
            return
        if self.dynamic:
            if self.consecutive_hysteresis:
                self.hysteresis_left = self.hysteresis
            if self.clean_steps > 0 and self.clean_steps % self.scale_window == 0:
                self.hysteresis_left = self.hysteresis
                self.loss_scale *= 2.0
        self.clean_steps += 1

    def state_dict(self) -> dict[str, Any]:
        """Mutable state only; the configuration comes from the current run's config."""
        return {
            "loss_scale": self.loss_scale,
            "hysteresis_left": self.hysteresis_left,
            "clean_steps": self.clean_steps,
            "skipped_steps": self.skipped_steps,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore counters; a static scaler keeps its configured scale even if the checkpoint differs."""
        missing = {"loss_scale", "hysteresis_left", "clean_steps", "skipped_steps"} - state.keys()
        if missing:
            raise KeyError(f"loss scaler state lacks {sorted(missing)}; the checkpoint is not from LossScaler")
        if self.dynamic:
            self.loss_scale = float(state["loss_scale"])
        self.hysteresis_left = int(state["hysteresis_left"])
        self.clean_steps = int(state["clean_steps"])
        self.skipped_steps = int(state["skipped_steps"])
