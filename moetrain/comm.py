"""Autograd-aware collectives for regions where every rank of a group holds the same activations.

`copy_to_group` marks where a replicated activation enters per-rank partial work (its gradient
is the sum of the ranks' partial gradients); `reduce_from_group` marks where the partial results
are summed back into a replicated activation (its gradient is already replicated). Together they
are Megatron's tensor-parallel pair; the expert dispatcher uses them too when experts are split
over tensor-parallel ranks.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor


class _CopyToGroup(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, group: dist.ProcessGroup) -> Tensor:
        ctx.group = group
        return x

    @staticmethod
    def backward(ctx, grad: Tensor):
        grad = grad.contiguous()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


class _ReduceFromGroup(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, group: dist.ProcessGroup) -> Tensor:
        x = x.contiguous().clone()
        dist.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx, grad: Tensor):
        return grad, None


def copy_to_group(x: Tensor, group: dist.ProcessGroup | None) -> Tensor:
    """Identity forward; all-reduce (sum) of the gradient in backward."""
    return x if group is None else _CopyToGroup.apply(x, group)


def reduce_from_group(x: Tensor, group: dist.ProcessGroup | None) -> Tensor:
    """All-reduce (sum) forward; identity backward."""
    return x if group is None else _ReduceFromGroup.apply(x, group)
