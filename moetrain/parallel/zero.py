"""ZeRO stages 1 and 2: optimizer state (and, in stage 2, gradients) partitioned over data parallel.

Each parameter is owned whole by one rank of its gradient group (dense parameters: the
data-parallel group; expert parameters: their expert-data-parallel group, as DeepSpeed shards
them), in contiguous runs of about equal size, so AdamW state per rank falls as 1/DP.
Stage 1 all-reduces gradients and lets owners step. Stage 2 reduces gradients to their owners
during backward, bucket by bucket as each bucket's gradients become ready (a hook per parameter),
and frees them on every rank at once; owners keep the running sum over micro-batches. So no rank
ever holds much more than its share of gradients plus one bucket. Owners then broadcast the new
values. With `offload` the
owner keeps fp32 master weights and the AdamW state in CPU memory (DeepSpeed's offload_optimizer),
moved in flat buckets, asynchronously on CUDA (moetrain/parallel/offload.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from moetrain.parallel.data_parallel import (
    GradSpec,
    all_reduce_gradients,
    buckets,
    fill_missing_grads,
    grouped,
)
from moetrain.parallel.offload import HostOffload


@dataclass
class _Bucket:
    """Parameters of one gradient group and one owner, reduced together once all are ready."""

    spec: GradSpec
    owner: int
    params: list[nn.Parameter]
    ready: set[nn.Parameter] = field(default_factory=set)


def assign_owners(params: list[nn.Parameter], group_size: int) -> list[int]:
    """Owner (index within the group) of each parameter: contiguous runs in model order, of about
    equal size. Backward finishes the runs one after another, so stage 2 can reduce and free a
    run's gradients early; the AdamW state still falls as 1/DP."""
    sizes = [p.numel() for p in params]
    total = sum(sizes) or 1
    owners, before = [], 0
    for size in sizes:
        owners.append(min(group_size - 1, (2 * before + size) * group_size // (2 * total)))  # by midpoint
        before += size
    return owners


class ZeroOptimizer:
    """Wraps the AdamW that `build_optimizer` made; exposes the same param_groups for the LR schedule."""

    def __init__(self, optimizer: torch.optim.Optimizer, specs: dict[nn.Parameter, GradSpec], stage: int,
                 offload: bool = False, reduce_late: list[nn.Parameter] = ()) -> None:
        """`reduce_late`: parameters whose gradients another step still needs whole after backward
        (a pipeline's tied embedding, summed across stages first); stage 2 reduces them at the end."""
        if stage not in (1, 2):
            raise ValueError(f"ZeRO stage must be 1 or 2 here, got {stage}; stage 0 needs no ZeroOptimizer")
        self.specs, self.stage, self.offload = specs, stage, offload
        self.owner_rank: dict[nn.Parameter, int] = {}  # global rank of each parameter's owner
        self.rank = me = dist.get_rank() if dist.is_initialized() else 0
        for spec, params in grouped(specs).items():
            ranks = dist.get_process_group_ranks(spec.group) if spec.group is not None else [me]
            for param, owner in zip(params, assign_owners(params, len(ranks))):
                self.owner_rank[param] = ranks[owner]
        self.owned = [p for p in specs if self.owner_rank[p] == me]
        owned = set(self.owned)
        self.host = HostOffload(self.owned) if offload else None
        self.master: dict[nn.Parameter, Tensor] = self.host.master if self.host else {}
        groups = [{**{k: v for k, v in g.items() if k != "params"},
                   "params": [self.master.get(p, p) for p in g["params"] if p in owned]}
                  for g in optimizer.param_groups]
        # each group already carries every hyperparameter; the constructor only needs the lr default
        self.inner = type(optimizer)(groups, lr=optimizer.defaults["lr"])
        self.late = [p for p in specs if any(p is q for q in reduce_late)]
        self.reduced: dict[nn.Parameter, Tensor] = {}  # stage 2, owners: gradients summed over ranks
        self.buckets: list[_Bucket] = []
        self.bucket_of: dict[nn.Parameter, _Bucket] = {}
        self._flush_queued = False
        if stage == 2:
            self._attach_hooks()

    def _attach_hooks(self) -> None:
        """Buckets in reverse model order (about the order backward produces gradients)."""
        late = set(self.late)
        for spec, params in grouped(self.specs).items():
            for owner, mine in self._by_owner([p for p in params if p not in late]):
                for run in buckets(list(reversed(mine))):
                    bucket = _Bucket(spec, owner, run)
                    self.buckets.append(bucket)
                    for param in run:
                        self.bucket_of[param] = bucket
                        param.register_post_accumulate_grad_hook(self._grad_ready)

    def _grad_ready(self, param: nn.Parameter) -> None:
        if not self._flush_queued:  # at the end of this backward, reduce what is left
            torch.autograd.Variable._execution_engine.queue_callback(self._flush)
            self._flush_queued = True
        bucket = self.bucket_of[param]
        bucket.ready.add(param)
        if len(bucket.ready) == len(bucket.params):
            self._reduce_bucket(bucket)

    def _flush(self) -> None:
        """Buckets some of whose parameters got no gradient in this backward (idle experts): zeros."""
        self._flush_queued = False
        for bucket in self.buckets:
            if bucket.ready:
                self._reduce_bucket(bucket)

    @torch.no_grad()
    def _reduce_bucket(self, bucket: _Bucket) -> None:
        fill_missing_grads(bucket.params)
        grads = [p.grad for p in bucket.params]
        flat = _flatten_dense_tensors(grads)
        if bucket.spec.size > 1:
            dist.reduce(flat, dst=bucket.owner, group=bucket.spec.group)
        if bucket.owner == self.rank:
            for param, reduced in zip(bucket.params, _unflatten_dense_tensors(flat, grads)):
                total = self.reduced.get(param)
                self.reduced[param] = reduced.clone() if total is None else total.add_(reduced)
        for param in bucket.params:
            param.grad = None
        bucket.ready.clear()

    @property
    def param_groups(self) -> list[dict]:
        return self.inner.param_groups

    def state_of(self, param: nn.Parameter) -> dict[str, Tensor]:
        """AdamW state of an owned parameter (empty before its first step)."""
        return self.inner.state[self.master.get(param, param)]

    def set_state(self, param: nn.Parameter, state: dict[str, Tensor]) -> None:
        target = self.master.get(param, param)
        self.inner.state[target] = {k: v.to(target.device) for k, v in state.items()}
        if param in self.master:
            target.data.copy_(param.detach())

    @torch.no_grad()
    def reduce_gradients(self) -> None:
        """After the last micro-batch: owners hold the mean gradient, everyone else none.

        Stage 1 all-reduces here; stage 2 already reduced during backward (only late parameters
        are left) and divides the owners' sums.
        """
        if self.stage == 1:
            all_reduce_gradients(self.specs)
        else:
            for spec, params in grouped({p: self.specs[p] for p in self.late}).items():
                for owner, mine in self._by_owner(params):
                    bucket = _Bucket(spec, owner, mine)
                    self._reduce_bucket(bucket)
            for param, total in self.reduced.items():
                param.grad = total.div_(self.specs[param].divisor)
            self.reduced = {}
        owned = set(self.owned)
        for param in self.specs:
            if param not in owned:
                param.grad = None

    def _by_owner(self, params: list[nn.Parameter]) -> list[tuple[int, list[nn.Parameter]]]:
        owners = sorted({self.owner_rank[p] for p in params})
        return [(o, [p for p in params if self.owner_rank[p] == o]) for o in owners]

    @torch.no_grad()
    def step(self) -> None:
        """Owners update their parameters, then every group broadcasts the new values from the owners."""
        if self.host:
            self.host.step(self.inner)
        else:
            self.inner.step()
        for spec, params in grouped(self.specs).items():
            if spec.group is None or spec.size == 1:
                continue
            for owner, mine in self._by_owner(params):
                for run in buckets(mine):
                    flat = _flatten_dense_tensors([p.data for p in run])
                    dist.broadcast(flat, src=owner, group=spec.group)
                    if owner != self.rank:
                        for param, value in zip(run, _unflatten_dense_tensors(flat, run)):
                            param.copy_(value)

    def zero_grad(self, set_to_none: bool = True) -> None:
        for param in self.specs:
            param.grad = None
        self.inner.zero_grad(set_to_none=set_to_none)
