"""Weight gradients written by their GEMM straight into the fp32 master's gradient (Megatron's gradient-
accumulation fusion), for the 16-bit compute copies of fp32 master weights (moetrain.mixed_precision).

Without it each micro-batch's 16-bit weight gradient is rounded to 16 bits, then added to the fp32 gradient
(write 2 B, read 2 + 4 and write 4 per parameter). Here the weight-gradient GEMM takes 16-bit operands, sums
in fp32 and writes into the master's .grad (beta 0 for the first micro-batch, 1 after): 8 B per parameter,
and no 16-bit rounding of the gradient. A GEMM that does this returns no gradient for the copy, and runs
the master's post-accumulate hooks (data-parallel overlap, ZeRO-2 buckets) as AccumulateGrad would.

Who: the grouped experts' backward (moetrain.moe.experts) and every linear layer with a compute copy
(`linear`, the `Linear` module). Where: a copy marked with its master (`mark`) on a device with the fused
kernels (CUDA), in an eager step with autograd on. A compiled graph keeps the 16-bit gradient that autograd
adds to the master; the CPU (fp32 training) has no copies. On the CPU the same functions run with the
operands widened (the tests).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moetrain.fused import fused_kernels


def mark(copy: Tensor, master: nn.Parameter) -> None:
    """Record on a compute copy (as used in a forward) the fp32 master its weight gradient belongs to."""
    copy.main_param = master


def master_of(weight: Tensor) -> nn.Parameter | None:
    """The master whose gradient `weight`'s GEMM writes into directly, or None where autograd carries it."""
    if torch.compiler.is_compiling() or not torch.is_grad_enabled():
        return None
    master = getattr(weight, "main_param", None)
    return master if master is not None and fused_kernels(weight.device) else None


def mixed_dtype_gemm(device: torch.device) -> bool:
    """Whether a GEMM of 16-bit operands can write fp32 (torch.addmm's out_dtype): CUDA, not the CPU."""
    return device.type == "cuda"


def gradient_buffer(master: nn.Parameter) -> tuple[Tensor, int]:
    """The master's fp32 gradient and the beta to write it with: a new buffer (beta 0, nothing to read) in the
    first micro-batch, else the gradient so far (beta 1)."""
    if master.grad is None:
        master.grad = torch.empty_like(master)
        return master.grad, 0
    return master.grad, 1


def addmm_into(out: Tensor, a: Tensor, b: Tensor, beta: int) -> None:
    """out = beta * out + a @ b: 16-bit (or `out`'s dtype) a and b, fp32 sums, one GEMM writing the fp32 `out`
    (on the CPU the same sums of the exact 16-bit products, widened first)."""
    if a.dtype == out.dtype:
        torch.addmm(out, a, b, beta=beta, out=out)
    elif mixed_dtype_gemm(a.device):
        torch.addmm(out, a, b, beta=beta, out_dtype=out.dtype, out=out)
    else:
        torch.addmm(out, a.to(out.dtype), b.to(out.dtype), beta=beta, out=out)


def accumulated(master: nn.Parameter) -> None:
    """The master's gradient is complete for this micro-batch: its post-accumulate hooks run, as
    AccumulateGrad runs them."""
    for hook in tuple((master._post_accumulate_grad_hooks or {}).values()):
        hook(master)


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """F.linear(x, weight, bias); where `weight` is a compute copy whose master takes its gradient directly
    (`master_of`), in the copy's dtype with the weight gradient written into the master's."""
    # where x needs no gradient, no backward of ours would run: autograd carries the weight's gradient then
    master = master_of(weight) if x.requires_grad else None
    if master is None:
        return F.linear(x, weight, bias)
    bias = bias.to(weight.dtype) if bias is not None else None  # as autocast casts them: the same numbers
    # neither the copy nor its master enters the graph: AccumulateGrad would run the master's hooks again
    return _LinearIntoMaster.apply(x.to(weight.dtype), weight.detach(), bias, (master,))


class _LinearIntoMaster(torch.autograd.Function):
    """x W^T + b whose backward writes dW = grad^T x into the fp32 master's gradient (the master in a tuple,
    which autograd does not track)."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None, masters: tuple[nn.Parameter]) -> Tensor:
        ctx.save_for_backward(x, weight)
        ctx.master, = masters
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, weight = ctx.saved_tensors
        grad_2d = grad.reshape(-1, grad.shape[-1])
        grad_x = grad @ weight  # x needs it: `linear` comes here only then
        grad_bias = grad_2d.sum(0) if ctx.needs_input_grad[2] else None
        main, beta = gradient_buffer(ctx.master)
        addmm_into(main, grad_2d.t(), x.reshape(-1, x.shape[-1]), beta)
        accumulated(ctx.master)
        return grad_x, None, grad_bias, None


class Linear(nn.Linear):
    """nn.Linear (the same parameters and state dict) whose forward is `linear`: the layers whose weights
    have compute copies (moetrain.mixed_precision). Routers, gates and the LM head stay nn.Linear."""

    def forward(self, x: Tensor) -> Tensor:
        return linear(x, self.weight, self.bias)
