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

from moetrain.moe import balance
from moetrain.moe.routing_config import DEEPSPEED_LOSS, RoutingConfig
from moetrain.moe.routing_hook import RoutingHook
from moetrain.moe.routing_noise import GUMBEL, JITTER, RTS, TORCH_NOISE, RoutingNoise
from moetrain.moe.routing_noise import f32 as _f32


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
    balance_losses: dict[str, Tensor] | None = None  # each load-balancing type's unweighted loss
    pad_to_capacity: int | None = None  # --moe-pad-expert-input-to-capacity: rows every expert block is padded to
    token_entropy: Tensor | None = None  # [S] entropy (nats) of each token's routing probabilities, detached


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
    """Base router: a bias-free linear gate computed in float32, configured by one `RoutingConfig`.

    Override `compute_logits`, `compute_scores` or `select_experts` to customise routing (read the options
    from `self.routing`); capacity, weights and losses stay shared.
    """

    def __init__(self, hidden_size: int, num_experts: int, routing: RoutingConfig | None = None) -> None:
        super().__init__()
        routing = routing if routing is not None else RoutingConfig()
        routing.check_experts(num_experts)
        self.routing = routing
        self.num_experts = num_experts
        self.wg = nn.Linear(hidden_size, num_experts, bias=False)
        self.balance_group: torch.distributed.ProcessGroup | None = None  # data parallel, for global_aux_loss
        self.accumulate_global_batch = False  # global_aux_loss counts over micro-batches (start_global_batch)
        if "global_aux_loss" in routing.load_balancing_type:  # a buffer: a recomputed forward puts it back
            self.register_buffer("global_counts", torch.zeros(num_experts + 1, dtype=torch.long), persistent=False)
        if routing.expert_bias:
            # Aux-loss-free balancing (DeepSeek-V3): a bias that steers selection only.
            self.register_buffer("expert_bias", torch.zeros(num_experts))
            self.register_buffer("pending_load", torch.zeros(num_experts), persistent=False)
        else:
            self.expert_bias = None
        self._token_mask: Tensor | None = None  # set for the duration of a masked forward
        self._noise: RoutingNoise = TORCH_NOISE  # where this forward's random draws come from
        self.hook: RoutingHook | None = None  # sees (records) or replaces (replays) each keyed forward's choices

    # -- the three overridable steps -------------------------------------------------------
    def compute_logits(self, x: Tensor) -> Tensor:
        """[S, d] -> [S, E] logits in the router dtype (float32 unless fp64 is asked for); in
        training the input is first scaled by U[1 - eps, 1 + eps] with --moe-input-jitter-eps."""
        dtype, eps = self.routing.dtype, self.input_jitter_eps()
        x = x.to(dtype)
        if eps and self.training:
            x = x * self._noise.uniform(x.shape, 1.0 - eps, 1.0 + eps, x.device, JITTER).to(x.dtype)
        return F.linear(x, self.wg.weight.to(dtype))

    def input_jitter_eps(self) -> float | None:
        """Half-width of the training input jitter (--moe-input-jitter-eps), None for none."""
        return self.routing.input_jitter_eps

    def compute_scores(self, logits: Tensor) -> Tensor:
        """Gate probabilities used for weights and the balance loss."""
        if self.routing.score_func == "sigmoid" or self.routing.sinkhorn:
            return torch.sigmoid(logits)  # Megatron weighs sinkhorn's top-1 choice by sigmoid(logit)
        return F.softmax(logits, dim=1)

    def select_experts(self, logits: Tensor, scores: Tensor) -> Tensor:
        """[S, k] expert choices, best first (within the best groups under group-limited routing)."""
        k = self.routing.k
        if self.routing.sinkhorn and self.training:
            balanced = balance.sinkhorn(logits.detach(), self._token_mask)
            return torch.topk(balanced, k, dim=1).indices
        selection = self._selection_scores(scores)
        if self.routing.num_groups:
            selection = self._outside_groups_masked(selection)
        return torch.topk(selection, k, dim=1).indices

    # -- shared machinery -----------------------------------------------------------------
    def _selection_scores(self, scores: Tensor) -> Tensor:
        if self.expert_bias is None:
            return scores
        return scores + self.expert_bias

    def _outside_groups_masked(self, selection: Tensor) -> Tensor:
        """Group-limited routing (DeepSeek-V3): experts outside each token's `group_topk` best
        groups get -inf. A group scores the sum of its top-2 for sigmoid scores (DeepSeek-V3),
        its best score for softmax (DeepSeek-V2)."""
        num_tokens, num_experts = selection.shape
        grouped = selection.view(num_tokens, self.routing.num_groups, -1)
        if self.routing.score_func == "sigmoid":
            group_scores = grouped.topk(min(2, grouped.shape[2]), dim=2).values.sum(2)
        else:
            group_scores = grouped.amax(2)
        best = group_scores.topk(self.routing.group_topk, dim=1).indices
        chosen = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, best, True)
        return selection.masked_fill(~chosen.unsqueeze(2).expand_as(grouped).reshape(num_tokens, num_experts),
                                     -math.inf)

    @property
    def current_capacity_factor(self) -> float:
        """The capacity factor of the current mode (training or evaluation)."""
        return self.routing.capacity_factor if self.training else self.routing.eval_capacity_factor

    def capacity(self, num_tokens: int) -> int:
        """Slots per expert for `num_tokens` tokens in the current mode (training or evaluation)."""
        return expert_capacity(num_tokens, self.num_experts, self.current_capacity_factor, self.routing.k,
                               self.routing.min_capacity)

    def resolved_drop_policy(self) -> str:
        """DeepSpeed's choice when none is given: first come for k <= 2, probability for k > 2."""
        if self.routing.drop_policy is not None:
            return self.routing.drop_policy
        return "probs" if self.routing.k > 2 else "position"

    def forward(self, x: Tensor, batch_shape: tuple[int, int] | None = None,
                token_mask: Tensor | None = None, noise: RoutingNoise = TORCH_NOISE) -> RoutingDecision:
        """Route the [S, d] tokens `x`; `batch_shape` (B, T) with B * T = S gives the sequence
        boundaries seq_aux_loss needs. `token_mask` ([S] bool, False for padding) keeps padding
        out of the statistics, losses, capacity and expert-bias counts: its assignments are
        dropped, and the rest is routed as if the padded rows were not there. `noise` gives the random
        draws (moetrain.moe.routing_noise: torch's RNG, or keyed by token position in training)."""
        # Autocast would recast the gate GEMM (and logsumexp, softmax) to 16 bits: routing stays
        # in float32 (or float64), as in DeepSpeed and Megatron-Core.
        with torch.autocast(x.device.type, enabled=False):
            return self._route(x, batch_shape, token_mask, noise)

    def _route(self, x: Tensor, batch_shape: tuple[int, int] | None = None,
               token_mask: Tensor | None = None, noise: RoutingNoise = TORCH_NOISE) -> RoutingDecision:
        self._token_mask = token_mask  # read by the capacity and Sinkhorn steps of this forward
        self._noise = noise  # read by every random draw of this forward
        try:
            logits = self.compute_logits(x)
            scores = self.compute_scores(logits)
            indices = self.select_experts(logits, scores)
            if self.hook is not None and noise.keyed:
                indices = self.hook.route(noise.layer, noise.first_position(), indices, self.training)
            kept = self._apply_capacity(indices, scores)
        finally:
            self._token_mask, self._noise = None, TORCH_NOISE
        num_experts = scores.shape[1]
        log_partition = torch.logsumexp(logits, dim=1).square()
        if token_mask is None:
            z_loss = log_partition.mean()
            exp_counts = count_per_expert(indices, num_experts)
        else:
            z_loss = (log_partition * token_mask).sum() / token_mask.sum().clamp(min=1)
            kept = kept & token_mask.unsqueeze(1)
            exp_counts = torch.zeros(num_experts, dtype=torch.long, device=indices.device).index_add_(
                0, indices.flatten(), token_mask.unsqueeze(1).expand_as(indices).flatten().long())
        routing = self.routing
        gate = scores.gather(1, indices) * kept
        if routing.k > 1 and not routing.pre_softmax:  # DeepSpeed renormalises over the kept choices
            gate = gate / gate.sum(dim=1, keepdim=True).clamp(min=torch.finfo(gate.dtype).eps)
        if routing.topk_scaling_factor is not None:
            gate = gate * routing.topk_scaling_factor
        losses = self._balance_losses(scores, indices, batch_shape, token_mask)
        l_aux = sum((coeff * losses[name] for name, coeff in zip(routing.load_balancing_type,
                                                                 routing.load_balancing_coeffs)),
                    start=scores.new_zeros(()))
        if self.expert_bias is not None and self.training:
            self.pending_load += exp_counts.to(self.pending_load.dtype)
        if routing.dtype == torch.float64:  # the losses join the float32 loss as the default's do
            l_aux, z_loss = l_aux.float(), z_loss.float()
        return RoutingDecision(indices, gate, kept, l_aux, z_loss, exp_counts,
                               dropless=not routing.drop_tokens and token_mask is None, balance_losses=losses,
                               pad_to_capacity=self.capacity(x.shape[0]) if routing.pad_expert_input_to_capacity
                               else None, token_entropy=self._token_entropy(scores))

    @torch.no_grad()
    def _token_entropy(self, scores: Tensor) -> Tensor:
        """[S] entropy of each token's probabilities over the experts (sigmoid scores normalised): near 0
        when the router is sure of one expert, log(E) when it cannot tell them apart."""
        probs = self._balance_probs(scores)
        return -(probs * probs.clamp(min=torch.finfo(probs.dtype).tiny).log()).sum(dim=1)

    def _balance_probs(self, scores: Tensor) -> Tensor:
        """Probabilities over all experts for the balance losses (sigmoid scores normalised)."""
        if self.routing.score_func == "sigmoid":
            return scores / (scores.sum(dim=1, keepdim=True) + 1e-20)
        return scores

    def _balance_losses(self, scores: Tensor, indices: Tensor, batch_shape: tuple[int, int] | None,
                        mask: Tensor | None = None) -> dict[str, Tensor]:
        """Each configured load-balancing type's unweighted loss ('deepspeed' for the default)."""
        losses = {}
        for name in self.routing.load_balancing_type:
            if name == DEEPSPEED_LOSS:
                losses[name] = self._deepspeed_balance_loss(scores, indices, mask)
            elif name == "aux_loss":
                losses[name] = balance.switch_loss(self._balance_probs(scores), indices, mask)
            elif name == "seq_aux_loss":
                if batch_shape is None:
                    raise ValueError("seq_aux_loss needs the sequence boundaries: call the router with "
                                     "batch_shape=(B, T), as MoE does for [B, T, d] input")
                losses[name] = balance.sequence_loss(self._balance_probs(scores), indices, batch_shape, mask)
            elif name == "global_aux_loss":
                running = self.global_counts if self.accumulate_global_batch and self.training \
                    and torch.is_grad_enabled() else None
                losses[name] = balance.global_loss(self._balance_probs(scores), indices, self.balance_group, mask,
                                                   running)
            else:  # sinkhorn balances by its selection, none not at all
                losses[name] = scores.new_zeros(())
        return losses

    def _deepspeed_balance_loss(self, scores: Tensor, indices: Tensor, mask: Tensor | None = None) -> Tensor:
        """E * sum_e(mean gate prob * fraction routed), DeepSpeed's l_aux for each k.

        For k <= 2 only first choices count; for k > 2 all k, divided by k.
        """
        num_experts, k = scores.shape[1], self.routing.k
        if self.routing.score_func == "sigmoid":
            scores = scores / scores.sum(dim=1, keepdim=True)
        counted = indices[:, :1] if k <= 2 else indices
        if mask is None:
            me = scores.mean(dim=0)
            ce = count_per_expert(counted, num_experts).float() / scores.shape[0]
            loss = torch.mean(me * ce) * num_experts * num_experts
        else:  # the same sums over the tokens that count: Megatron's form with DeepSpeed's counting
            loss = balance.switch_loss(scores, counted, mask) * counted.shape[1]
        return loss / k if k > 2 else loss

    def _apply_capacity(self, indices: Tensor, scores: Tensor) -> Tensor:
        """[S, k] bool: which assignments fit in their expert's capacity.

        With a token mask, padding takes no slot and the capacity is that of the real tokens,
        computed on the device (a tensor, so no host sync)."""
        num_tokens, num_experts = scores.shape
        routing = self.routing
        if not routing.drop_tokens:
            return torch.ones_like(indices, dtype=torch.bool)
        capacity = self.capacity(num_tokens)
        mask = self._token_mask
        real_capacity = None
        if mask is not None:
            real_tokens = mask.sum().float()
            real_capacity = torch.ceil((real_tokens / num_experts) * _f32(self.current_capacity_factor * routing.k)
                                       ).clamp(min=routing.min_capacity)
        policy = self.resolved_drop_policy()
        if policy == "position":
            if mask is None:
                return self._keep_by_position(indices, num_experts, capacity)
            padded = indices.masked_fill(~mask.unsqueeze(1), num_experts)  # padding queues apart
            return self._keep_by_position(padded, num_experts + 1, real_capacity) & mask.unsqueeze(1)
        return self._keep_by_score(indices, scores, capacity, policy, real_capacity)

    @staticmethod
    def _keep_by_position(indices: Tensor, num_experts: int, capacity: int | Tensor) -> Tensor:
        """First choices win: an assignment's slot counts the expert's assignments of earlier
        ranks (all tokens) and of earlier tokens in its own rank, i.e. its position in the
        rank-major order."""
        slot = positions_within_expert(indices.t().flatten(), num_experts)
        return (slot < capacity).view(indices.shape[1], -1).t()

    def _keep_by_score(self, indices: Tensor, scores: Tensor, capacity: int, policy: str,
                       real_capacity: Tensor | None = None) -> Tensor:
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
            ranking = mask * self._noise.uniform(mask.shape, 0.0, 1.0, mask.device, RTS) if policy == "random" else mask
        mask = self._token_mask
        if mask is None:
            chosen = torch.topk(ranking, k=min(capacity, num_tokens), dim=0).indices
            fits = torch.zeros_like(scores, dtype=torch.bool).scatter_(0, chosen, True)
            return fits.gather(1, indices)
        # padding ranks below every real assignment; each expert keeps its best real_capacity
        ranking = ranking.masked_fill(~mask.unsqueeze(1), -1.0)
        chosen = torch.topk(ranking, k=min(capacity, num_tokens), dim=0).indices
        place = torch.arange(chosen.shape[0], device=chosen.device).unsqueeze(1).expand_as(chosen)
        fits = torch.zeros_like(scores, dtype=torch.bool).scatter_(0, chosen, place < real_capacity)
        return fits.gather(1, indices) & mask.unsqueeze(1)

    @torch.no_grad()
    def start_global_batch(self) -> None:
        """Open an optimizer step's global batch: from now on global_aux_loss counts the assignments of
        every training micro-batch until the next call (the trainer calls it before each step's first
        micro-batch, as Megatron-Core resets its tracker once per step). Never called: each forward is
        a global batch of its own. No-op without global_aux_loss."""
        if "global_aux_loss" in self.routing.load_balancing_type:
            self.global_counts.zero_()
            self.accumulate_global_batch = True

    @torch.no_grad()
    def update_expert_bias(self) -> None:
        """After an optimizer step: raise the bias of under-loaded experts, lower over-loaded.

        No-op unless built with expert_bias=True. The load since the last call is consumed; with
        none pending, sign(mean - load) is 0 and the bias stays (no host sync to find out).
        """
        if self.expert_bias is None:
            return
        load = self.pending_load
        self.expert_bias += self.routing.expert_bias_update_rate * torch.sign(load.mean() - load)
        load.zero_()


class TopKRouter(Router):
    """DeepSpeed-MoE gating: top-1 with noisy gates and RTS, top-2 with second-expert sampling.

    Selection matches DeepSpeed 0.19 exactly, random draws included (those from torch's RNG, when the
    layer gets no routing key; moetrain.moe.routing_noise):
    - k=1: argmax of the probabilities, or of logits + Gumbel noise under 'RSample' (training);
    - k=2: first = argmax; second = argmax of (logits + Gumbel noise when
      top2_2nd_expert_sampling) with the first masked out; DeepSpeed samples in eval too;
    - k>2: top-k of the probabilities.
    'Jitter' multiplies the gate input by U[0.99, 1.01] in training.
    """

    def input_jitter_eps(self) -> float | None:
        """DeepSpeed's 'Jitter' policy is multiplicative jitter of eps 1e-2, unless an eps is given."""
        if self.routing.noisy_gate_policy == "Jitter":
            return self.routing.input_jitter_eps or 1e-2
        return self.routing.input_jitter_eps

    def resolved_drop_policy(self) -> str:
        if self.routing.drop_policy is None and self.routing.k == 1:
            return "random" if self.routing.use_rts else "unordered"
        return super().resolved_drop_policy()

    def _apply_capacity(self, indices: Tensor, scores: Tensor) -> Tensor:
        routing = self.routing
        if not routing.drop_tokens and routing.k == 1 and routing.use_rts and not self._noise.keyed:
            # DeepSpeed draws the RTS scores even when nothing is dropped; draw them too so the
            # random stream after this layer (dropout, the next layer's noise) stays in step.
            self._noise.uniform(scores.shape, 0.0, 1.0, scores.device, RTS)
        return super()._apply_capacity(indices, scores)

    def select_experts(self, logits: Tensor, scores: Tensor) -> Tensor:
        routing = self.routing
        if (self.expert_bias is not None or routing.score_func != "softmax" or routing.k > 2 or routing.num_groups
                or routing.sinkhorn):
            return super().select_experts(logits, scores)
        if routing.k == 1:
            if routing.noisy_gate_policy == "RSample" and self.training:
                return torch.argmax(logits + self._noise.gumbel(logits.shape, logits.device, GUMBEL), dim=1,
                                    keepdim=True)
            return torch.argmax(scores, dim=1, keepdim=True)
        first = torch.argmax(scores, dim=1, keepdim=True)
        second_logits = logits.detach()
        if routing.top2_2nd_expert_sampling:
            second_logits = second_logits + self._noise.gumbel(logits.shape, logits.device, GUMBEL)
        second = torch.argmax(second_logits.scatter(1, first, -math.inf), dim=1, keepdim=True)
        return torch.cat([first, second], dim=1)
