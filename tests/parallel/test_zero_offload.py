"""ZeRO optimizer offload moves flat buckets, not parameters, and steps exactly as before.

The reference is the per-parameter offload it replaced (an fp32 host copy of each parameter,
its gradient copied and cast one by one, each value copied back) and plain AdamW on the device.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from moetrain.parallel.data_parallel import GradSpec
from moetrain.parallel.offload import HostOffload, Transfers
from moetrain.parallel.zero import ZeroOptimizer

HYPER = {"lr": 1e-2, "betas": (0.9, 0.95), "eps": 1e-8}


def make_params(device: str = "cpu", bf16: bool = True) -> list[nn.Parameter]:
    gen = torch.Generator().manual_seed(0)
    shapes = [(8, 16), (16,), (4, 4, 4), (32,), (8, 8), (3,)]
    params = [nn.Parameter(torch.randn(s, generator=gen)) for s in shapes]
    if bf16:  # the low-precision run: master weights stay fp32 on the host
        params[3].data, params[4].data = params[3].data.bfloat16(), params[4].data.bfloat16()
    return [nn.Parameter(p.detach().to(device)) for p in params]


def adamw(params: list[torch.Tensor]) -> torch.optim.AdamW:
    groups = [{"params": params[:3], "weight_decay": 0.1}, {"params": params[3:], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, **HYPER, fused=True)


def set_grads(params: list[nn.Parameter], step: int) -> None:
    gen = torch.Generator().manual_seed(100 + step)
    for i, p in enumerate(params):
        grad = torch.randn(p.shape, generator=gen).to(p.device, p.dtype)
        p.grad = None if (i == 1 and step == 1) else grad  # a parameter no token reached this step


def per_parameter_offload(params: list[nn.Parameter], steps: int) -> None:
    """The offload before bucketing: one host copy and one copy each way per parameter."""
    masters = [p.detach().to("cpu", torch.float32, copy=True).requires_grad_() for p in params]
    optimizer = adamw(masters)
    for step in range(steps):
        set_grads(params, step)
        for p, m in zip(params, masters):
            m.grad = p.grad.to("cpu", torch.float32) if p.grad is not None else None
        optimizer.step()
        with torch.no_grad():
            for p, m in zip(params, masters):
                p.copy_(m)


def bucketed_offload(params: list[nn.Parameter], steps: int, bucket_bytes: int) -> HostOffload:
    offload = HostOffload(params, bucket_bytes)
    optimizer = adamw([offload.master[p] for p in params])
    for step in range(steps):
        set_grads(params, step)
        offload.step(optimizer)
    return offload


@pytest.mark.parametrize("bucket_bytes", [1, 200, 2**20], ids=["bucket-per-param", "few", "one-per-dtype"])
def test_bucketed_offload_is_bit_identical_to_per_parameter_offload(bucket_bytes):
    expected, got = make_params(), make_params()
    per_parameter_offload(expected, steps=3)
    bucketed_offload(got, steps=3, bucket_bytes=bucket_bytes)
    for e, g in zip(expected, got):
        assert g.dtype == e.dtype and torch.equal(g, e)


def test_fp32_offload_is_bit_identical_to_adamw_on_the_parameters():
    expected, got = make_params(bf16=False), make_params(bf16=False)
    optimizer = adamw(expected)
    for step in range(3):
        set_grads(expected, step)
        optimizer.step()
    offload = bucketed_offload(got, steps=3, bucket_bytes=256)
    for e, g in zip(expected, got):
        assert torch.equal(g, e)
        assert torch.equal(offload.master[g], e)  # the masters are views of the flat host buffers


def test_one_copy_each_way_per_bucket_not_per_parameter(monkeypatch):
    copies = []
    plain = Transfers.copy
    monkeypatch.setattr(Transfers, "copy", lambda self, dst, src: copies.append(src.numel()) or plain(self, dst, src))
    params = make_params()
    offload = HostOffload(params, bucket_bytes=200)
    copies.clear()  # building the masters copies nothing through Transfers either
    offload.step(adamw([offload.master[p] for p in params]))
    sizes = [sum(p.numel() for p in b.params) for b in offload.buckets]
    assert 1 < len(offload.buckets) < len(params)
    assert copies == sizes + sizes  # every gradient bucket out, then every value bucket back


def zero_step(params: list[nn.Parameter], offload: bool, steps: int = 3) -> None:
    specs = {p: GradSpec(group=None, size=1, copies=1, divisor=1) for p in params}
    zero = ZeroOptimizer(adamw(params), specs, stage=1, offload=offload)
    for step in range(steps):
        set_grads(params, step)
        zero.reduce_gradients()
        zero.step()
        if offload:  # the state lives with the host masters, not the parameters
            assert all(zero.state_of(p)["exp_avg"].device.type == "cpu" for p in params if zero.state_of(p))


def test_zero_offload_step_equals_zero_step_without_offload():
    expected, got = make_params(bf16=False), make_params(bf16=False)
    zero_step(expected, offload=False)
    zero_step(got, offload=True)
    for e, g in zip(expected, got):
        assert torch.equal(g, e)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_offload_step_equals_non_offload_step():
    on_host, on_device = make_params("cuda", bf16=False), make_params("cuda", bf16=False)
    zero_step(on_host, offload=True)
    zero_step(on_device, offload=False)
    cpu_reference = make_params(bf16=False)
    zero_step(cpu_reference, offload=True)
    for host, device, cpu in zip(on_host, on_device, cpu_reference):
        assert host.device.type == "cuda"
        torch.testing.assert_close(host, device, rtol=1e-5, atol=1e-6)  # CPU vs CUDA AdamW kernels
        assert torch.equal(host.cpu(), cpu)  # the same host AdamW on the same gradients, moved async
