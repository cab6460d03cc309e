"""Token dispatcher: permute tokens so each expert's rows are contiguous, and back.

One dispatcher serves capacity and dropless routing alike: the router's keep mask decides which
assignments travel, nothing here is padded to a capacity. With an expert-parallel process group
the permuted rows are exchanged with `all_to_all_single` (uneven splits), regrouped by local
expert, and sent back the same way after the experts ran; gradients flow through both.

When the expert-parallel ranks all hold the same tokens (experts split over tensor-parallel
ranks), `split_tokens` makes each rank send only its 1/ep share of them and sums the shares
back, so no expert computes a token twice (DeepSpeed's drop_tokens / gather_tokens).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed._functional_collectives import all_to_all_single_autograd, wait_tensor

from moetrain.comm import copy_to_group, reduce_from_group
from moetrain.moe.router import RoutingDecision


@dataclass
class DispatchPlan:
    """How rows moved, so `combine` can undo it."""

    token_index: Tensor  # [N] source token of each dispatched row, grouped by global expert
    row_of_assignment: Tensor | None  # [S * k] row of each (token, choice); None when some dropped
    tokens_per_expert: list[int]  # rows each expert on this rank receives
    weights: Tensor  # combine weight of each row the local experts see (aligned with their input)
    # Expert-parallel exchange (None when ep_size == 1):
    send_splits: list[int] | None = None
    recv_splits: list[int] | None = None
    local_order: Tensor | None = None  # received rows -> grouped by local expert


class TokenDispatcher:
    """Moves routed tokens to their experts (locally, or across an expert-parallel group)."""

    def __init__(self, num_experts: int, ep_group: dist.ProcessGroup | None = None,
                 split_tokens: bool = False) -> None:
        self.num_experts = num_experts
        self.ep_group = ep_group
        self.ep_size = dist.get_world_size(ep_group) if ep_group is not None else 1
        self.split_group = ep_group if split_tokens and self.ep_size > 1 else None
        if num_experts % self.ep_size:
            raise ValueError(
                f"num_experts={num_experts} is not divisible by the expert-parallel size "
                f"{self.ep_size}; use a multiple of {self.ep_size} experts"
            )
        self.num_local_experts = num_experts // self.ep_size

    def dispatch(self, x: Tensor, decision: RoutingDecision) -> tuple[Tensor, DispatchPlan]:
        """[S, d] tokens -> rows for the local experts, grouped by expert, and the plan to undo."""
        if self.split_group is not None:
            x, decision = self._my_share(x, decision)
        indices, kept = decision.expert_indices, decision.kept
        k = indices.shape[1]
        experts = indices.flatten()
        assignments = torch.arange(experts.numel(), device=x.device)
        dropless = bool(kept.all())
        if not dropless:
            assignments = kept.flatten().nonzero().squeeze(1)
            experts = experts.index_select(0, assignments)
        experts, order = torch.sort(experts, stable=True)
        assignments = assignments.index_select(0, order)
        row_of_assignment = None
        if dropless:  # every token has k rows: both directions become gathers, no scatter-add
            row_of_assignment = torch.empty_like(order)
            row_of_assignment[order] = torch.arange(order.numel(), device=x.device)
        token_index = assignments // k
        weights = decision.weights.flatten().index_select(0, assignments)
        counts = torch.bincount(experts, minlength=self.num_experts)
        rows = _GatherTokens.apply(x, token_index, row_of_assignment)
        plan = DispatchPlan(token_index, row_of_assignment, counts.tolist(), weights)
        if self.ep_size == 1:
            return rows, plan
        return self._exchange(rows, plan, counts)

    def _my_share(self, x: Tensor, decision: RoutingDecision) -> tuple[Tensor, RoutingDecision]:
        """Keep the assignments of this rank's contiguous 1/ep of the (replicated) tokens.

        The other ranks' tokens count as not kept here; their gradients arrive through the sum
        in `copy_to_group`, so x and the routing weights get the full gradient on every rank.
        """
        rank, tokens = dist.get_rank(self.split_group), x.shape[0]
        first, stop = rank * tokens // self.ep_size, (rank + 1) * tokens // self.ep_size
        mine = torch.zeros(tokens, 1, dtype=torch.bool, device=x.device)
        mine[first:stop] = True
        weights = copy_to_group(decision.weights, self.split_group)
        return copy_to_group(x, self.split_group), replace(decision, kept=decision.kept & mine, weights=weights)

    def _exchange(self, rows: Tensor, plan: DispatchPlan,
                  counts: Tensor) -> tuple[Tensor, DispatchPlan]:
        """All-to-all the rows to the ranks that own their experts.

        Every rank always takes part in both collectives, whatever it routed, so uneven or empty
        loads can neither deadlock nor mismatch shapes.
        """
        per_rank = counts.view(self.ep_size, self.num_local_experts)
        received_counts = torch.empty_like(per_rank)
        dist.all_to_all_single(received_counts, per_rank, group=self.ep_group)
        send_splits = per_rank.sum(1).tolist()
        recv_splits = received_counts.sum(1).tolist()
        rows = _all_to_all(rows, recv_splits, send_splits, self.ep_group)
        weights = _all_to_all(plan.weights, recv_splits, send_splits, self.ep_group)
        local_expert = torch.arange(self.num_local_experts, device=rows.device).repeat(self.ep_size)
        local_order = torch.sort(
            local_expert.repeat_interleave(received_counts.flatten()), stable=True
        ).indices
        plan = DispatchPlan(plan.token_index, plan.row_of_assignment, received_counts.sum(0).tolist(),
                            weights[local_order], send_splits, recv_splits, local_order)
        return rows[local_order], plan

    def combine(self, expert_rows: Tensor, plan: DispatchPlan, num_tokens: int) -> Tensor:
        """Weighted expert rows -> [S, d], summing each token's choices; dropped tokens get 0."""
        if self.ep_size > 1:
            restored = torch.empty_like(expert_rows)
            restored[plan.local_order] = expert_rows
            expert_rows = _all_to_all(restored, plan.send_splits, plan.recv_splits, self.ep_group)
        out = _SumIntoTokens.apply(expert_rows, plan.token_index, plan.row_of_assignment, num_tokens)
        return reduce_from_group(out, self.split_group)


def _all_to_all(x: Tensor, output_splits: list[int], input_splits: list[int], group: dist.ProcessGroup) -> Tensor:
    """Differentiable uneven all-to-all along dimension 0 (backward sends the gradients home)."""
    return wait_tensor(all_to_all_single_autograd(x.contiguous(), output_splits, input_splits, group))


def _sum_rows_into_tokens(rows: Tensor, token_index: Tensor, row_of_assignment: Tensor | None,
                          num_tokens: int) -> Tensor:
    """out[t] = sum of the rows that belong to token t."""
    if row_of_assignment is None:
        return rows.new_zeros(num_tokens, rows.shape[1]).index_add_(0, token_index, rows)
    gathered = rows.index_select(0, row_of_assignment)
    if gathered.shape[0] == num_tokens:
        return gathered
    return gathered.view(num_tokens, -1, rows.shape[1]).sum(1)


class _GatherTokens(torch.autograd.Function):
    """rows = x[token_index]; backward sums each token's rows (a gather when nothing dropped)."""

    @staticmethod
    def forward(ctx, x: Tensor, token_index: Tensor, row_of_assignment: Tensor | None) -> Tensor:
        ctx.save_for_backward(token_index, row_of_assignment)
        ctx.num_tokens = x.shape[0]
        return x.index_select(0, token_index)

    @staticmethod
    def backward(ctx, grad_rows: Tensor):
        token_index, row_of_assignment = ctx.saved_tensors
        grad_x = _sum_rows_into_tokens(grad_rows, token_index, row_of_assignment, ctx.num_tokens)
        return grad_x, None, None


class _SumIntoTokens(torch.autograd.Function):
    """out[t] = sum of token t's rows; keeps only indices for backward (a gather)."""

    @staticmethod
    def forward(ctx, rows: Tensor, token_index: Tensor, row_of_assignment: Tensor | None,
                num_tokens: int) -> Tensor:
        ctx.save_for_backward(token_index)
        return _sum_rows_into_tokens(rows, token_index, row_of_assignment, num_tokens)

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        (token_index,) = ctx.saved_tensors
        return grad_out.index_select(0, token_index), None, None, None
