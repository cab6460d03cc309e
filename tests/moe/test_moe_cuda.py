"""The MoE layer on an NVIDIA GPU in bf16 (marked `cuda`; skipped without one).

bf16 autocast forward/backward against a float32 reference; no host synchronisation in any
single-device mode (`torch.cuda.set_sync_debug_mode("error")` turns one into an exception);
the profiler shows the CUTLASS grouped GEMM and no `aten::item`. Run: `pytest -m cuda`.
"""

from __future__ import annotations

import pytest
import torch

from moetrain.moe import MoE, grouped_gemm_backend
from moetrain.moe.routing_noise import routing_key
from tests.helpers import ROUTING_MODES, routing_mode_layer

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU"),
]

HIDDEN, FFN, EXPERTS, TOKENS = 256, 512, 8, 2048


def _layer(**kwargs) -> MoE:
    return routing_mode_layer(HIDDEN, FFN, EXPERTS, capacity_factor=1.0, init_std=0.05, **kwargs).cuda()


def _step(layer: MoE, x: torch.Tensor, bf16: bool):
    layer.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_()
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16):
        out, l_aux, z_loss, _ = layer(x, with_z_loss=True)
    (out.float().square().sum() + l_aux + z_loss).backward()
    return out, x.grad


def _needs_cutlass_grouped_mm() -> None:
    if grouped_gemm_backend(torch.device("cuda"), torch.bfloat16) != "grouped_mm":
        pytest.skip("this GPU/torch has no CUTLASS grouped GEMM (compute capability 9.x/10.x): "
                    "the per-expert loop needs the counts on the host")


@pytest.mark.parametrize("drop_tokens", [False, True], ids=["dropless", "capacity"])
def test_bf16_forward_backward_matches_fp32_reference(drop_tokens):
    layer = _layer(k=2, drop_tokens=drop_tokens)
    x = torch.randn(TOKENS, HIDDEN, device="cuda")
    ref_out, ref_grad = _step(layer, x, bf16=False)
    ref_params = {n: p.grad.clone() for n, p in layer.named_parameters()}
    out, grad = _step(layer, x, bf16=True)
    for got, want in [(out, ref_out), (grad, ref_grad),
                      *[(p.grad, ref_params[n]) for n, p in layer.named_parameters()]]:
        assert got.dtype == torch.float32
        scale = want.abs().max()
        torch.testing.assert_close(got / scale, want / scale, atol=2e-2, rtol=0)


@pytest.mark.parametrize("mode", list(ROUTING_MODES))
def test_no_host_sync_in_forward_backward(mode):
    _needs_cutlass_grouped_mm()
    layer = _layer(**ROUTING_MODES[mode])
    x = torch.randn(TOKENS, HIDDEN, device="cuda")
    _step(layer, x, bf16=True)  # warm-up: lazy initialisation may synchronise once
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        _step(layer, x, bf16=True)
        layer.update_expert_bias()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()


@pytest.mark.parametrize("mode", ["second-expert-sampling", "rts", "jitter", "rsample"])
def test_keyed_routing_noise_never_syncs(mode):
    """The trainer's path: a routing key built for each step (pinned, copied without blocking) keys the noise."""
    _needs_cutlass_grouped_mm()
    layer = _layer(**ROUTING_MODES[mode])
    x = torch.randn(TOKENS, HIDDEN, device="cuda")

    def step(iteration: int) -> None:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out, l_aux, _ = layer(x, routing_key=routing_key(0, iteration, 0, "cuda"))
        (out.float().square().sum() + l_aux).backward()

    step(0)  # warm-up: lazy initialisation may synchronise once
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        step(1)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()


def test_profiler_shows_cutlass_grouped_gemm_and_no_item():
    _needs_cutlass_grouped_mm()
    layer = _layer(k=2, drop_policy="position")
    x = torch.randn(TOKENS, HIDDEN, device="cuda")
    _step(layer, x, bf16=True)
    activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=activities) as prof:
        _step(layer, x, bf16=True)
        torch.cuda.synchronize()
    names = [event.key for event in prof.key_averages()]
    assert "aten::_grouped_mm" in names
    assert any("cutlass" in name.lower() for name in names), names
    assert not {"aten::item", "aten::_local_scalar_dense", "aten::nonzero"} & set(names)
