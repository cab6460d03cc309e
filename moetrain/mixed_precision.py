"""Low-precision compute weights over fp32 master weights (Megatron's --bf16 layout), for ZeRO 0-2.

Under autocast every GEMM casts its fp32 weight to bf16/fp16 in every micro-batch's forward (and, with
recomputation, again in the recompute). Here each GEMM weight has a low-precision copy, written once per
optimizer step (`ComputeWeights.refresh`, one multi-tensor copy, on the first forward after the weights
changed), and each forward uses the copy: a forward pre-hook on the module puts it in the parameter's
place (through `_ComputeWeight`, so the gradient flows back to the fp32 parameter) and a forward hook puts
the parameter back, so outside a forward (the optimizer, checkpoints, gradient hooks) the model holds
only its fp32 masters. Gradients reach the masters in fp32 and accumulate there across micro-batches
(AccumulateGrad), which the ZeRO stage-2 and data-parallel hooks see as before.

The copy holds exactly what autocast's cast would give (round to nearest from the same fp32 value), and the
gradient goes back through the same cast: losses and gradients are bit for bit those of plain autocast.

Which weights: those a GEMM reads in the autocast dtype: the projections and MLPs (moetrain.main_grad's
Linear, tensor-parallel ones included) and grouped-expert weights; not routers (computed in fp32, as DeepSpeed
does), not the LM head (the chunked loss casts it once per micro-batch), not the one- or two-column gates (the
shared expert's, PR-MoE's coefficient: autocast casts them), not norms, embeddings or biases (used in fp32,
or small). Those stay torch's nn.Linear, which `GEMM_WEIGHTS` does not list.

ZeRO-3 (FSDP2) does this job with its own MixedPrecisionPolicy(param_dtype=...); `build_run` makes no
ComputeWeights there (`applies_to`).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from moetrain.main_grad import Linear, mark
from moetrain.model import GPT
from moetrain.moe.experts import GroupedExperts
from moetrain.parallel.tensor_parallel import ColumnParallelLinear, RowParallelLinear

LOW_PRECISION = {"bf16": torch.bfloat16, "fp16": torch.float16}
# moetrain's Linear, not torch's nn.Linear: routers, gates and the LM head are nn.Linear and keep no copy
GEMM_WEIGHTS: dict[type, tuple[str, ...]] = {Linear: ("weight",), ColumnParallelLinear: ("weight",),
                                             RowParallelLinear: ("weight",), GroupedExperts: ("w1", "w2")}


def applies_to(precision: str, zero_stage: int) -> bool:
    """Whether a run keeps compute copies: a 16-bit precision, and ZeRO 0-2 (ZeRO-3's FSDP2 casts itself)."""
    return precision in LOW_PRECISION and zero_stage <= 2


class _ComputeWeight(torch.autograd.Function):
    """The low-precision copy in a forward; its gradient goes to the fp32 master, cast as autocast's would be.

    A later micro-batch's gradient is added to the master's fp32 gradient in place, in one pass (fp32 +=
    16-bit: 10 B per parameter, where a cast and AccumulateGrad's += move 18), unless a post-accumulate hook
    watches the master (data-parallel or ZeRO-2 reduction), which only AccumulateGrad runs. The sum is the
    same, bit for bit: widening a 16-bit value to fp32 is exact.

    A GEMM that writes its weight gradient into the master's gradient itself (moetrain.main_grad) takes the
    copy detached: its backward does not come here."""

    @staticmethod
    def forward(ctx, master: Tensor, copy: Tensor) -> Tensor:
        ctx.master = master
        return copy.view_as(copy)

    @staticmethod
    def backward(ctx, grad: Tensor):
        master = ctx.master
        if master.grad is not None and not master._post_accumulate_grad_hooks:
            master.grad.add_(grad)
            return None, None
        return grad.to(master.dtype), None


def gemm_weights(model: GPT) -> list[tuple[nn.Module, str]]:
    """(module, parameter name) of every weight this rank's model reads only as a GEMM operand."""
    found = []
    for module in model.modules():
        names = GEMM_WEIGHTS.get(type(module), ())
        found += [(module, name) for name in names if module._parameters.get(name) is not None]
    return found


class ComputeWeights:
    """The low-precision copies of a model's GEMM weights and the hooks that use them in every forward."""

    def __init__(self, model: GPT, dtype: torch.dtype) -> None:
        self.dtype = dtype
        self.slots: dict[nn.Module, list[tuple[str, nn.Parameter, Tensor]]] = {}
        for module, name in gemm_weights(model):
            master = module._parameters[name]
            copy = torch.empty_like(master, dtype=dtype, requires_grad=False)
            self.slots.setdefault(module, []).append((name, master, copy))
        for module in self.slots:
            module.register_forward_pre_hook(self._use_copies)
            module.register_forward_hook(self._restore_masters, always_call=True)
        self.stale = True
        self.refreshes = 0  # how many times the copies were written (tests: once per optimizer step)

    def invalidate(self) -> None:
        """The masters changed (an optimizer step, a loaded checkpoint): the next forward refreshes the copies."""
        self.stale = True

    @torch.no_grad()
    def refresh(self) -> None:
        """Write every copy from its master: one multi-tensor copy per device."""
        by_device: dict[torch.device, tuple[list[Tensor], list[Tensor]]] = {}
        for slots in self.slots.values():
            for _, master, copy in slots:
                copies, masters = by_device.setdefault(master.device, ([], []))
                copies.append(copy)
                masters.append(master.detach())
        for copies, masters in by_device.values():
            torch._foreach_copy_(copies, masters)
        self.stale = False
        self.refreshes += 1

    def _use_copies(self, module: nn.Module, args) -> None:
        if self.stale:
            self.refresh()
        for name, master, copy in self.slots[module]:
            tracked = torch.is_grad_enabled() and master.requires_grad
            weight = copy
            if tracked:
                weight = _ComputeWeight.apply(master, copy)
                mark(weight, master)  # for a GEMM that writes into the master's gradient itself
            module._parameters[name] = weight

    def _restore_masters(self, module: nn.Module, args, output) -> None:
        for name, master, _ in self.slots[module]:
            module._parameters[name] = master
