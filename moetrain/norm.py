"""RMSNorm with a hand-written backward (the Llama-style norm of blocks, queries and keys)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from moetrain.fused import at_least_fp32, fused_kernels, rms_norm_backward
from moetrain.fused import rms_norm as fused_rms_norm


class RMSNorm(nn.Module):
    """x / rms(x) * weight, as nn.RMSNorm (same parameter), with a hand-written backward: on a CPU, autograd
    through F.rms_norm's pieces takes ~1.7x as long (BENCHMARKS.md, "Training throughput")."""

    def __init__(self, hidden_size: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size))

    def forward(self, x: Tensor) -> Tensor:
        # The function picks its own precision; autocast would lower its statistics to 16 bits.
        with torch.autocast(x.device.type, enabled=False):
            if fused_kernels(x.device):  # one fused kernel per direction (moetrain.fused), the same math
                return fused_rms_norm(x, self.applied_weight(), self.eps)[0]
            return _RMSNormFunction.apply(x, self.applied_weight(), self.eps)

    def with_residual(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(norm(x), x) for a block's `x + f(norm(x))`. On CUDA x's two gradients (through the norm, and
        through the residual branch) are summed inside the norm's fused backward kernel, one pass over x
        fewer than autograd's separate sum; elsewhere autograd sums them."""
        if not fused_kernels(x.device) or torch.compiler.is_compiling():
            return self(x), x
        with torch.autocast(x.device.type, enabled=False):
            return _NormBesideResidual.apply(x, self.applied_weight(), self.eps)

    def applied_weight(self) -> Tensor:
        """The weight as the forward uses it (tensor parallelism sums a per-head norm's gradient through it)."""
        return self.weight


class _RMSNormFunction(torch.autograd.Function):
    """Keeps x and the per-row 1 / rms for backward; statistics in fp32 even for 16-bit inputs."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, eps: float) -> Tensor:
        wide = at_least_fp32(x)
        inv_rms = torch.rsqrt(torch.linalg.vecdot(wide, wide).div_(x.shape[-1]).add_(eps)).unsqueeze(-1)
        ctx.save_for_backward(x, weight, inv_rms)
        return (wide * inv_rms).mul_(weight).to(x.dtype)

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        x, weight, inv_rms = ctx.saved_tensors
        normed = at_least_fp32(x) * inv_rms
        grad_out = at_least_fp32(grad_out)
        grad_weight = (grad_out * normed).reshape(-1, x.shape[-1]).sum(0)
        grad_normed = grad_out * weight
        # d/dx of x * inv_rms: (g - normed * mean(g * normed)) * inv_rms, per row
        mean_dot = torch.linalg.vecdot(grad_normed, normed).div_(x.shape[-1]).unsqueeze(-1)
        grad_x = torch.addcmul(grad_normed, normed, mean_dot, value=-1).mul_(inv_rms)
        return grad_x.to(x.dtype), grad_weight.to(weight.dtype), None


class _NormBesideResidual(torch.autograd.Function):
    """(norm(x), x) through moetrain.fused's ops; backward gets both gradients of x and sums them in the
    norm's backward op."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
        normed, inv_rms = fused_rms_norm(x, weight, eps)
        ctx.save_for_backward(x, weight, inv_rms)
        return normed, x.view_as(x)

    @staticmethod
    def backward(ctx, grad_normed: Tensor, grad_residual: Tensor):
        x, weight, inv_rms = ctx.saved_tensors
        grad_x, grad_weight = rms_norm_backward(grad_normed.contiguous(), x, weight, inv_rms,
                                                grad_residual.contiguous())
        return grad_x, grad_weight, None


def normed_and_residual(norm: nn.Module, x: Tensor) -> tuple[Tensor, Tensor]:
    """(norm(x), x): `RMSNorm.with_residual` where the norm is one, else the plain pair (LayerNorm)."""
    return norm.with_residual(x) if isinstance(norm, RMSNorm) else (norm(x), x)
