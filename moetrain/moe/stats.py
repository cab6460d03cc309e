"""Routing statistics, cheap enough to collect on every forward.

Counts accumulate as small tensors on the layer's device (no host sync per step) and are turned
into numbers only when someone asks, at log time.
"""

from __future__ import annotations

import torch
from torch import Tensor


class RoutingStats:
    """Tokens routed to / kept by each expert since the last `summary(reset=True)`."""

    def __init__(self, num_experts: int) -> None:
        self.routed = torch.zeros(num_experts, dtype=torch.long)
        self.kept = torch.zeros(num_experts, dtype=torch.long)

    @torch.no_grad()
    def record(self, exp_counts: Tensor, kept_counts: Tensor) -> None:
        if self.routed.device != exp_counts.device:
            self.routed = self.routed.to(exp_counts.device)
            self.kept = self.kept.to(exp_counts.device)
        self.routed += exp_counts
        self.kept += kept_counts

    def summary(self, reset: bool = True) -> dict:
        """tokens_per_expert (routed, before dropping), drop fraction, imbalance, experts used."""
        routed = self.routed.cpu()
        kept = self.kept.cpu()
        total = int(routed.sum())
        mean = total / len(routed) if len(routed) else 0.0
        smallest, largest = int(routed.min()), int(routed.max())
        result = {
            "tokens_per_expert": routed.tolist(),
            "drop_fraction": 1.0 - int(kept.sum()) / total if total else 0.0,
            "max_over_min": largest / smallest if smallest else float("inf"),
            "max_over_mean": largest / mean if mean else 0.0,
            "experts_used": float((routed > 0).float().mean()) if len(routed) else 0.0,
        }
        if reset:
            self.routed.zero_()
            self.kept.zero_()
        return result
