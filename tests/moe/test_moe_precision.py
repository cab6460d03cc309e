"""The MoE layer's precision and grouped-GEMM choice, checked on the CPU.

Router in float32 whatever the autocast state; experts in the autocast dtype with float32 master
gradients; real bf16 parameters; bf16 rows with float32 weights; RMSNorm statistics in float32.
The grouped-GEMM backend is chosen from device facts, mocked here; rows that belong to no expert
(dropped assignments keep their place) come out as zeros on every backend.
"""

from __future__ import annotations

import pytest
import torch

import moetrain.moe.experts as experts_module
from moetrain.moe import ExpertBlocks, GroupedExperts, MoE, grouped_gemm_backend
from moetrain.norm import RMSNorm

HIDDEN, FFN, EXPERTS, TOKENS = 32, 48, 8, 96


def _layer(**kwargs) -> MoE:
    torch.manual_seed(0)
    kwargs.setdefault("k", 2)
    layer = MoE(HIDDEN, num_experts=EXPERTS, ffn_hidden_size=FFN, activation="swiglu",
                use_rts=False, top2_2nd_expert_sampling=False, init_std=0.2, **kwargs)
    with torch.no_grad():
        layer.router.wg.weight.normal_(0.0, 0.3)
    return layer


def _run(layer: MoE, x: torch.Tensor, autocast: bool, spy_logits: list):
    """One forward + backward; returns the MoEOutput, the router decision and x.grad."""
    decisions = []
    handle = layer.router.register_forward_hook(lambda mod, args, out: decisions.append(out))
    original = layer.router.compute_logits

    def logits_spy(inp):
        logits = original(inp)
        spy_logits.append(logits)
        return logits

    layer.router.compute_logits = logits_spy
    x = x.detach().clone().requires_grad_()
    layer.zero_grad(set_to_none=True)
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            result = layer(x, with_z_loss=True)
            loss = result.output.float().square().sum() + result.l_aux + result.z_loss
        loss.backward()
    finally:
        handle.remove()
        del layer.router.compute_logits
    return result, decisions[0], x.grad


@pytest.mark.parametrize("drop_tokens", [False, True], ids=["dropless", "capacity"])
def test_bf16_autocast_keeps_router_fp32_and_runs_experts_in_bf16(drop_tokens, monkeypatch):
    layer = _layer(drop_tokens=drop_tokens, capacity_factor=1.0)
    x = torch.randn(TOKENS, HIDDEN, generator=torch.Generator().manual_seed(1))
    logits32, logits16 = [], []
    ref, ref_decision, ref_grad = _run(layer, x, autocast=False, spy_logits=logits32)
    ref_grads = {n: p.grad.clone() for n, p in layer.named_parameters()}

    gemm_dtypes = []
    real_mm, real_grad = experts_module.grouped_mm, experts_module.grouped_weight_grad

    def mm_spy(rows, weights, *args, **kwargs):
        gemm_dtypes.append((rows.dtype, weights.dtype))
        return real_mm(rows, weights, *args, **kwargs)

    def grad_spy(rows, grad, *args, **kwargs):
        gemm_dtypes.append((rows.dtype, grad.dtype))
        return real_grad(rows, grad, *args, **kwargs)

    monkeypatch.setattr(experts_module, "grouped_mm", mm_spy)
    monkeypatch.setattr(experts_module, "grouped_weight_grad", grad_spy)
    got, decision, x_grad = _run(layer, x, autocast=True, spy_logits=logits16)

    # router: float32 and bit-equal to the float32 run
    assert logits16[0].dtype == torch.float32 and torch.equal(logits16[0], logits32[0])
    for name in ("weights", "l_aux", "z_loss"):
        value = getattr(decision, name)
        assert value.dtype == torch.float32, name
        assert torch.equal(value, getattr(ref_decision, name)), name
    assert torch.equal(decision.expert_indices, ref_decision.expert_indices)
    assert torch.equal(decision.kept, ref_decision.kept)
    assert got.l_aux.dtype == got.z_loss.dtype == torch.float32
    assert torch.equal(got.z_loss, ref.z_loss)
    # experts: every GEMM (3 forward... 6 with backward) saw bf16 operands only
    assert len(gemm_dtypes) == 6
    assert all(dtypes == (torch.bfloat16, torch.bfloat16) for dtypes in gemm_dtypes), gemm_dtypes
    # the output keeps the input's dtype; values and gradients within bf16 rounding of fp32
    assert got.output.dtype == torch.float32
    _assert_close_to_scale(got.output, ref.output)
    _assert_close_to_scale(x_grad, ref_grad)
    for name, param in layer.named_parameters():
        assert param.dtype == param.grad.dtype == torch.float32, name  # fp32 master gradients
        _assert_close_to_scale(param.grad, ref_grads[name], msg=name)


def _assert_close_to_scale(got: torch.Tensor, want: torch.Tensor, msg: str = "") -> None:
    """Within a few bf16 roundings (2^-8) of the tensor's largest value."""
    scale = want.abs().max()
    torch.testing.assert_close(got / scale, want / scale, atol=3e-2, rtol=0, msg=msg or None)


def test_real_bf16_parameters_without_autocast():
    bf16 = _layer(drop_tokens=False).to(torch.bfloat16)
    reference = _layer(drop_tokens=False).to(torch.bfloat16).float()  # same bf16 values, fp32 math
    xb = torch.randn(TOKENS, HIDDEN, generator=torch.Generator().manual_seed(2)).bfloat16()
    ref_out, _, _ = reference(xb.float())
    xb.requires_grad_()
    out, l_aux, _ = bf16(xb)
    (out.float().square().sum() + l_aux).backward()
    assert out.dtype == torch.bfloat16 and l_aux.dtype == torch.float32
    assert bf16.experts.w1.grad.dtype == torch.bfloat16 and xb.grad.dtype == torch.bfloat16
    _assert_close_to_scale(out.float(), ref_out)


def test_bf16_rows_with_fp32_weights_compute_in_fp32_without_dtype_error():
    layer = _layer(drop_tokens=True, capacity_factor=1.0)
    x = torch.randn(TOKENS, HIDDEN, generator=torch.Generator().manual_seed(3)).bfloat16()
    out, _, _ = layer(x)
    ref, _, _ = layer(x.float())
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, ref.bfloat16())


def test_rmsnorm_statistics_stay_fp32_under_autocast():
    norm = RMSNorm(HIDDEN, eps=1e-6)
    x = torch.randn(4, HIDDEN) * 30 + 7  # large mean square: bf16 statistics would be visibly off
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = norm(x)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, norm(x), atol=0, rtol=0)


# ---------------------------------------------------------------------------------------------
# Grouped-GEMM backend by device, dtype and torch version (device facts mocked)
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("capability, version, dtype, expected", [
    ((9, 0), (2, 11), torch.bfloat16, "grouped_mm"),   # H100/H200: CUTLASS kernel
    ((10, 0), (2, 11), torch.bfloat16, "grouped_mm"),  # B200
    ((9, 0), (2, 8), torch.bfloat16, "grouped_mm"),
    ((10, 0), (2, 8), torch.bfloat16, "loop"),         # 2.8 has the kernel for sm90 only
    ((8, 0), (2, 11), torch.bfloat16, "loop"),         # A100: aten would loop with a host copy
    ((12, 0), (2, 11), torch.bfloat16, "loop"),
    ((9, 0), (2, 11), torch.float16, "loop"),          # no fast fp16/fp32 kernel on CUDA
    ((9, 0), (2, 11), torch.float32, "loop"),
])
def test_grouped_gemm_backend_on_cuda(monkeypatch, capability, version, dtype, expected):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(experts_module, "_TORCH_VERSION", version)
    if not hasattr(torch, "_grouped_mm"):
        pytest.skip("this torch has no _grouped_mm")
    assert grouped_gemm_backend(torch.device("cuda", 0), dtype) == expected


@pytest.mark.parametrize("dtype, expected", [(torch.float32, "grouped_mm"), (torch.bfloat16, "loop"),
                                             (torch.float16, "loop"), (torch.float64, "loop")])
def test_grouped_gemm_backend_on_cpu(dtype, expected):
    if not hasattr(torch, "_grouped_mm"):
        pytest.skip("this torch has no _grouped_mm")
    assert grouped_gemm_backend(torch.device("cpu"), dtype) == expected


def test_grouped_gemm_backend_without_torch_grouped_mm_loops(monkeypatch):
    monkeypatch.delattr(torch, "_grouped_mm", raising=False)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    assert grouped_gemm_backend(torch.device("cuda", 0), torch.bfloat16) == "loop"
    assert grouped_gemm_backend(torch.device("cpu"), torch.float32) == "loop"


def test_grouped_gemm_backend_unsupported_dtype_names_the_fix():
    with pytest.raises(ValueError, match=r"float8_e4m3fn.*bfloat16"):
        grouped_gemm_backend(torch.device("cpu"), torch.float8_e4m3fn)


# ---------------------------------------------------------------------------------------------
# Rows of no expert (dropped assignments keep their place) on every backend
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["grouped_mm", "loop", "threads"])
def test_rows_of_no_expert_are_zero_with_zero_gradient(backend, monkeypatch):
    counts = [5, 0, 7, 3, 2, 0, 4, 6]
    unused = 9
    torch.manual_seed(4)
    experts = GroupedExperts(len(counts), 16, 24, "swiglu", bias=True)
    with torch.no_grad():
        for p in experts.parameters():
            p.normal_(0.0, 0.4)
    used_blocks = ExpertBlocks.from_counts(counts)
    blocks = ExpertBlocks(used_blocks.ends, torch.cat([used_blocks.expert_of_row,
                                                       torch.full((unused,), len(counts))]))
    rows = torch.randn(sum(counts) + unused, 16)
    route = torch.rand(rows.shape[0]) + 0.1
    grad_out = torch.randn(rows.shape[0], 16)
    threads = torch.get_num_threads()
    if backend == "threads":
        torch.set_num_threads(2)
    else:
        monkeypatch.setattr(experts_module, "grouped_gemm_backend", lambda device, dtype: backend)
    results = []
    try:
        for use in (blocks, used_blocks):
            n = rows.shape[0] if use is blocks else sum(counts)
            experts.zero_grad(set_to_none=True)
            r, w = rows[:n].clone().requires_grad_(), route[:n].clone().requires_grad_()
            with torch.no_grad():  # garbage where no expert writes: must not leak
                r[sum(counts):] = float("nan")
            out = experts(r, use, w)
            out.backward(grad_out[:n])
            results.append([out, r.grad, w.grad] + [p.grad.clone() for p in experts.parameters()])
    finally:
        torch.set_num_threads(threads)
    with_unused, reference = results
    used = sum(counts)
    for got in with_unused[:3]:
        assert torch.count_nonzero(got[used:]) == 0
    for got, want in zip(with_unused[:3], reference[:3]):
        torch.testing.assert_close(got[:used], want)
    for got, want in zip(with_unused[3:], reference[3:]):
        torch.testing.assert_close(got, want)
