"""Model-state bytes a rank holds, counted from its tensors (not from the process's RSS): parameters,
gradients and optimizer state (its shards under ZeRO), and ZeRO-3 parameters gathered and not yet freed.
The memory test and benchmarks/memory_scaling.py read it."""

from __future__ import annotations

from torch import Tensor, nn
from torch.distributed.fsdp import FSDPModule

from moetrain.parallel.pieces import local
from moetrain.parallel.zero import ZeroOptimizer


def _bytes(tensor: Tensor) -> int:
    tensor = local(tensor)
    return tensor.numel() * tensor.element_size()


def model_state_bytes(model: nn.Module, optimizer) -> dict[str, int]:
    """{"params", "grads", "optimizer", "gathered", "total"} in bytes on this rank."""
    params = list(model.parameters())  # each shared tensor once
    inner = optimizer.inner if isinstance(optimizer, ZeroOptimizer) else optimizer
    held = {
        "params": sum(_bytes(p) for p in params),
        "grads": sum(_bytes(p.grad) for p in params if p.grad is not None),
        "optimizer": sum(_bytes(v) for state in inner.state.values() for v in state.values()
                         if isinstance(v, Tensor)),
        "gathered": sum(_gathered_bytes(module) for module in model.modules() if isinstance(module, FSDPModule)),
    }
    if isinstance(optimizer, ZeroOptimizer):  # stage 2 owners' running gradient sums; offload's host masters
        held["grads"] += sum(_bytes(t) for t in optimizer.reduced.values())
        held["params"] += sum(_bytes(t) for t in optimizer.master.values())
    return {**held, "total": sum(held.values())}


def _gathered_bytes(module: FSDPModule) -> int:
    """Bytes of the unsharded (all-gathered) parameters of one FSDP2 unit still allocated (0 once freed)."""
    group = module._get_fsdp_state()._fsdp_param_group  # FSDP2 exposes no public accessor for this
    if group is None:
        return 0
    return sum(p._unsharded_param.untyped_storage().nbytes() for p in group.fsdp_params
               if hasattr(p, "_unsharded_param"))


def record_before_zero_grad(model: nn.Module, optimizer, record: dict) -> None:
    """From now on, record["step"] = model_state_bytes just before each step's gradients are cleared: the
    step's gradients and optimizer state both held."""
    zero_grad = optimizer.zero_grad

    def measured(*args, **kwargs):
        record["step"] = model_state_bytes(model, optimizer)
        zero_grad(*args, **kwargs)
    optimizer.zero_grad = measured
