"""Data-parallel gradient reduction and the one global gradient norm.

Each parameter carries a `GradSpec`: the group its gradient is summed over (dense parameters:
the data-parallel group; expert parameters: their expert-data-parallel group, the ranks holding
the same experts) and how many ranks end up holding that same reduced gradient, so the global
norm counts every distinct gradient element exactly once, whatever the layout. Either sum is
divided by the full data-parallel size: an expert already received the tokens of all the ranks
of its expert-parallel group through the all-to-all, so dividing by its smaller group alone
would overweight it (the single-process run is the reference).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from moetrain.parallel.pieces import local

BUCKET_BYTES = 32 * 2**20


@dataclass(frozen=True)
class GradSpec:
    group: dist.ProcessGroup | None  # gradients summed over these ranks (None: no reduction)
    size: int  # ranks in `group`
    copies: int  # ranks in the world holding this reduced gradient (group copies x other replicas)
    divisor: int  # data-parallel size: every gradient is a mean over all data-parallel ranks' batches


def buckets(params: list[nn.Parameter], limit: int = BUCKET_BYTES) -> Iterable[list[nn.Parameter]]:
    """Consecutive runs of parameters of one dtype, about `limit` bytes each."""
    run: list[nn.Parameter] = []
    size = 0
    for param in params:
        if run and (size + param.numel() * param.element_size() > limit or param.dtype != run[0].dtype):
            yield run
            run, size = [], 0
        run.append(param)
        size += param.numel() * param.element_size()
    if run:
        yield run


def grouped(specs: dict[nn.Parameter, GradSpec]) -> dict[GradSpec, list[nn.Parameter]]:
    """Parameters by the group their gradients reduce over, in model order."""
    by_spec: dict[GradSpec, list[nn.Parameter]] = {}
    for param, spec in specs.items():
        by_spec.setdefault(spec, []).append(param)
    return by_spec


def fill_missing_grads(params: Iterable[nn.Parameter]) -> None:
    """Zero gradients for parameters no token reached (an idle expert), so collectives line up."""
    for param in params:
        if param.grad is None:
            param.grad = torch.zeros_like(param)


@torch.no_grad()
def all_reduce_gradients(specs: dict[nn.Parameter, GradSpec]) -> None:
    """Sum every gradient over its group and divide by the data-parallel size, a bucket at a time."""
    for spec, params in grouped(specs).items():
        if spec.divisor == 1:
            continue
        fill_missing_grads(params)
        for run in buckets(params):
            grads = [p.grad for p in run]
            flat = _flatten_dense_tensors(grads)
            if spec.size > 1:
                dist.all_reduce(flat, group=spec.group)
            flat.div_(spec.divisor)
            for grad, reduced in zip(grads, _unflatten_dense_tensors(flat, grads)):
                grad.copy_(reduced)


class OverlappedAllReduce:
    """`all_reduce_gradients`, started during the last micro-batch's backward: a bucket's all-reduce is
    launched (asynchronously) once the gradients of its parameters are final, so communication overlaps
    the rest of the backward; `finish()` launches what is left (buckets holding a parameter no token
    reached) and waits. Buckets launch in one fixed order (reverse model order, which the backward
    roughly follows), a bucket only after every bucket before it, so every rank issues the same
    collectives in the same order whatever its routing."""

    def __init__(self, specs: dict[nn.Parameter, GradSpec]) -> None:
        runs = [(spec, run) for spec, params in grouped(specs).items() if spec.divisor > 1
                for run in buckets(params)]
        self.buckets = runs[::-1]
        self.bucket_of = {param: i for i, (_, run) in enumerate(self.buckets) for param in run}
        for param in self.bucket_of:
            param.register_post_accumulate_grad_hook(self._grad_ready)
        self.armed = False
        self._reset()

    def _reset(self) -> None:
        self.ready: list[set[nn.Parameter]] = [set() for _ in self.buckets]
        self.launched: list[tuple[Tensor, dist.Work | None]] = []

    def arm(self) -> None:
        """The next backward is the step's last: launch buckets as they complete."""
        self.armed = True

    def _grad_ready(self, param: nn.Parameter) -> None:
        if not self.armed:
            return
        self.ready[self.bucket_of[param]].add(param)
        while len(self.launched) < len(self.buckets) and \
                len(self.ready[len(self.launched)]) == len(self.buckets[len(self.launched)][1]):
            self._launch()

    @torch.no_grad()
    def _launch(self) -> None:
        spec, run = self.buckets[len(self.launched)]
        fill_missing_grads(run)
        flat = _flatten_dense_tensors([p.grad for p in run])
        work = dist.all_reduce(flat, group=spec.group, async_op=True) if spec.size > 1 else None
        self.launched.append((flat, work))

    @torch.no_grad()
    def finish(self) -> None:
        """Launch the buckets left, wait for all, and write each mean gradient back."""
        while len(self.launched) < len(self.buckets):
            self._launch()
        for (spec, run), (flat, work) in zip(self.buckets, self.launched):
            if work is not None:
                work.wait()
            flat.div_(spec.divisor)
            grads = [p.grad for p in run]
            for grad, reduced in zip(grads, _unflatten_dense_tensors(flat, grads)):
                grad.copy_(reduced)
        self.armed = False
        self._reset()


def by_device_and_dtype(tensors: Iterable[Tensor]) -> dict[tuple[torch.device, torch.dtype], list[Tensor]]:
    """Tensors grouped as the fused multi-tensor kernels (torch._foreach_*) take them."""
    groups: dict[tuple[torch.device, torch.dtype], list[Tensor]] = {}
    for tensor in tensors:
        groups.setdefault((tensor.device, tensor.dtype), []).append(tensor)
    return groups


@torch.no_grad()
def global_grad_norm(grads: Iterable[tuple[Tensor, int]], world: bool, device: torch.device) -> Tensor:
    """L2 norm over all ranks' gradients; each (grad, copies) counts 1/copies of its square.

    One pass over the gradients: `torch._foreach_norm` per (device, dtype, copies) group (one multi-tensor
    kernel per group on a GPU, fp32 accumulation for low-precision gradients), not three per gradient.
    The total lives on `device` (the communication device) even on a rank that holds no gradient
    (a ZeRO rank that owns nothing), since every rank joins the all-reduce. Nothing is copied to the host.
    """
    by_copies: dict[int, list[Tensor]] = {}
    for grad, copies in grads:
        by_copies.setdefault(copies, []).append(local(grad))  # ZeRO-3: this rank's shards
    total = torch.zeros((), dtype=torch.float32, device=device)
    for copies, group in by_copies.items():
        for same_kind in by_device_and_dtype(group).values():
            norms = torch._foreach_norm(same_kind, 2, dtype=torch.float32)
            total += (torch.stack(norms).square().sum() / copies).to(device)
    if world:
        dist.all_reduce(total)
    return total.sqrt()


def clip_needed(max_norm: float, grad_norm: float) -> bool:
    """Whether `clip_gradients` would scale the gradients: its coefficient max_norm / (norm + 1e-6), evaluated
    in fp32 as on the device, is below 1. Decided on the host from the step's one host copy of the norm."""
    return math.isfinite(max_norm) and float(np.float32(grad_norm) + np.float32(1e-6)) > max_norm


@torch.no_grad()
def clip_gradients(grads: list[Tensor], max_norm: float, norm: Tensor) -> None:
    """Scale gradients so the global norm is at most max_norm (as torch's clip_grad_norm_ does). Call it only
    when `clip_needed`: under the threshold the coefficient is 1, and the gradients are left unwritten."""
    coef = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
    grads = [local(grad) for grad in grads]  # ZeRO-3: each rank scales its shards
    for (device, _), group in by_device_and_dtype(grads).items():
        torch._foreach_mul_(group, coef.to(device))
