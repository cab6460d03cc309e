"""Router: gate scores -> top-k experts -> capacity (which assignments are kept) -> losses.

The default `TopKRouter` reproduces DeepSpeed-MoE 0.19's `TopKGate` (top1gating, top2gating,
topkgating in `deepspeed/moe/sharded_moe.py`) decision for decision, draws its random numbers
in the same order, but never builds the dense one-hot `[tokens, experts, capacity]` tensors:
it returns per-assignment indices, weights and a keep mask, which the dispatcher consumes.

Subclass `Router` to change scoring or selection (noise on logits, a different top-k rule)
without touching dispatch or experts.

Everything here runs in float32 whatever the autocast state (bf16 logits flip top-k choices and
quantise the z-loss), and without host synchronisation: no `.item()`, `bincount`, `nonzero` or
tensors built from Python numbers on the device, so a GPU never waits for the host and the router
compiles into one graph. Capacity positions come from a stable sort by expert, not from one-hot
`[S, k, E]` cumulative sums.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

NOISY_GATE_POLICIES = (None, "Jitter", "RSample")
SCORE_FUNCS = ("softmax", "sigmoid")
DROP_POLICIES = ("position", "probs", "random", "unordered")


@dataclass
class RoutingDecision:
    """What the router decided for S tokens and k choices each.

    `expert_indices[s, j]` is token s's j-th choice; `kept[s, j]` says whether that assignment
    survived the capacity limit; `weights[s, j]` is its combine weight (0 when dropped).
    `exp_counts` counts assignments per expert before dropping, as DeepSpeed reports it.
    """

    expert_indices: Tensor  # [S, k] int64
    weights: Tensor  # [S, k] float32, differentiable
    kept: Tensor  # [S, k] bool
    l_aux: Tensor  # scalar float32: load-balancing loss
    z_loss: Tensor  # scalar float32: router z-loss (ST-MoE), unscaled
    exp_counts: Tensor  # [E] int64
    dropless: bool = False  # known without looking: every assignment is kept


def _f32(value: float) -> float:
    """The float32 nearest to `value` (ties to even), as a Python float: float32 arithmetic on the
    host in plain Python, which torch.compile folds into constants."""
    if value == 0 or not math.isfinite(value):
        return value
    mantissa, exponent = math.frexp(value)
    return math.ldexp(round(mantissa * 2 ** 24), exponent - 24)


def _uniform(shape: torch.Size, low: float, high: float, device: torch.device) -> Tensor:
    """U[low, high) drawn as DeepSpeed draws it (torch.distributions.Uniform: one torch.rand,
    then low + rand * (high - low) in float32), so seeded runs match it; the bounds stay Python
    numbers, so nothing is copied to the device."""
    scale = _f32(_f32(high) - _f32(low))
    return torch.rand(shape, device=device).mul_(scale).add_(_f32(low))


def _gumbel(shape: torch.Size, device: torch.device) -> Tensor:
    """Standard Gumbel noise drawn as torch.distributions.Gumbel(0, 1) draws it."""
    finfo = torch.finfo(torch.float32)
    uniform = _uniform(shape, finfo.tiny, 1 - finfo.eps, device)
    return uniform.log_().neg_().log_().neg_()


def expert_capacity(num_tokens: int, num_experts: int, capacity_factor: float, k: int,
                    min_capacity: int) -> int:
    """Slots per expert: ceil(S / E * cf * k), at least min_capacity.

    Computed in float32 like DeepSpeed's `_capacity`, so the two agree at every rounding edge
    (on the host: shapes only, no tensor).
    """
    scaled = _f32(_f32(capacity_factor * k) * _f32(num_tokens / num_experts))  # exact, then rounded
    return max(math.ceil(scaled), min_capacity)


def count_per_expert(indices: Tensor, num_experts: int) -> Tensor:
    """[E] int64 occurrences of each expert in `indices` (bincount without its host sync)."""
    flat = indices.flatten()
    return torch.zeros(num_experts, dtype=torch.long, device=flat.device).index_add_(
        0, flat, torch.ones_like(flat))


def positions_within_expert(experts: Tensor, num_experts: int) -> Tensor:
    """For a 1-D sequence of expert ids: how many earlier entries chose the same expert.

    A stable sort groups each expert's entries in their original order; an entry's position is its
    place in the sorted order minus where its expert's group starts. [N] int64 tensors only.
    """
    sorted_experts, order = torch.sort(experts, stable=True)
    starts = torch.searchsorted(sorted_experts, torch.arange(num_experts, device=experts.device))
    place = torch.arange(experts.numel(), device=experts.device) - starts.index_select(0, sorted_experts)
    return torch.empty_like(place).scatter_(0, order, place)


class Router(nn.Module):
    """Base router: a bias-free linear gate computed in float32.

    Override `compute_logits`, `compute_scores` or `select_experts` to customise routing;
    capacity, weights and losses stay shared.
    """

    def __init__(
        self,
        hidden_size: int,
        num_experts: int,
        k: int = 1,
        capacity_factor: float = 1.0,
        eval_capacity_factor: float = 1.0,
        min_capacity: int = 4,
        drop_tokens: bool = True,
        drop_policy: str | None = None,
        score_func: str = "softmax",
        expert_bias: bool = False,
        expert_bias_update_rate: float = 1e-3,
    ) -> None:
        super().__init__()
        if not 1 <= k <= num_experts:
            raise ValueError(
                f"k={k} must be between 1 and num_experts={num_experts}; lower k or add experts"
            )
        for name, value in (("capacity_factor", capacity_factor),
                            ("eval_capacity_factor", eval_capacity_factor)):
            if not value > 0:
                raise ValueError(f"{name} must be positive, got {value}; use e.g. 1.0 or 1.25")
        if min_capacity < 0:
            raise ValueError(f"min_capacity must be >= 0, got {min_capacity}")
        if drop_policy not in (None, *DROP_POLICIES):
            raise ValueError(f"unknown drop_policy {drop_policy!r}; choose one of {DROP_POLICIES}")
        if score_func not in SCORE_FUNCS:
            raise ValueError(f"unknown score_func {score_func!r}; choose one of {SCORE_FUNCS}")
        self.wg = nn.Linear(hidden_size, num_experts, bias=False)
        self.num_experts = num_experts
        self.k = k
        self.capacity_factor = capacity_factor
        self.eval_capacity_factor = eval_capacity_factor
        self.min_capacity = min_capacity
        self.drop_tokens = drop_tokens
        self.drop_policy = drop_policy
        self.score_func = score_func
        self.expert_bias_update_rate = expert_bias_update_rate
        if expert_bias:
            # Aux-loss-free balancing (DeepSeek-V3): a bias that steers selection only.
            self.register_buffer("expert_bias", torch.zeros(num_experts))
            self.register_buffer("pending_load", torch.zeros(num_experts), persistent=False)
        else:
            self.expert_bias = None

    # -- the three overridable steps -------------------------------------------------------
    def compute_logits(self, x: Tensor) -> Tensor:
        """[S, d] -> [S, E] float32 logits."""
        return F.linear(x.float(), self.wg.weight.float())

    def compute_scores(self, logits: Tensor) -> Tensor:
        """Gate probabilities used for weights and the balance loss."""
        if self.score_func == "sigmoid":
            return torch.sigmoid(logits)
        return F.softmax(logits, dim=1)

    def select_experts(self, logits: Tensor, scores: Tensor) -> Tensor:
        """[S, k] expert choices, best first."""
        return torch.topk(self._selection_scores(scores), self.k, dim=1).indices

    # -- shared machinery -----------------------------------------------------------------
    def _selection_scores(self, scores: Tensor) -> Tensor:
        if self.expert_bias is None:
            return scores
        return scores + self.expert_bias

    def resolved_drop_policy(self) -> str:
        """DeepSpeed's choice when none is given: first come for k <= 2, probability for k > 2."""
        if self.drop_policy is not None:
            return self.drop_policy
        return "probs" if self.k > 2 else "position"

    def forward(self, x: Tensor) -> RoutingDecision:
        # Autocast would recast the gate GEMM (and logsumexp, softmax) to 16 bits: routing stays
        # in float32, as in DeepSpeed and Megatron-Core.
        with torch.autocast(x.device.type, enabled=False):
            return self._route(x)

    def _route(self, x: Tensor) -> RoutingDecision:
        logits = self.compute_logits(x)
        scores = self.compute_scores(logits)
        z_loss = torch.logsumexp(logits, dim=1).square().mean()
        indices = self.select_experts(logits, scores)
        num_experts = scores.shape[1]
        kept = self._apply_capacity(indices, scores)
        gate = scores.gather(1, indices) * kept
        if self.k > 1:  # DeepSpeed renormalises over the kept choices for k >= 2 only
            gate = gate / gate.sum(dim=1, keepdim=True).clamp(min=torch.finfo(gate.dtype).eps)
        exp_counts = count_per_expert(indices, num_experts)
        l_aux = self._balance_loss(scores, indices)
        if self.expert_bias is not None and self.training:
            self.pending_load += exp_counts.to(self.pending_load.dtype)
        return RoutingDecision(indices, gate, kept, l_aux, z_loss, exp_counts,
                               dropless=not self.drop_tokens)

    def _balance_loss(self, scores: Tensor, indices: Tensor) -> Tensor:
        """E * sum_e(mean gate prob * fraction routed), DeepSpeed's l_aux for each k.

        For k <= 2 only first choices count; for k > 2 all k, divided by k.
        """
        num_experts = scores.shape[1]
        if self.score_func == "sigmoid":
            scores = scores / scores.sum(dim=1, keepdim=True)
        me = scores.mean(dim=0)
        counted = indices[:, :1] if self.k <= 2 else indices
        ce = count_per_expert(counted, num_experts).float() / scores.shape[0]
        loss = torch.mean(me * ce) * num_experts * num_experts
        return loss / self.k if self.k > 2 else loss

    def _apply_capacity(self, indices: Tensor, scores: Tensor) -> Tensor:
        """[S, k] bool: which assignments fit in their expert's capacity."""
        num_tokens, num_experts = scores.shape
        if not self.drop_tokens:
            return torch.ones_like(indices, dtype=torch.bool)
        factor = self.capacity_factor if self.training else self.eval_capacity_factor
        capacity = expert_capacity(num_tokens, num_experts, factor, self.k, self.min_capacity)
        policy = self.resolved_drop_policy()
        if policy == "position":
            return self._keep_by_position(indices, num_experts, capacity)
        return self._keep_by_score(indices, scores, capacity, policy)

    @staticmethod
    def _keep_by_position(indices: Tensor, num_experts: int, capacity: int) -> Tensor:
        """First choices win: an assignment's slot counts the expert's assignments of earlier
        ranks (all tokens) and of earlier tokens in its own rank, i.e. its position in the
        rank-major order."""
        slot = positions_within_expert(indices.t().flatten(), num_experts)
        return (slot < capacity).view(indices.shape[1], -1).t()

    def _keep_by_score(self, indices: Tensor, scores: Tensor, capacity: int, policy: str) -> Tensor:
        """Each expert keeps its `capacity` best-scoring assignments (torch.topk over tokens).

        'probs' ranks by gate probability, 'random' by uniform noise (random token selection),
        'unordered' treats all as equal and keeps torch.topk's tie order, as DeepSpeed top-1
        does without RTS.
        """
        num_tokens = scores.shape[0]
        if policy == "probs":
            ranking = torch.zeros_like(scores).scatter(1, indices, scores.gather(1, indices))
        else:
            mask = torch.zeros_like(scores).scatter(1, indices, 1.0)
            ranking = mask * _uniform(mask.shape, 0.0, 1.0, mask.device) if policy == "random" else mask
        chosen = torch.topk(ranking, k=min(capacity, num_tokens), dim=0).indices
        fits = torch.zeros_like(scores, dtype=torch.bool).scatter_(0, chosen, True)
        return fits.gather(1, indices)

    @torch.no_grad()
    def update_expert_bias(self) -> None:
        """After an optimizer step: raise the bias of under-loaded experts, lower over-loaded.

        No-op unless built with expert_bias=True. The load since the last call is consumed; with
        none pending, sign(mean - load) is 0 and the bias stays (no host sync to find out).
        """
        if self.expert_bias is None:
            return
        load = self.pending_load
        self.expert_bias += self.expert_bias_update_rate * torch.sign(load.mean() - load)
        load.zero_()


class TopKRouter(Router):
    """DeepSpeed-MoE gating: top-1 with noisy gates and RTS, top-2 with second-expert sampling.

    Selection matches DeepSpeed 0.19 exactly, random draws included:
    - k=1: argmax of the probabilities, or of logits + Gumbel noise under 'RSample' (training);
    - k=2: first = argmax; second = argmax of (logits + Gumbel noise when
      top2_2nd_expert_sampling) with the first masked out; DeepSpeed samples in eval too;
    - k>2: top-k of the probabilities.
    'Jitter' multiplies the gate input by U[0.99, 1.01] in training.
    """

    def __init__(self, hidden_size: int, num_experts: int, k: int = 1, *,
                 noisy_gate_policy: str | None = None, use_rts: bool = True,
                 top2_2nd_expert_sampling: bool = True, **kwargs) -> None:
        if noisy_gate_policy == "None":
            noisy_gate_policy = None
        if noisy_gate_policy not in NOISY_GATE_POLICIES:
            raise ValueError(
                f"unknown noisy_gate_policy {noisy_gate_policy!r}; use None, 'Jitter' or 'RSample'"
            )
        super().__init__(hidden_size, num_experts, k, **kwargs)
        self.noisy_gate_policy = noisy_gate_policy
        self.use_rts = use_rts
        self.top2_2nd_expert_sampling = top2_2nd_expert_sampling

    def resolved_drop_policy(self) -> str:
        if self.drop_policy is None and self.k == 1:
            return "random" if self.use_rts else "unordered"
        return super().resolved_drop_policy()

    def _apply_capacity(self, indices: Tensor, scores: Tensor) -> Tensor:
        if not self.drop_tokens and self.k == 1 and self.use_rts:
            # DeepSpeed draws the RTS scores even when nothing is dropped; draw them too so the
            # random stream after this layer (dropout, the next layer's noise) stays in step.
            _uniform(scores.shape, 0.0, 1.0, scores.device)
        return super()._apply_capacity(indices, scores)

    def compute_logits(self, x: Tensor) -> Tensor:
        x = x.float()
        if self.noisy_gate_policy == "Jitter" and self.training:
            x = x * _uniform(x.shape, 1.0 - 1e-2, 1.0 + 1e-2, x.device)
        return F.linear(x, self.wg.weight.float())

    def select_experts(self, logits: Tensor, scores: Tensor) -> Tensor:
        if self.expert_bias is not None or self.score_func != "softmax" or self.k > 2:
            return super().select_experts(logits, scores)
        if self.k == 1:
            if self.noisy_gate_policy == "RSample" and self.training:
                return torch.argmax(logits + _gumbel(logits.shape, logits.device), dim=1, keepdim=True)
            return torch.argmax(scores, dim=1, keepdim=True)
        first = torch.argmax(scores, dim=1, keepdim=True)
        second_logits = logits.detach()
        if self.top2_2nd_expert_sampling:
            second_logits = second_logits + _gumbel(logits.shape, logits.device)
        second = torch.argmax(second_logits.scatter(1, first, -math.inf), dim=1, keepdim=True)
        return torch.cat([first, second], dim=1)
