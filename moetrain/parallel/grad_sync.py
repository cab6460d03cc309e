"""After backward: reduce every gradient over its group, and say which gradients this rank holds.

Plain data parallelism all-reduces, so every rank of a group holds each reduced gradient; ZeRO
reduces each gradient to its one owner in the group, and ZeRO-3 scatters each over the group, so a
reduced gradient element is held `copies / size` times in the world. `held()` gives each (gradient,
copies) for the one global norm either way.
"""

from __future__ import annotations

from torch import nn
from torch.distributed.fsdp import FSDPModule

from moetrain.parallel.data_parallel import GradSpec, OverlappedAllReduce, all_reduce_gradients
from moetrain.parallel.zero import ZeroOptimizer


class GradientSync:
    """The gradient reduction of one run: all-reduce (DP; overlapped with the last micro-batch's backward
    when `overlap`) or reduce to owners (ZeRO, which overlaps stage 2 itself)."""

    def __init__(self, specs: dict[nn.Parameter, GradSpec], optimizer, overlap: bool = False,
                 fully_sharded: FSDPModule | None = None, keep_gathered: bool = False) -> None:
        """`fully_sharded`: the ZeRO-3 root, whose FSDP units reduce-scatter during backward (nothing is left
        to do here). `keep_gathered` (--no-reshard-after-forward, no pipeline): its units stay gathered from
        one micro-batch to the next and are freed after the step's last backward, so none is gathered twice."""
        self.specs, self.fully_sharded = specs, fully_sharded is not None
        self.keep_gathered = fully_sharded if keep_gathered else None
        self.zero = optimizer if isinstance(optimizer, ZeroOptimizer) else None
        self.overlapped = OverlappedAllReduce(specs) if overlap and self.zero is None and not self.fully_sharded \
            else None
        if self.keep_gathered is not None:
            self.keep_gathered.set_reshard_after_backward(False)

    def before_last_backward(self) -> None:
        """Called by the executor just before the step's last backward."""
        if self.keep_gathered is not None:
            self.keep_gathered.set_reshard_after_backward(True)
        if self.overlapped is not None:
            self.overlapped.arm()

    def reduce(self) -> None:
        """Every gradient becomes the mean over data parallel (on the ranks that keep it)."""
        if self.fully_sharded:
            if self.keep_gathered is not None:  # the next step's micro-batches
                self.keep_gathered.set_reshard_after_backward(False)
            return
        if self.zero is not None:
            self.zero.reduce_gradients()
        elif self.overlapped is not None and self.overlapped.armed:
            self.overlapped.finish()
        else:
            all_reduce_gradients(self.specs)

    def held(self) -> list[tuple[nn.Parameter, int]]:
        """(parameter, ranks in the world holding its reduced gradient) for each gradient this rank holds."""
        owners_per_group = self.zero is not None or self.fully_sharded  # each rank of a group holds a part
        return [(p, s.copies // s.size if owners_per_group else s.copies) for p, s in self.specs.items()
                if p.grad is not None]
