"""Fused kernels for a GPU: the LM loss's per-chunk softmax and gradient, RMSNorm, RoPE and SwiGLU, each one op.

On a CPU moetrain runs the eager reference paths (the chunked loss of moetrain/lm_loss.py, the hand-written
RMSNorm backward of moetrain/norm.py, apply_rope of moetrain/attention.py, the experts' SwiGLU and its
gradient in moetrain/moe/experts.py). Where `fused_kernels(device)` holds (CUDA), each of these pieces is one
custom op (`torch.ops.moetrain.*`) whose body is the same math, `torch.compile`d into one or two kernels that
read their inputs and write their outputs once: no fp32 copy of the bf16 logits, no per-element temporaries
between ~10 small kernels. The op boundary is also what a cost model sees: a tool that records aten ops
(benchmarks/gpu_cost_model.py) prices each op by its inputs and outputs and one launch, which is what the
compiled kernel moves.

Every body is plain torch code: on a CPU (eager, or compiled when a C++ compiler is there) the tests compare
it with the reference paths (tests/model/test_fused.py).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

IGNORE_INDEX = -100  # targets equal to this are not predicted (F.cross_entropy's default; lm_loss reads it here)
CUDA_CHUNK_BYTES = 2**30  # 16-bit logits of one LM-loss chunk on a GPU: a few chunks per micro-batch


def fused_kernels(device: torch.device) -> bool:
    """Whether this device runs the fused ops (CUDA). The CPU keeps the eager reference paths."""
    return device.type == "cuda"


def at_least_fp32(t: Tensor) -> Tensor:
    """16-bit tensors as fp32 for per-element math; fp32 and fp64 as they are (float64 checks stay float64)."""
    return t.float() if t.element_size() < 4 else t


def _compiled(fn: Callable) -> Callable:
    """`fn`, compiled on first use for a CUDA input, eager otherwise (the CPU's reference) or when the
    environment sets MOETRAIN_EAGER_FUSED=1 (the same ops without compiling: a quick smoke run, debugging)."""
    compiled = None

    @functools.wraps(fn)
    def run(*args):
        nonlocal compiled
        if not args[0].is_cuda or os.environ.get("MOETRAIN_EAGER_FUSED") == "1":
            return fn(*args)
        if compiled is None:
            compiled = torch.compile(fn, fullgraph=True)  # a second shape (the last chunk) goes dynamic
        return compiled(*args)

    return run


def _fused_op(name: str, body: Callable) -> torch.library.CustomOpDef:
    """`body` as the one op torch.ops.moetrain.<name>, compiled on CUDA (`_compiled`); its schema is the
    body's signature."""
    return torch.library.custom_op(f"moetrain::{name}", _compiled(body), mutates_args=())


# --- LM loss: one chunk's softmax, loss and logit gradient -----------------------------------------------
def lm_chunk_body(logits: Tensor, targets: Tensor, classes: int) -> tuple[Tensor, Tensor]:
    """Per-row cross entropy of `logits` [rows, V] (0 where the target is ignored; columns from `classes` on
    pad the head and are never predicted) and d(sum of losses)/d logits = softmax - one_hot(target), in the
    logits' dtype. Statistics in fp32, per element, without an fp32 copy of the logits once compiled."""
    wide = logits.float()
    column = torch.arange(wide.shape[1], device=wide.device)
    wide = wide.masked_fill(column >= classes, float("-inf"))
    lse = torch.logsumexp(wide, dim=1, keepdim=True)
    kept = targets != IGNORE_INDEX
    target = targets.where(kept, 0).unsqueeze(1)
    is_target = column == target
    loss_rows = (lse.squeeze(1) - wide.gather(1, target).squeeze(1)) * kept
    grad = (torch.exp(wide - lse) - is_target.float()) * kept.unsqueeze(1)
    return loss_rows, grad.to(logits.dtype)


lm_chunk_grad = _fused_op("lm_chunk_grad", lm_chunk_body)


@lm_chunk_grad.register_fake
def _(logits: Tensor, targets: Tensor, classes: int) -> tuple[Tensor, Tensor]:
    return logits.new_empty(logits.shape[0], dtype=torch.float32), torch.empty_like(logits)


# --- RMSNorm ------------------------------------------------------------------------------------------
def rms_norm_body(x: Tensor, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """x / rms(x) * weight in x's dtype, statistics in fp32; and the per-row 1 / rms backward needs."""
    wide = x.float()
    inv_rms = torch.rsqrt(wide.square().mean(-1, keepdim=True) + eps)
    return (wide * inv_rms * weight.float()).to(x.dtype), inv_rms


def rms_norm_backward_body(grad_out: Tensor, x: Tensor, weight: Tensor, inv_rms: Tensor,
                           grad_residual: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Gradients of x and weight: (g w - normed mean(g w normed)) / rms, and sum over rows of g normed; plus
    `grad_residual` (x's gradient through the residual branch beside the norm), added in the same pass."""
    normed = x.float() * inv_rms
    grad = grad_out.float()
    grad_weight = (grad * normed).reshape(-1, x.shape[-1]).sum(0)
    grad_normed = grad * weight.float()
    mean_dot = (grad_normed * normed).mean(-1, keepdim=True)
    grad_x = (grad_normed - normed * mean_dot) * inv_rms
    if grad_residual is not None:
        grad_x = grad_x + grad_residual.float()
    return grad_x.to(x.dtype), grad_weight.to(weight.dtype)


rms_norm = _fused_op("rms_norm", rms_norm_body)  # differentiable (its autograd below)


@rms_norm.register_fake
def _(x: Tensor, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    return torch.empty_like(x), x.new_empty((*x.shape[:-1], 1), dtype=torch.float32)


rms_norm_backward = _fused_op("rms_norm_backward", rms_norm_backward_body)


@rms_norm_backward.register_fake
def _(grad_out: Tensor, x: Tensor, weight: Tensor, inv_rms: Tensor,
      grad_residual: Tensor | None = None) -> tuple[Tensor, Tensor]:
    return torch.empty_like(x), torch.empty_like(weight)


def _rms_norm_setup(ctx, inputs, output) -> None:
    x, weight, _ = inputs
    ctx.save_for_backward(x, weight, output[1])


def _rms_norm_grad(ctx, grad_out: Tensor, _grad_inv_rms: Tensor):
    x, weight, inv_rms = ctx.saved_tensors
    grad_x, grad_weight = rms_norm_backward(grad_out.contiguous(), x, weight, inv_rms)
    return grad_x, grad_weight, None


rms_norm.register_autograd(_rms_norm_grad, setup_context=_rms_norm_setup)


# --- RoPE ---------------------------------------------------------------------------------------------
def _swap_halves(x: Tensor) -> Tensor:
    half = x.shape[-1] // 2
    return torch.cat([x[..., half:], x[..., :half]], dim=-1)


def rope_body(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x * cos + (x2, x1) * signed sin (moetrain.attention.apply_rope's rotation)."""
    return x * cos.to(x.dtype) + _swap_halves(x) * sin.to(x.dtype)


def rope_backward_body(grad: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """The rotation's transpose: g * cos + swap(g * signed sin) (swapping the halves is its own inverse)."""
    return grad * cos.to(grad.dtype) + _swap_halves(grad * sin.to(grad.dtype))


rope = _fused_op("rope", rope_body)  # differentiable in x (its autograd below)


@rope.register_fake
def _(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    return torch.empty_like(x)


rope_backward = _fused_op("rope_backward", rope_backward_body)


@rope_backward.register_fake
def _(grad: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    return torch.empty_like(grad)


def _rope_setup(ctx, inputs, output) -> None:
    _, cos, sin = inputs
    ctx.save_for_backward(cos, sin)


def _rope_grad(ctx, grad: Tensor):
    cos, sin = ctx.saved_tensors
    return rope_backward(grad.contiguous(), cos, sin), None, None


rope.register_autograd(_rope_grad, setup_context=_rope_setup)


# --- SwiGLU -------------------------------------------------------------------------------------------
def swiglu_body(h: Tensor) -> Tensor:
    """silu(gate) * up for h = [.., 2f] = (gate, up), in h's dtype; the math in fp32 per element."""
    gate, up = at_least_fp32(h).chunk(2, dim=-1)
    return (F.silu(gate) * up).to(h.dtype)


def swiglu_backward_body(h: Tensor, grad_act: Tensor) -> tuple[Tensor, Tensor]:
    """The activation again (the weight gradient of the next matrix needs it) and d loss / d h from
    d loss / d act: (g up silu'(gate), g silu(gate)), silu'(x) = s (1 + x (1 - s)) with s = sigmoid(x)."""
    gate, up = at_least_fp32(h).chunk(2, dim=-1)
    grad = at_least_fp32(grad_act)
    sigmoid = torch.sigmoid(gate)
    silu_gate = F.silu(gate)  # as the forward computes it: the same activation again
    grad_gate = grad * up * sigmoid * (1 + gate * (1 - sigmoid))
    return (silu_gate * up).to(h.dtype), torch.cat([grad_gate, grad * silu_gate], dim=-1).to(h.dtype)


swiglu = _fused_op("swiglu", swiglu_body)  # differentiable (its autograd below)


@swiglu.register_fake
def _empty_act(h: Tensor) -> Tensor:
    return h.new_empty((*h.shape[:-1], h.shape[-1] // 2))


swiglu_backward = _fused_op("swiglu_backward", swiglu_backward_body)  # (act, grad_h): h, grad_act read once


@swiglu_backward.register_fake
def _(h: Tensor, grad_act: Tensor) -> tuple[Tensor, Tensor]:
    return _empty_act(h), h.new_empty(h.shape)


def _swiglu_setup(ctx, inputs, output) -> None:
    ctx.save_for_backward(inputs[0])


def _swiglu_grad(ctx, grad_act: Tensor) -> Tensor:
    (h,) = ctx.saved_tensors
    return swiglu_backward(h, grad_act.contiguous())[1]


swiglu.register_autograd(_swiglu_grad, setup_context=_swiglu_setup)


# --- The routing weight's backward in the experts: y = o * w per row ---------------------------------------
def route_weight_backward_body(grad_y: Tensor, o: Tensor, route_weight: Tensor) -> tuple[Tensor, Tensor]:
    """(d loss / d o, d loss / d w) of y = o * w[:, None]: grad_y * w in grad_y's dtype, and the row sums of
    grad_y * o in fp32, then w's dtype: grad_y read once for both, no [N, d] product kept."""
    grad_o = (at_least_fp32(grad_y) * at_least_fp32(route_weight).unsqueeze(1)).to(grad_y.dtype)
    grad_w = (at_least_fp32(grad_y) * at_least_fp32(o)).sum(-1).to(route_weight.dtype)
    return grad_o, grad_w


route_weight_backward = _fused_op("route_weight_backward", route_weight_backward_body)


@route_weight_backward.register_fake
def _(grad_y: Tensor, o: Tensor, route_weight: Tensor) -> tuple[Tensor, Tensor]:
    return torch.empty_like(grad_y), torch.empty_like(route_weight)
