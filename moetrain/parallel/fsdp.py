"""ZeRO stage 3 on torch's FSDP2 (`fully_shard`): parameters, gradients and optimizer state sharded.

Each block is one FSDP unit over the data-parallel ranks; its routed experts are a unit of their own over
their expert-data-parallel group (the ranks holding the same experts, as DeepSpeed groups them); the
embeddings, final norm and LM head are the root's unit. A unit's parameters are gathered for its forward
(and again for its backward, unless `reshard_after_forward` is off) and freed after; its gradients are
reduce-scattered, summed over the group and divided by the whole data-parallel size, as `GradSpec` says
for every stage (an expert already saw its expert-parallel group's tokens through the all-to-all).

FSDP shards a tensor along the dimension tensor parallelism already split (dimension 0 otherwise), so
every local tensor stays one `Piece` of its global tensor (global indices along one dimension):
materialisation, checkpoints and the tests read it as before. Every unit reduce-scatters the gradients
of parameters no token reached as zeros, so a rank whose experts got no tokens joins every collective.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import (
    CPUOffloadPolicy,
    MixedPrecisionPolicy,
    OffloadPolicy,
    fully_shard,
    register_fsdp_forward_method,
)
from torch.distributed.tensor import Shard

from moetrain.config import ConfigError, ParallelConfig
from moetrain.model import GPT
from moetrain.moe import MoE
from moetrain.parallel.mesh import ParallelState
from moetrain.parallel.tensor_parallel import tensor_parallel_shards


@dataclass(frozen=True)
class ShardingOptions:
    """How ZeRO-3 shards: from --no-reshard-after-forward, the DeepSpeed offload keys and the precision."""

    reshard_after_forward: bool = True
    offload: bool = False  # parameters and gradients in host memory, the optimizer step there (FSDP2's policy)
    param_dtype: torch.dtype | None = None  # gathered parameters' dtype (None: the fp32 masters' own)
    reduce_dtype: torch.dtype | None = None  # gradient reduction dtype (None: the gradients' own)

    @classmethod
    def from_config(cls, pc: ParallelConfig, precision: str, device: torch.device) -> ShardingOptions:
        """On a GPU with --bf16: bf16 gathered parameters, fp32 masters and gradient reduction; else fp32."""
        low = torch.bfloat16 if precision == "bf16" and device.type == "cuda" else None
        return cls(reshard_after_forward=pc.reshard_after_forward,
                   offload=pc.offload_param or pc.offload_optimizer,
                   param_dtype=low, reduce_dtype=torch.float32 if low is not None else None)


def fully_shard_model(model: GPT, state: ParallelState, options: ShardingOptions) -> None:
    """Shard the (tensor- and expert-parallel) model over data parallel: experts, then blocks, then the root.

    Call on the meta model, before `GPT.materialize`: no rank ever allocates more than its shards.
    """
    device_type = state.comm_device.type
    meshes: dict[dist.ProcessGroup, DeviceMesh] = {}

    def mesh_of(group: dist.ProcessGroup) -> DeviceMesh:
        if group not in meshes:
            meshes[group] = DeviceMesh.from_group(group, device_type)
        return meshes[group]

    split_dims = {name: dim for name, (dim, _, _) in tensor_parallel_shards(model).items()}
    dim_of = {id(param): split_dims.get(name, 0) for name, param in model.named_parameters()}
    policy = MixedPrecisionPolicy(param_dtype=options.param_dtype, reduce_dtype=options.reduce_dtype)
    offload = CPUOffloadPolicy(pin_memory=device_type == "cuda") if options.offload else OffloadPolicy()

    def shard(module: nn.Module, group: dist.ProcessGroup, root: bool = False) -> None:
        """The root keeps its parameters gathered from forward to backward (FSDP2's default for it): the
        LM head's weight is read after the forward, by the loss."""
        reshard = None if root else options.reshard_after_forward
        fully_shard(module, mesh=mesh_of(group), reshard_after_forward=reshard,
                    shard_placement_fn=lambda param: Shard(dim_of[id(param)]), mp_policy=policy,
                    offload_policy=offload)

    for name, param in model.named_parameters():
        dim = dim_of[id(param)]
        if dim and param.shape[dim] % state.dp:  # FSDP2 shards dimensions other than 0 evenly only
            raise ConfigError(f"--zero-stage 3 shards {name} along its tensor-parallel dimension, whose "
                              f"{param.shape[dim]} columns do not divide by the data-parallel size {state.dp}; "
                              f"use a data-parallel size that divides them, or --zero-stage 2")
    experts = []
    for block in model.blocks:
        if isinstance(block.ffn, MoE):
            groups = state.experts(block.ffn.num_experts)
            shard(block.ffn.experts, groups.reduce_group)
            experts.append((block.ffn.experts, groups.reduce_size))
        shard(block, state.dp_group)
    shard(model, state.dp_group, root=True)
    if state.pp > 1:  # a pipeline stage runs forward_stage, not forward (which calls it: registered once only)
        register_fsdp_forward_method(model, "forward_stage")
    for module, group_size in experts:  # summed over the expert-data-parallel group, divided by the whole DP size
        module.set_gradient_divide_factor(float(state.dp))
        # gloo has no pre-multiplied sum: sum, then divide (not on one rank, where FSDP2 would divide twice)
        if dist.get_backend() == "gloo" and group_size > 1:
            module.set_force_sum_reduction_for_comms(True)
    model.set_reduce_scatter_unused_params(True)
