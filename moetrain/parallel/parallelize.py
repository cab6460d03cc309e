"""Apply parallelism to a GPT built on the meta device (or whole) on every rank, then materialise this
rank's pieces: keyed initialisation (GPT.materialize) gives them the single-process run's values.

Order: pipeline split (keep this stage's blocks), tensor parallel (split attention and dense MLPs),
expert parallel (keep this rank's experts), ZeRO-3 (FSDP2 shards over data parallel), materialisation on
the device. The model declares what can
be split and how (GPT.tp_plan, GPT.tied_parameters, GPT.pipeline_stage, MoE.shard_experts, which checks
that the experts divide); this package decides the layout, owns the process groups and applies the plan.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from moetrain.model import GPT
from moetrain.parallel.data_parallel import GradSpec
from moetrain.parallel.fsdp import ShardingOptions, fully_shard_model
from moetrain.parallel.mesh import ParallelState
from moetrain.parallel.pieces import model_pieces
from moetrain.parallel.tensor_parallel import (
    ColumnParallelLinear,
    RowParallelLinear,
    apply_tensor_parallel,
)


def parallelize(model: GPT, state: ParallelState, device: torch.device | None = None,
                fully_sharded: ShardingOptions | None = None) -> dict[nn.Parameter, GradSpec]:
    """Shard `model` in place for this rank; a model on the meta device is then materialised on `device`
    (only this rank's pieces are ever allocated). `fully_sharded`: ZeRO-3 over data parallel (several
    processes only). Return how each parameter's gradient is reduced."""
    if state.tp > 1:
        apply_tensor_parallel(model, state.tp_group)
    for _, moe in model.moe_layers():
        moe.router.balance_group = state.dp_group if state.dp > 1 else None  # for global_aux_loss
        groups = state.experts(moe.num_experts)
        if groups.size > 1:
            moe.shard_experts(groups.rank, groups.ep_group, groups.split_tokens)
    if fully_sharded is not None and state.distributed:
        fully_shard_model(model, state, fully_sharded)
    if device is not None:  # only this rank's pieces are allocated, with their initial values
        model.materialize(device, model_pieces(model))
    return gradient_specs(model, state)


def gradient_specs(model: GPT, state: ParallelState) -> dict[nn.Parameter, GradSpec]:
    """Dense parameters reduce over data parallel; experts over the ranks holding the same experts."""
    tp_sharded = set()
    for module in model.modules():
        if isinstance(module, ColumnParallelLinear):
            tp_sharded.update(p for p in (module.weight, module.bias) if p is not None)
        elif isinstance(module, RowParallelLinear):
            tp_sharded.add(module.weight)
    expert_specs: dict[nn.Parameter, GradSpec] = {}
    for _, moe in model.moe_layers():
        groups = state.experts(moe.num_experts)
        replicas = state.tp // groups.size if groups.split_tokens else state.tp
        spec = GradSpec(groups.reduce_group, groups.reduce_size, groups.reduce_size * replicas, state.dp)
        for param in moe.experts.parameters():
            expert_specs[param] = spec
    sharded = GradSpec(state.dp_group, state.dp, state.dp, state.dp)
    replicated = GradSpec(state.dp_group, state.dp, state.dp * state.tp, state.dp)
    # in model order: ZeRO hands out contiguous runs, and backward finishes them in reverse
    return {p: expert_specs.get(p) or (sharded if p in tp_sharded else replicated)
            for p in model.parameters() if p.requires_grad}


@torch.no_grad()
def sync_expert_load(model: GPT, state: ParallelState) -> None:
    """Sum the load each router observed this step over data parallel, before the bias update.

    Every data-parallel rank routed different tokens over all of a layer's experts, so the sum is
    the step's whole load, the same as one process would have seen.
    """
    if state.dp == 1:
        return
    for _, moe in model.moe_layers():
        if getattr(moe.router, "expert_bias", None) is not None:
            dist.all_reduce(moe.router.pending_load, group=state.dp_group)


@torch.no_grad()
def sync_routing_stats(model: GPT, state: ParallelState, training: bool = True) -> None:
    """Sum the routing counts since the last summary over data parallel, just before logging them."""
    if state.dp == 1:
        return
    for _, moe in model.moe_layers():
        stats = moe.routing_stats if training else moe.eval_routing_stats
        # counts start on the host until a forward records them
        for name in ("routed", "kept", "rank_visits", "entropy"):
            counts = getattr(stats, name).to(state.comm_device)
            dist.all_reduce(counts, group=state.dp_group)
            setattr(stats, name, counts)
        most = stats.most_rank_visits.to(state.comm_device)
        dist.all_reduce(most, op=dist.ReduceOp.MAX, group=state.dp_group)
        stats.most_rank_visits = most
