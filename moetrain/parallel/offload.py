"""ZeRO optimizer offload: fp32 master weights and AdamW state in host memory, moved in flat buckets.

The owned parameters are cut into buckets of one dtype (about BUCKET_BYTES each). Per bucket the
host holds one flat fp32 master buffer (AdamW steps views of it), one flat buffer for the incoming
gradients and, when the parameters are not fp32, one for the outgoing values in their dtype. So a
step moves each bucket with one copy each way instead of one per parameter:

  1. every bucket's gradients are flattened on the device and queued to the host at once;
  2. bucket by bucket, once its gradients have landed, AdamW steps its masters on the CPU while the
     later buckets are still arriving and the earlier ones' new values travel back;
  3. the device waits for a bucket's values before anything reads its parameters again.

`Transfers` is the one place that differs by device: on CUDA, non-blocking copies on a side stream
from pinned memory, ordered by events; elsewhere plain copies, in the same order, so the CPU runs
exactly the code path (and the numbers) of the per-parameter offload it replaces.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from moetrain.parallel.data_parallel import BUCKET_BYTES, buckets

Done = torch.cuda.Event | None  # marks the end of a queued copy; None: it already happened


class Transfers:
    """Copies between the parameters' device and host memory, chosen by device in this one place."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None

    def host_buffer(self, numel: int, dtype: torch.dtype) -> Tensor:
        """Pinned on CUDA, so copies from and to it can run asynchronously."""
        return torch.empty(numel, dtype=dtype, pin_memory=self.stream is not None)

    def copy(self, dst: Tensor, src: Tensor) -> Done:
        """Queue `dst.copy_(src)` behind the work already queued on the device."""
        if self.stream is None:
            dst.copy_(src)
            return None
        self.stream.wait_stream(torch.cuda.current_stream(self.device))  # src is written, dst free
        with torch.cuda.stream(self.stream):
            dst.copy_(src, non_blocking=True)
        for tensor in (dst, src):
            if tensor.is_cuda:  # the allocator must not hand it out again before the copy ends
                tensor.record_stream(self.stream)
        done = torch.cuda.Event()
        done.record(self.stream)
        return done

    @staticmethod
    def host_wait(done: Done) -> None:
        """Block the CPU until the copy ended (before reading or rewriting its host buffer)."""
        if done is not None:
            done.synchronize()

    def device_wait(self, done: Done) -> None:
        """Make the device's later work wait for the copy, without blocking the CPU."""
        if done is not None:
            torch.cuda.current_stream(self.device).wait_event(done)


@dataclass
class _HostBucket:
    params: list[nn.Parameter]
    master: Tensor  # flat fp32; `masters` are views of it
    masters: list[Tensor]
    grads: Tensor  # flat, the parameters' dtype
    outgoing: Tensor | None  # flat, the parameters' dtype; None when that is fp32 (`master` goes out)
    returned: Done = None  # the last copy out of `outgoing` / `master`


class HostOffload:
    """Host master copies of `params` and the bucketed traffic of one optimizer step."""

    def __init__(self, params: list[nn.Parameter], bucket_bytes: int = BUCKET_BYTES) -> None:
        self.transfers = Transfers(params[0].device if params else torch.device("cpu"))
        self.buckets: list[_HostBucket] = []
        self.master: dict[nn.Parameter, Tensor] = {}
        for run in buckets(params, bucket_bytes):
            self.buckets.append(bucket := self._bucket(run))
            self.master.update(zip(run, bucket.masters))

    def _bucket(self, params: list[nn.Parameter]) -> _HostBucket:
        numel, dtype = sum(p.numel() for p in params), params[0].dtype
        master = self.transfers.host_buffer(numel, torch.float32)
        masters = _unflatten_dense_tensors(master, params)
        for view, param in zip(masters, params):
            view.copy_(param.detach())
        outgoing = None if dtype == torch.float32 else self.transfers.host_buffer(numel, dtype)
        return _HostBucket(params, master, list(masters), self.transfers.host_buffer(numel, dtype), outgoing)

    @torch.no_grad()
    def step(self, optimizer: torch.optim.Optimizer) -> None:
        """Step `optimizer` (over the masters) with the parameters' gradients; write the results back.

        A parameter without a gradient is skipped, as the optimizer skips it."""
        arrived = [self.transfers.copy(b.grads, _flatten_dense_tensors(
            [p.grad if p.grad is not None else torch.zeros_like(p) for p in b.params])) for b in self.buckets]
        for bucket, done in zip(self.buckets, arrived):
            self.transfers.host_wait(done)
            grads = _unflatten_dense_tensors(bucket.grads, bucket.params)
            for param, master, grad in zip(bucket.params, bucket.masters, grads):
                master.grad = None if param.grad is None else grad.to(torch.float32)
            self.transfers.host_wait(bucket.returned)  # last step's values have left the host buffer
            optimizer.step()  # only this bucket's masters have gradients: the others are skipped
            for master in bucket.masters:
                master.grad = None
            self._send_back(bucket)

    def _send_back(self, bucket: _HostBucket) -> None:
        source = bucket.master if bucket.outgoing is None else bucket.outgoing.copy_(bucket.master)
        flat = torch.empty(source.shape, dtype=source.dtype, device=self.transfers.device)
        bucket.returned = self.transfers.copy(flat, source)
        self.transfers.device_wait(bucket.returned)
        torch._foreach_copy_(bucket.params, list(_unflatten_dense_tensors(flat, bucket.params)))
