"""Token dispatcher: permute tokens so each expert's rows are contiguous, and back.

One dispatcher serves capacity and dropless routing alike: the router's keep mask decides which
assignments reach an expert, nothing is padded to a capacity, and on one device nothing waits for
the host (the rows per expert stay on the device as the offsets of a grouped GEMM). With an
expert-parallel process group the permuted rows are exchanged with `all_to_all_single` (uneven
splits), regrouped by local expert, and sent back the same way after the experts ran; gradients
flow through both.

When the expert-parallel ranks all hold the same tokens (experts split over tensor-parallel ranks),
`split_tokens` makes each rank send only its 1/ep share of them and sums the shares back, so no
expert computes a token twice (DeepSpeed's drop_tokens / gather_tokens).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed._functional_collectives import all_to_all_single_autograd, wait_tensor

from moetrain.comm import copy_to_group, reduce_from_group
from moetrain.moe.experts import ExpertBlocks
from moetrain.moe.router import RoutingDecision


@dataclass
class DispatchPlan:
    """How rows moved, so `combine` can undo it.

    All S * k assignments keep a row in the sorted order, dropped ones last (sorted to a sentinel
    expert E): every shape is static and no count has to reach the host.
    """

    token_index: Tensor  # [S * k] source token of each sorted row
    row_of_assignment: Tensor  # [S * k] sorted row of each (token, choice)
    blocks: ExpertBlocks  # where the local experts' rows are in what `dispatch` returned
    weights: Tensor | None  # combine weight of each row the local experts see; None: see below
    # Expert-parallel exchange (None when ep_size == 1). The routing weights stay home (sorted
    # order, `sorted_weights`) and are applied after the return trip: one all-to-all per direction.
    send_splits: list[int] | None = None
    recv_splits: list[int] | None = None
    local_order: Tensor | None = None  # received rows -> grouped by local expert
    sorted_weights: Tensor | None = None
    padded_slot_of_row: Tensor | None = None  # padded to capacity (`pad_to_capacity`): each row's slot

    @property
    def tokens_per_expert(self) -> list[int]:
        """Rows each local expert receives (a device-to-host copy unless known already)."""
        return self.blocks.host_counts()


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
        k = decision.expert_indices.shape[1]
        experts = decision.expert_indices.flatten()
        if not decision.dropless:
            experts = experts.masked_fill(~decision.kept.flatten(), self.num_experts)
        sorted_experts, order = torch.sort(experts, stable=True)
        positions = torch.arange(order.numel(), device=x.device)
        row_of_assignment = torch.empty_like(order).scatter_(0, order, positions)
        token_index = order // k
        weights = decision.weights.flatten().index_select(0, order)
        ends = torch.searchsorted(sorted_experts, torch.arange(1, self.num_experts + 1, device=x.device),
                                  out_int32=True)
        rows = _GatherTokens.apply(x, token_index, row_of_assignment)
        blocks = ExpertBlocks(ends, sorted_experts, all_rows_used=decision.dropless)
        plan = DispatchPlan(token_index, row_of_assignment, blocks, weights)
        if self.ep_size > 1:
            rows, plan = self._exchange(rows, plan)
        if decision.pad_to_capacity is not None:  # each rank sends an expert at most its capacity
            return pad_to_capacity(rows, plan, decision.pad_to_capacity * self.ep_size)
        return rows, plan

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
        return copy_to_group(x, self.split_group), replace(
            decision, kept=decision.kept & mine, weights=weights, dropless=False)

    def _exchange(self, rows: Tensor, plan: DispatchPlan) -> tuple[Tensor, DispatchPlan]:
        """All-to-all the kept rows to the ranks that own their experts.

        One device-to-host copy brings every split size over at once; the routing weights do not
        travel (`combine` applies them on this rank). Every rank always takes part in both
        collectives, whatever it routed, so uneven or empty loads can neither deadlock nor
        mismatch shapes.
        """
        ends = plan.blocks.ends.long()
        counts = torch.diff(ends, prepend=ends.new_zeros(1))
        per_rank = counts.view(self.ep_size, self.num_local_experts)
        received_counts = torch.empty_like(per_rank)
        dist.all_to_all_single(received_counts, per_rank, group=self.ep_group)
        sent, received = torch.stack([per_rank, received_counts]).tolist()
        send_splits = [sum(row) for row in sent]
        recv_splits = [sum(row) for row in received]
        local_counts = [sum(column) for column in zip(*received)]
        rows = _all_to_all(rows[:sum(send_splits)], recv_splits, send_splits, self.ep_group)
        local_expert = torch.arange(self.num_local_experts, device=rows.device).repeat(self.ep_size)
        expert_of_row, local_order = torch.sort(local_expert.repeat_interleave(
            received_counts.flatten(), output_size=sum(recv_splits)), stable=True)
        local_ends = received_counts.sum(0).cumsum(0).to(torch.int32)
        blocks = ExpertBlocks(local_ends, expert_of_row, local_counts, all_rows_used=True)
        plan = replace(plan, blocks=blocks, weights=None, send_splits=send_splits,
                       recv_splits=recv_splits, local_order=local_order, sorted_weights=plan.weights)
        return rows.index_select(0, local_order), plan

    def combine(self, expert_rows: Tensor, plan: DispatchPlan, num_tokens: int) -> Tensor:
        """Weighted expert rows -> [S, d], summing each token's choices; dropped tokens get 0."""
        if plan.padded_slot_of_row is not None:
            expert_rows = _rows_or_zero(expert_rows, plan.padded_slot_of_row)
        if self.ep_size > 1:
            restored = torch.empty_like(expert_rows).index_copy(0, plan.local_order, expert_rows)
            returned = _all_to_all(restored, plan.send_splits, plan.recv_splits, self.ep_group)
            dropped = plan.token_index.shape[0] - returned.shape[0]
            expert_rows = torch.cat([returned, returned.new_zeros(dropped, returned.shape[1])])
            expert_rows = expert_rows * plan.sorted_weights.to(expert_rows.dtype).unsqueeze(1)
        out = _SumIntoTokens.apply(expert_rows, plan.token_index, plan.row_of_assignment, num_tokens)
        return reduce_from_group(out, self.split_group)


def pad_to_capacity(rows: Tensor, plan: DispatchPlan, capacity: int) -> tuple[Tensor, DispatchPlan]:
    """Megatron-Core's --moe-pad-expert-input-to-capacity: every local expert's block padded with zero
    rows (routing weight 0) to exactly `capacity` rows, so the expert GEMMs always see
    [experts * capacity, d], a static shape (CUDA graphs, fixed-shape kernels). Rows of no expert
    (dropped) are left out; `combine` takes each row's output back from its slot, so the padding
    reaches neither the output nor any gradient. Needs at most `capacity` rows per expert, which the
    router's capacity limit guarantees. No host sync."""
    blocks = plan.blocks
    num_experts, device = blocks.num_experts, rows.device
    ends = blocks.ends.long()
    starts = ends - torch.diff(ends, prepend=ends.new_zeros(1))
    slot = torch.arange(num_experts * capacity, device=device)
    slot_expert, place = slot // capacity, slot % capacity
    source = starts[slot_expert] + place
    source = torch.where(source < ends[slot_expert], source, rows.shape[0])  # past the block: a zero row
    row_expert = blocks.expert_of_row.clamp(max=num_experts - 1)
    row = torch.arange(rows.shape[0], device=device)
    slot_of_row = torch.where(blocks.expert_of_row < num_experts,
                              row_expert * capacity + row - starts[row_expert], num_experts * capacity)
    padded_blocks = ExpertBlocks((torch.arange(1, num_experts + 1, device=device) * capacity).to(torch.int32),
                                 slot_expert, [capacity] * num_experts, all_rows_used=True)
    weights = None if plan.weights is None else _rows_or_zero(plan.weights.unsqueeze(1), source).squeeze(1)
    return _rows_or_zero(rows, source), replace(plan, blocks=padded_blocks, weights=weights,
                                                padded_slot_of_row=slot_of_row)


def _rows_or_zero(rows: Tensor, index: Tensor) -> Tensor:
    """rows[index], where index rows.shape[0] gives a row of zeros."""
    return torch.cat([rows, rows.new_zeros(1, rows.shape[1])]).index_select(0, index)


def _all_to_all(x: Tensor, output_splits: list[int], input_splits: list[int], group: dist.ProcessGroup) -> Tensor:
    """Differentiable uneven all-to-all along dimension 0 (backward sends the gradients home)."""
    return wait_tensor(all_to_all_single_autograd(x.contiguous(), output_splits, input_splits, group))


def _sum_rows_into_tokens(rows: Tensor, row_of_assignment: Tensor, num_tokens: int) -> Tensor:
    """out[t] = sum of token t's k rows (no scatter-add): one gather per choice, added in place.

    Gathering all k rows into one [S * k, d] buffer and summing over k instead costs 2.5x the
    time at k=2 (a strided reduction over a short middle dimension) and a buffer k times the output.
    """
    k = row_of_assignment.shape[0] // num_tokens if num_tokens else 1
    choices = row_of_assignment.view(num_tokens, k)
    out = rows.index_select(0, choices[:, 0])
    for choice in range(1, choices.shape[1]):
        out += rows.index_select(0, choices[:, choice])
    return out


class _GatherTokens(torch.autograd.Function):
    """rows = x[token_index]; backward sums each token's rows (a gather)."""

    @staticmethod
    def forward(ctx, x: Tensor, token_index: Tensor, row_of_assignment: Tensor) -> Tensor:
        ctx.save_for_backward(row_of_assignment)
        ctx.num_tokens = x.shape[0]
        return x.index_select(0, token_index)

    @staticmethod
    def backward(ctx, grad_rows: Tensor):
        (row_of_assignment,) = ctx.saved_tensors
        return _sum_rows_into_tokens(grad_rows, row_of_assignment, ctx.num_tokens), None, None


class _SumIntoTokens(torch.autograd.Function):
    """out[t] = sum of token t's rows; keeps only indices for backward (a gather)."""

    @staticmethod
    def forward(ctx, rows: Tensor, token_index: Tensor, row_of_assignment: Tensor,
                num_tokens: int) -> Tensor:
        ctx.save_for_backward(token_index)
        return _sum_rows_into_tokens(rows, row_of_assignment, num_tokens)

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        (token_index,) = ctx.saved_tensors
        return grad_out.index_select(0, token_index), None, None, None
