"""ZeRO stages 1 and 2: optimizer state (and, in stage 2, gradients) partitioned over data parallel.

Each parameter is owned whole by one rank of its gradient group (dense parameters: the
data-parallel group; expert parameters: their expert-data-parallel group, as DeepSpeed shards
them), assigned largest first to the least loaded rank, so AdamW state per rank falls as 1/DP.
Stage 1 all-reduces gradients and lets owners step; stage 2 reduces each gradient to its owner
only and frees it everywhere else. Owners then broadcast the new values. With `offload` the
owner keeps fp32 master weights and the AdamW state in CPU memory (DeepSpeed's offload_optimizer).
"""

from __future__ import annotations

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


def assign_owners(params: list[nn.Parameter], group_size: int) -> list[int]:
    """Owner (index within the group) of each parameter: greedy, largest first, deterministic."""
    load = [0] * group_size
    owners = [0] * len(params)
    for index in sorted(range(len(params)), key=lambda i: (-params[i].numel(), i)):
        owner = min(range(group_size), key=lambda r: (load[r], r))
        owners[index] = owner
        load[owner] += params[index].numel()
    return owners


class ZeroOptimizer:
    """Wraps the AdamW that `build_optimizer` made; exposes the same param_groups for the LR schedule."""

    def __init__(self, optimizer: torch.optim.Optimizer, specs: dict[nn.Parameter, GradSpec], stage: int,
                 offload: bool = False) -> None:
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
        self.master = {p: p.detach().to("cpu", torch.float32, copy=True).requires_grad_() for p in self.owned} \
            if offload else {}
        groups = [{**{k: v for k, v in g.items() if k != "params"},
                   "params": [self.master.get(p, p) for p in g["params"] if p in owned]}
                  for g in optimizer.param_groups]
        # each group already carries every hyperparameter; the constructor only needs the lr default
        self.inner = type(optimizer)(groups, lr=optimizer.defaults["lr"])

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
        """Stage 1: all-reduce; stage 2: reduce each bucket to its owner. Non-owners drop gradients."""
        if self.stage == 1:
            all_reduce_gradients(self.specs)
        else:
            for spec, params in grouped(self.specs).items():
                fill_missing_grads(params)
                for owner, mine in self._by_owner(params):
                    for run in buckets(mine):
                        grads = [p.grad for p in run]
                        flat = _flatten_dense_tensors(grads)
                        if spec.size > 1:
                            dist.reduce(flat, dst=owner, group=spec.group)
                        if owner == self.rank:
                            flat.div_(spec.divisor)
                            for grad, reduced in zip(grads, _unflatten_dense_tensors(flat, grads)):
                                grad.copy_(reduced)
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
        for param, master in self.master.items():
            master.grad = param.grad.to("cpu", torch.float32) if param.grad is not None else None
        self.inner.step()
        for param, master in self.master.items():
            param.copy_(master)
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
