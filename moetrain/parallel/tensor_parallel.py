"""Tensor parallelism (Megatron's column/row split) for attention and dense MLPs.

A column-parallel linear keeps the output rows of this rank's heads (or FFN columns); a
row-parallel linear keeps the matching input columns and sums the partial outputs over the group.
Fused projections (q|k|v, swiglu's gate|up) are split part by part so each rank holds whole heads.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn

from moetrain import main_grad
from moetrain.comm import copy_to_group, reduce_from_group
from moetrain.model import GPT
from moetrain.norm import RMSNorm


def shard_index(size: int, parts: tuple[int, ...], rank: int, ranks: int) -> Tensor:
    """Indices of rank's slice of each block of a dimension of `size` cut in blocks of relative sizes `parts`."""
    unit = size // sum(parts)
    starts = [unit * sum(parts[:p]) for p in range(len(parts))]
    widths = [unit * part // ranks for part in parts]
    return torch.cat([torch.arange(start + rank * width, start + (rank + 1) * width)
                      for start, width in zip(starts, widths, strict=True)])


class ColumnParallelLinear(nn.Module):
    """y_local = x W_local^T + b_local; the input's gradient is summed over the group."""

    def __init__(self, linear: nn.Linear, group: dist.ProcessGroup, parts: tuple[int, ...] = (1,)) -> None:
        super().__init__()
        self.group = group
        rows = shard_index(linear.out_features, parts, dist.get_rank(group), dist.get_world_size(group))
        self.weight = nn.Parameter(linear.weight.detach()[rows].clone())
        self.bias = nn.Parameter(linear.bias.detach()[rows].clone()) if linear.bias is not None else None
        self.full_shape = tuple(linear.weight.shape)
        self.index = rows  # global rows of the local weight (dimension 0)

    def forward(self, x: Tensor) -> Tensor:
        return main_grad.linear(copy_to_group(x, self.group), self.weight, self.bias)


class RowParallelLinear(nn.Module):
    """y = sum over ranks of x_local W_local^T, then the (replicated) bias."""

    def __init__(self, linear: nn.Linear, group: dist.ProcessGroup) -> None:
        super().__init__()
        self.group = group
        cols = shard_index(linear.in_features, (1,), dist.get_rank(group), dist.get_world_size(group))
        self.weight = nn.Parameter(linear.weight.detach()[:, cols].clone())
        self.bias = nn.Parameter(linear.bias.detach().clone()) if linear.bias is not None else None
        self.full_shape = tuple(linear.weight.shape)
        self.index = cols  # global columns of the local weight (dimension 1)

    def forward(self, x: Tensor) -> Tensor:
        out = reduce_from_group(main_grad.linear(x, self.weight), self.group)
        return out + self.bias if self.bias is not None else out


class HeadNormParallel(RMSNorm):
    """A per-head RMSNorm (QK-norm) under tensor parallelism: every rank holds the whole weight but applies it
    to its own heads only, so the weight's gradient is summed over the group (identity forward)."""

    def __init__(self, norm: RMSNorm, group: dist.ProcessGroup) -> None:
        nn.Module.__init__(self)
        self.eps, self.weight, self.group = norm.eps, norm.weight, group

    def applied_weight(self) -> Tensor:
        return copy_to_group(self.weight, self.group)


def tensor_parallel_shards(model: nn.Module) -> dict[str, tuple[int, Tensor, tuple[int, ...]]]:
    """Name of each tensor-parallel weight -> (split dimension, global indices, full shape)."""
    shards = {}
    for name, module in model.named_modules():
        if isinstance(module, ColumnParallelLinear):
            shards[f"{name}.weight"] = (0, module.index, module.full_shape)
            if module.bias is not None:
                shards[f"{name}.bias"] = (0, module.index, module.full_shape[:1])
        elif isinstance(module, RowParallelLinear):
            shards[f"{name}.weight"] = (1, module.index, module.full_shape)
    return shards


def apply_tensor_parallel(model: GPT, group: dist.ProcessGroup) -> None:
    """Split the linears of the model's plan (GPT.tp_plan: attention and dense MLPs) over `group`; per-head
    norms sum their gradient over it."""
    for name, split in model.tp_plan().items():
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        linear = getattr(parent, attr)
        if split.style == "head_norm":
            setattr(parent, attr, HeadNormParallel(linear, group))
        elif split.style == "shared_key":
            linear.shared_key_group = group
        elif split.style == "column":
            setattr(parent, attr, ColumnParallelLinear(linear, group, parts=split.parts))
        else:
            setattr(parent, attr, RowParallelLinear(linear, group))
