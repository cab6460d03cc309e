"""Routing statistics, cheap enough to collect on every forward.

Counts accumulate as small tensors on the layer's device (no host sync per step) and are turned
into numbers only when someone asks, at log time.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


class RoutingStats:
    """Tokens routed to / kept by each expert since the last `summary(reset=True)`."""

    def __init__(self, num_experts: int) -> None:
        self.routed = torch.zeros(num_experts, dtype=torch.long)
        self.kept = torch.zeros(num_experts, dtype=torch.long)
        self.rank_visits = torch.zeros(2, dtype=torch.long)  # tokens, and the EP ranks they visited
        self.most_rank_visits = torch.zeros(1, dtype=torch.long)  # the most ranks one token visited
        self.balance_sums = torch.zeros(0, dtype=torch.float64)  # each load-balancing type's loss, summed
        self.balance_forwards = torch.zeros(1, dtype=torch.long)  # forwards those sums hold
        self.entropy = torch.zeros(2, dtype=torch.float64)  # routing entropy summed over tokens, and the tokens

    @torch.no_grad()
    def record(self, exp_counts: Tensor, kept_counts: Tensor, ranks_visited: Tensor | None = None) -> None:
        if self.routed.device != exp_counts.device:
            self.routed = self.routed.to(exp_counts.device)
            self.kept = self.kept.to(exp_counts.device)
            self.rank_visits = self.rank_visits.to(exp_counts.device)
            self.most_rank_visits = self.most_rank_visits.to(exp_counts.device)
        self.routed += exp_counts
        self.kept += kept_counts
        if ranks_visited is not None:
            self.rank_visits[0] += (ranks_visited > 0).sum()  # padding visits none and does not count
            self.rank_visits[1] += ranks_visited.sum()
            torch.maximum(self.most_rank_visits, ranks_visited.max(), out=self.most_rank_visits)

    @torch.no_grad()
    def record_entropy(self, token_entropy: Tensor, mask: Tensor | None = None) -> None:
        """Add one forward's [S] per-token routing entropies (padding, False in `mask`, left out)."""
        if self.entropy.device != token_entropy.device:
            self.entropy = self.entropy.to(token_entropy.device)
        if mask is None:
            self.entropy[0] += token_entropy.double().sum()
            self.entropy[1] += token_entropy.numel()
        else:
            self.entropy[0] += (token_entropy.double() * mask).sum()
            self.entropy[1] += mask.sum()

    @torch.no_grad()
    def record_balance(self, losses: Tensor) -> None:
        """Add one forward's [T] load-balancing losses (one per type, in the router's order)."""
        if self.balance_sums.shape != losses.shape or self.balance_sums.device != losses.device:
            self.balance_sums = torch.zeros(losses.shape, dtype=torch.float64, device=losses.device)
            self.balance_forwards = torch.zeros(1, dtype=torch.long, device=losses.device)
        self.balance_sums += losses
        self.balance_forwards += 1

    def balance_means(self, reset: bool = True) -> Tensor:
        """[T] mean of each load-balancing loss over the forwards since the last reset (no host sync)."""
        means = self.balance_sums / self.balance_forwards.clamp(min=1)
        if reset:
            self.balance_sums.zero_()
            self.balance_forwards.zero_()
        return means

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
        tokens, visits = self.rank_visits.tolist()
        if tokens:  # expert parallel: ranks each token's experts live on
            result["ep_ranks_per_token"] = visits / tokens
            result["ep_ranks_per_token_max"] = int(self.most_rank_visits)
        entropy, entropy_tokens = self.entropy.tolist()
        if entropy_tokens and len(routed) > 1:  # mean per-token entropy as a fraction of its maximum, log(E)
            result["router_entropy"] = entropy / entropy_tokens / math.log(len(routed))
        if reset:
            self.entropy.zero_()
            self.routed.zero_()
            self.kept.zero_()
            self.rank_visits.zero_()
            self.most_rank_visits.zero_()
        return result
