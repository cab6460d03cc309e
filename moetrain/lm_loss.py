"""The language-model loss: cross entropy of the LM head, computed a chunk of rows at a time.

`F.cross_entropy(lm_head(h).float(), targets)` holds the [B*T, V] logits in the compute dtype, their
fp32 copy, the fp32 log-softmax it saves for backward and, in backward, an fp32 gradient of the same
size: with a 50k vocabulary and 32k tokens a step, over 6 GB per copy. `linear_cross_entropy`
projects, normalises and differentiates one chunk of rows at a time, writing the gradients of the
hidden states and of the head's weight during the forward (as Liger's fused linear cross entropy
does), so at most one fp32 [chunk, V] block exists at once and nothing [B*T, V] is kept for backward.
The gradient is exact, not an approximation: equal to the plain loss's within fp32 rounding.
A head padded past the vocabulary (--make-vocab-size-divisible-by) keeps its aligned [chunk, V_padded]
GEMMs; its padding columns are set to -inf before the softmax, so they are never predicted and get
no gradient.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from moetrain.fused import CUDA_CHUNK_BYTES, IGNORE_INDEX, fused_kernels, lm_chunk_grad
from moetrain.main_grad import addmm_into

CHUNK_BYTES = 64 * 2**20  # fp32 logits of one chunk: ~90% below the plain loss's peak (BENCHMARKS.md)


def linear_cross_entropy(hidden: Tensor, weight: Tensor, targets: Tensor, *, classes: int | None = None,
                         chunk_bytes: int | None = None) -> Tensor:
    """Mean cross entropy of `hidden @ weight.T` ([N, d] @ [d, V]) against `targets` [N], over the first
    `classes` columns (None: all V; the rest pad the head).

    The projection runs in the autocast dtype when autocast is on (as nn.Linear would), the softmax
    in fp32. Targets equal to IGNORE_INDEX are left out of the mean. Chunks: `chunk_bytes` of fp32 logits
    (default 64 MiB) on a CPU; on CUDA, where each chunk's softmax and gradient is one fused op
    (moetrain.fused.lm_chunk_grad), 1 GiB of logits in the compute dtype.
    """
    hidden, targets = hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1)
    compute_dtype = (torch.get_autocast_dtype(hidden.device.type)
                     if torch.is_autocast_enabled(hidden.device.type) else hidden.dtype)
    fused = fused_kernels(hidden.device)
    if chunk_bytes is None:
        chunk_bytes = CUDA_CHUNK_BYTES if fused else CHUNK_BYTES
    logit_bytes = compute_dtype.itemsize if fused else 4
    chunk_rows = max(1, chunk_bytes // (logit_bytes * weight.shape[0]))
    classes = weight.shape[0] if classes is None else classes
    if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
        return _LinearCrossEntropy.apply(hidden, weight, targets, compute_dtype, chunk_rows, classes, fused)
    with torch.autocast(hidden.device.type, enabled=False):
        loss_sum = sum(_chunk_losses(h, weight.to(compute_dtype), t, classes)[0].sum()
                       for h, t in zip(hidden.to(compute_dtype).split(chunk_rows), targets.split(chunk_rows)))
    return loss_sum / _count(targets)


def _count(targets: Tensor) -> Tensor:
    """Predicted tokens as a float tensor (no host sync); at least 1 so an all-ignored batch gives 0."""
    return (targets != IGNORE_INDEX).sum().clamp(min=1).float()


def _chunk_losses(hidden: Tensor, weight: Tensor, targets: Tensor, classes: int) -> tuple[Tensor, Tensor, Tensor]:
    """Per-row losses of one chunk (0 where ignored), its fp32 logits (-inf past `classes`) and per-row
    log-sum-exp."""
    logits = torch.mm(hidden, weight.t()).float()
    if classes < logits.shape[1]:
        logits[:, classes:] = -math.inf
    lse = torch.logsumexp(logits, dim=1)
    target_logit = logits.gather(1, _safe(targets).unsqueeze(1)).squeeze(1)
    return (lse - target_logit) * (targets != IGNORE_INDEX), logits, lse


def _safe(targets: Tensor) -> Tensor:
    """Targets with ignored ones pointed at class 0, so they can index (their rows are masked)."""
    return targets.where(targets != IGNORE_INDEX, 0)


def _reference_chunk_grad(h: Tensor, w: Tensor, t: Tensor, classes: int,
                          compute_dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """The CPU's chunk: per-row losses and d loss_sum / d logits = softmax - one_hot(target), zero rows where
    ignored, computed in place on the chunk's fp32 logits, then cast to the compute dtype."""
    losses, logits, lse = _chunk_losses(h, w, t, classes)
    grad_logits = logits.sub_(lse.unsqueeze(1)).exp_()
    target = _safe(t).unsqueeze(1)
    grad_logits.scatter_(1, target, grad_logits.gather(1, target) - 1)
    grad_logits.mul_((t != IGNORE_INDEX).unsqueeze(1))
    return losses, grad_logits.to(compute_dtype)


class _LinearCrossEntropy(torch.autograd.Function):
    """Forward computes the loss and both gradients chunk by chunk; backward only scales them.

    Each chunk: the logits GEMM, then the softmax, loss and logit gradient either on the CPU's path (in
    place on fp32 logits: the reference) or, `fused` (CUDA), as one op on the 16-bit logits
    (moetrain.fused.lm_chunk_grad: no fp32 copy), then the two gradient GEMMs. The weight gradient is summed
    over the chunks in fp32 by the GEMM itself (moetrain.main_grad.addmm_into: beta 0 for the first chunk,
    1 after), not in a separate pass per chunk. On the fused path the backward scales it straight into
    the head weight's .grad where it may (`_writes_its_own_grad`)."""

    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, targets: Tensor, compute_dtype: torch.dtype,
                chunk_rows: int, classes: int, fused: bool) -> Tensor:
        with torch.autocast(hidden.device.type, enabled=False):
            h_all, w = hidden.to(compute_dtype), weight.to(compute_dtype)
            count = _count(targets)
            grad_hidden = torch.empty(hidden.shape, dtype=torch.float32, device=hidden.device)
            grad_weight = torch.empty(weight.shape, dtype=torch.float32, device=weight.device)
            loss_sum = hidden.new_zeros((), dtype=torch.float32)
            chunks = zip(h_all.split(chunk_rows), targets.split(chunk_rows), grad_hidden.split(chunk_rows))
            for i, (h, t, g_h) in enumerate(chunks):
                losses, grad_logits = lm_chunk_grad(torch.mm(h, w.t()), t, classes) if fused \
                    else _reference_chunk_grad(h, w, t, classes, compute_dtype)
                loss_sum += losses.sum()
                g_h.copy_(grad_logits @ w)
                addmm_into(grad_weight, grad_logits.t(), h, beta=int(i > 0))  # fp32 sums over every chunk
        ctx.save_for_backward(grad_hidden, grad_weight, count)
        ctx.dtypes = hidden.dtype, weight.dtype
        ctx.writes_grad_of = weight if fused and _writes_its_own_grad(weight) else None
        return loss_sum / count

    @staticmethod
    def backward(ctx, grad_loss: Tensor):
        grad_hidden, grad_weight, count = ctx.saved_tensors
        scale = grad_loss / count
        hidden_dtype, weight_dtype = ctx.dtypes
        weight = ctx.writes_grad_of
        if weight is None:
            weight_grad = grad_weight.mul_(scale).to(weight_dtype)
        else:  # scaled straight into the fp32 gradient: one pass where a scale and AccumulateGrad's += made two
            if weight.grad is None:
                weight.grad = grad_weight.mul_(scale)
            else:
                weight.grad.addcmul_(grad_weight, scale)
            weight_grad = None
        return grad_hidden.mul_(scale).to(hidden_dtype), weight_grad, None, None, None, None, None


def _writes_its_own_grad(weight: Tensor) -> bool:
    """Whether the backward adds the head's scaled fp32 gradient into weight.grad itself: an fp32 leaf
    parameter whose gradient no post-accumulate hook watches (data-parallel overlap and ZeRO-2 reductions run
    from AccumulateGrad, once per backward: a tied embedding adds its part after the head's), outside a
    compiled graph. A tied embedding's gradient then goes to the same .grad by AccumulateGrad, without the
    autograd sum of two [V, d] gradients."""
    return weight.is_leaf and weight.requires_grad and weight.dtype == torch.float32 \
        and not weight._post_accumulate_grad_hooks and not torch.compiler.is_compiling()


def plain_cross_entropy(logits: Tensor, targets: Tensor) -> Tensor:
    """The reference: fp32 cross entropy of whole logits (what linear_cross_entropy must equal)."""
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1),
                           ignore_index=IGNORE_INDEX)
