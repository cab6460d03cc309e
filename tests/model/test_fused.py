"""The GPU's fused ops (moetrain/fused.py) against the CPU's reference paths: the chunked LM loss, the
hand-written RMSNorm, apply_rope and the experts' SwiGLU. The fused path is forced on here (its bodies run
eager on a CPU, as plain torch code); on a GPU the same bodies run compiled (the cuda test)."""

import shutil

import pytest
import torch
import torch.nn.functional as F

import moetrain.lm_loss as lm_loss_module
import moetrain.moe.experts as experts_module
import moetrain.norm as norm_module
from moetrain.attention import apply_rope
from moetrain.config import ModelConfig, MoEConfig
from moetrain.fused import (
    lm_chunk_body,
    rms_norm,
    rope,
    route_weight_backward,
    swiglu,
    swiglu_backward,
    swiglu_backward_body,
    swiglu_body,
)
from moetrain.lm_loss import IGNORE_INDEX, linear_cross_entropy
from moetrain.model import GPT
from moetrain.moe import ExpertBlocks, GroupedExperts
from moetrain.moe.experts import MLP
from moetrain.norm import RMSNorm


def _loss_inputs(rows=37, hidden=16, vocab=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(rows, hidden, generator=g)
    w = torch.randn(vocab, hidden, generator=g) * 0.5
    t = torch.randint(50, (rows,), generator=g)  # 50 tokens, 14 padding rows in the head
    t[[3, rows - 2]] = IGNORE_INDEX
    return h, w, t


def _loss_and_grads(h, w, t, **kwargs):
    h, w = h.clone().requires_grad_(), w.clone().requires_grad_()
    loss = linear_cross_entropy(h, w, t, classes=50, **kwargs)
    (2.0 * loss).backward()
    return loss.detach(), h.grad, w.grad


@pytest.mark.parametrize("chunk_rows", [5, 37])
def test_fused_lm_loss_path_equals_the_reference_path(monkeypatch, chunk_rows):
    h, w, t = _loss_inputs()
    reference = _loss_and_grads(h, w, t, chunk_bytes=4 * 64 * chunk_rows)
    monkeypatch.setattr(lm_loss_module, "fused_kernels", lambda device: True)
    fused = _loss_and_grads(h, w, t, chunk_bytes=4 * 64 * chunk_rows)
    for got, want in zip(fused, reference, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)
    assert not fused[2][50:].any()  # padding rows: no gradient


def _tied_head_grad(monkeypatch, fused: bool, hooked: bool = False) -> tuple[torch.Tensor, list]:
    """Two micro-batches through a tied embedding and LM head: the head weight's accumulated gradient."""
    h, w, t = _loss_inputs()
    weight = torch.nn.Parameter(w)
    fired = []
    if hooked:
        weight.register_post_accumulate_grad_hook(lambda p: fired.append(p.grad.clone()))
    with monkeypatch.context() as patch:
        patch.setattr(lm_loss_module, "fused_kernels", lambda device: fused)
        for micro_batch in range(2):
            ids = torch.randint(50, (37,), generator=torch.Generator().manual_seed(micro_batch))
            hidden = F.embedding(ids, weight) * 0.7 + h
            (0.5 * linear_cross_entropy(hidden, weight, t, classes=50, chunk_bytes=4 * 64 * 5)).backward()
    return weight.grad, fired


def test_fused_lm_head_scales_its_gradient_straight_into_the_weights(monkeypatch):
    """On the fused path the head's scaled fp32 gradient goes into weight.grad itself and the tied embedding's
    part is added there by AccumulateGrad: the same sums as autograd's. With a post-accumulate hook watching
    the weight (data-parallel overlap, ZeRO-2), autograd keeps the job, and the hook fires once a backward
    with the whole gradient."""
    reference, _ = _tied_head_grad(monkeypatch, fused=False)
    calls = []
    writes = lm_loss_module._writes_its_own_grad
    monkeypatch.setattr(lm_loss_module, "_writes_its_own_grad", lambda weight: calls.append(writes(weight)) or
                        calls[-1])
    fused, _ = _tied_head_grad(monkeypatch, fused=True)
    assert calls == [True, True]
    torch.testing.assert_close(fused, reference, rtol=1e-6, atol=1e-7)
    calls.clear()
    hooked, fired = _tied_head_grad(monkeypatch, fused=True, hooked=True)
    assert calls == [False, False] and len(fired) == 2
    torch.testing.assert_close(hooked, reference, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(fired[-1], reference, rtol=1e-6, atol=1e-7)


def test_lm_chunk_body_by_float64():
    h, w, t = _loss_inputs(rows=9)
    logits = h.double() @ w.double().t()
    loss_rows, grad = lm_chunk_body(logits.float(), t, 50)
    kept = t != IGNORE_INDEX
    log_probs = torch.log_softmax(logits[:, :50], dim=1)
    want = -log_probs.gather(1, t.where(kept, 0).unsqueeze(1)).squeeze(1) * kept
    torch.testing.assert_close(loss_rows.double(), want, rtol=1e-6, atol=1e-6)
    want_grad = torch.zeros_like(logits)
    want_grad[:, :50] = log_probs.exp()
    want_grad[torch.arange(9)[kept], t[kept]] -= 1
    want_grad[~kept] = 0
    torch.testing.assert_close(grad.double(), want_grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_rms_norm_equals_the_hand_written_one(monkeypatch, dtype):
    torch.manual_seed(0)
    norm = RMSNorm(24, eps=1e-5)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    x = torch.randn(3, 5, 24).to(dtype)
    grad = torch.randn(3, 5, 24).to(dtype)
    results = []
    for fused in (False, True):
        monkeypatch.setattr(norm_module, "fused_kernels", lambda device, fused=fused: fused)
        xi = x.clone().requires_grad_()
        norm.weight.grad = None
        out = norm(xi)
        out.backward(grad)
        results.append((out.detach(), xi.grad, norm.weight.grad.clone()))
    tolerance = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-2)
    for got, want in zip(results[1], results[0], strict=True):
        assert got.dtype == want.dtype
        torch.testing.assert_close(got, want, **tolerance)


def test_blocks_sum_the_residual_gradient_inside_the_fused_norm_backward(monkeypatch):
    """A llama-style model: with the fused norm, each block's two norms take x's residual gradient into their
    backward op (no separate sum), and every output and gradient equals the reference path's."""
    cfg = ModelConfig(style="llama", num_layers=2, hidden_size=32, num_attention_heads=4, seq_length=16,
                      vocab_size=64)
    model = GPT(cfg, MoEConfig(num_experts=[4], expert_interval=2, topk=2, drop_tokens=False), seed=0)
    ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(1))
    results, residual_grads = [], []
    backward_op = norm_module.rms_norm_backward
    monkeypatch.setattr(norm_module, "rms_norm_backward", lambda *args: residual_grads.append(args[4].shape)
                        or backward_op(*args))
    for fused in (False, True):
        monkeypatch.setattr(norm_module, "fused_kernels", lambda device, fused=fused: fused)
        model.zero_grad(set_to_none=True)
        torch.manual_seed(0)  # the same dropout masks
        loss = model(ids, ids.roll(-1, 1)).lm_loss
        loss.backward()
        results.append([loss.detach()] + [p.grad for p in model.parameters()])
    assert residual_grads == [(2, 16, 32)] * 4  # two norms in each of two blocks
    for got, want in zip(results[1], results[0], strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_fused_rope_and_its_gradient_equal_apply_rope():
    torch.manual_seed(0)
    x = torch.randn(2, 7, 3, 8).transpose(1, 2)  # [B, H, T, D], a strided view, as q and k are
    cos, sin = torch.randn(7, 8), torch.randn(7, 8)
    grad = torch.randn(2, 7, 3, 8).transpose(1, 2)
    outs = []
    for fn in (apply_rope, rope):
        xi = x.detach().clone().requires_grad_()
        out = fn(xi, cos, sin)
        out.backward(grad)
        outs.append((out.detach(), xi.grad))
    for got, want in zip(outs[1], outs[0], strict=True):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    assert rms_norm is not None  # the ops are registered under torch.ops.moetrain
    assert hasattr(torch.ops.moetrain, "lm_chunk_grad") and hasattr(torch.ops.moetrain, "rope")


def _swiglu_by_float64(h, grad_act):
    """silu(gate) * up and its gradient in float64 by autograd."""
    wide = h.double().requires_grad_()
    gate, up = wide.chunk(2, dim=-1)
    act = F.silu(gate) * up
    act.backward(grad_act.double())
    return act.detach(), wide.grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_swiglu_bodies_and_ops_by_float64(dtype):
    g = torch.Generator().manual_seed(0)
    h = (torch.randn(3, 5, 16, generator=g) * 3).to(dtype)  # gates well into both tails of silu
    grad_act = torch.randn(3, 5, 8, generator=g).to(dtype)
    want_act, want_grad = _swiglu_by_float64(h, grad_act)
    tolerance = dict(rtol=1e-6, atol=1e-6) if dtype == torch.float32 else dict(rtol=8e-3, atol=1e-2)
    for act, (again, grad_h) in ((swiglu_body(h), swiglu_backward_body(h, grad_act)),
                                 (swiglu(h), swiglu_backward(h, grad_act))):
        assert act.dtype == again.dtype == grad_h.dtype == dtype
        assert grad_h.shape == h.shape
        torch.testing.assert_close(act.double(), want_act, **tolerance)
        torch.testing.assert_close(again, act, rtol=0, atol=0)
        torch.testing.assert_close(grad_h.double(), want_grad, **tolerance)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_route_weight_backward_by_float64(dtype):
    g = torch.Generator().manual_seed(0)
    grad_y, o = torch.randn(9, 16, generator=g).to(dtype), torch.randn(9, 16, generator=g).to(dtype)
    weight = torch.rand(9, generator=g) + 0.1
    o64, w64 = o.double().requires_grad_(), weight.double().requires_grad_()
    (o64 * w64.unsqueeze(1)).backward(grad_y.double())
    grad_o, grad_w = route_weight_backward(grad_y, o, weight)
    assert grad_o.dtype == dtype and grad_w.dtype == torch.float32
    tolerance = dict(rtol=1e-6, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(grad_o.double(), o64.grad, **tolerance)
    torch.testing.assert_close(grad_w.double(), w64.grad, rtol=1e-5, atol=1e-5)  # fp32 sums, even from bf16


def test_swiglu_op_gradcheck():
    h = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(swiglu, (h,))


def _swiglu_experts_run(experts, rows, blocks, route, grad_out):
    experts.zero_grad(set_to_none=True)
    r, w = rows.clone().requires_grad_(), route.clone().requires_grad_()
    out = experts(r, blocks, w)
    out.backward(grad_out)
    return [out.detach(), r.grad, w.grad] + [p.grad for p in experts.parameters()]


def _count_fused_calls(monkeypatch) -> list[str]:
    """Force the fused path in experts.py and record each fused op it calls."""
    calls = []
    for name in ("swiglu", "swiglu_backward", "route_weight_backward"):
        op = getattr(experts_module, name)
        monkeypatch.setattr(experts_module, name, lambda *args, op=op, name=name: calls.append(name) or op(*args))
    monkeypatch.setattr(experts_module, "fused_kernels", lambda device: True)
    return calls


@pytest.mark.parametrize("threads", [1, 2], ids=["grouped", "threaded"])
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
def test_fused_swiglu_experts_equal_the_reference_path(monkeypatch, bias, threads):
    counts = [7, 0, 12, 1, 0, 9, 3, 5]  # uneven, with empty experts; 4 more rows of no expert
    n = sum(counts) + 4
    torch.manual_seed(0)
    experts = GroupedExperts(len(counts), 16, 24, "swiglu", bias=bias)
    with torch.no_grad():
        for p in experts.parameters():
            p.normal_(0, 0.4)
    ends = torch.tensor(counts).cumsum(0).to(torch.int32)
    expert_of_row = torch.repeat_interleave(torch.arange(len(counts) + 1), torch.tensor(counts + [4]))
    blocks = ExpertBlocks(ends, expert_of_row, counts)
    rows, route, grad_out = torch.randn(n, 16), torch.rand(n) + 0.1, torch.randn(n, 16)
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        assert experts_module.use_expert_threads(rows, len(counts)) == (threads == 2)
        reference = _swiglu_experts_run(experts, rows, blocks, route, grad_out)
        calls = _count_fused_calls(monkeypatch)
        fused = _swiglu_experts_run(experts, rows, blocks, route, grad_out)
    finally:
        torch.set_num_threads(previous_threads)
    # the forward's activation, backward's (act, grad_h), the routing weight's backward
    assert set(calls) == {"swiglu", "swiglu_backward", "route_weight_backward"}
    for got, want in zip(fused, reference, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert not fused[0][-4:].any() and not fused[1][-4:].any()  # rows of no expert


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_swiglu_mlp_equals_the_reference_path(monkeypatch, dtype):
    torch.manual_seed(0)
    mlp = MLP(12, 20, "swiglu", bias=True).to(dtype)
    x, grad = torch.randn(2, 5, 12).to(dtype), torch.randn(2, 5, 12).to(dtype)
    results = []
    for fused in (False, True):
        calls = _count_fused_calls(monkeypatch) if fused else []
        mlp.zero_grad(set_to_none=True)
        xi = x.clone().requires_grad_()
        out = mlp(xi)
        out.backward(grad)
        results.append([out.detach(), xi.grad] + [p.grad for p in mlp.parameters()])
    assert calls == ["swiglu"]  # its autograd runs the backward op inside torch.ops.moetrain.swiglu
    tolerance = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    for got, want in zip(results[1], results[0], strict=True):
        assert got.dtype == dtype
        torch.testing.assert_close(got, want, **tolerance)


@pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None, reason="no C++ compiler")
def test_compiled_lm_chunk_body_equals_eager():
    h, w, t = _loss_inputs(rows=12)
    logits = h @ w.t()
    compiled = torch.compile(lm_chunk_body, fullgraph=True, dynamic=False)
    for got, want in zip(compiled(logits, t, 50), lm_chunk_body(logits, t, 50), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_compiled_fused_ops_on_cuda_equal_the_cpu_reference():
    h, w, t = _loss_inputs(rows=4096, hidden=64, vocab=1024)
    t = t.clamp(max=999)
    reference = _loss_and_grads(h, w, t)
    on_gpu = _loss_and_grads(h.cuda(), w.cuda(), t.cuda())
    for got, want in zip(on_gpu, reference, strict=True):
        torch.testing.assert_close(got.cpu(), want, rtol=1e-4, atol=1e-5)
    x = torch.randn(4, 16, 64)
    norm = RMSNorm(64, eps=1e-5)
    torch.testing.assert_close(norm.cuda()(x.cuda()).cpu(), norm.cpu()(x), rtol=1e-5, atol=1e-5)
    cos, sin = torch.randn(16, 64), torch.randn(16, 64)
    torch.testing.assert_close(rope(x.cuda(), cos.cuda(), sin.cuda()).cpu(), apply_rope(x, cos, sin),
                               rtol=1e-5, atol=1e-5)
    h, grad_act = torch.randn(4, 16, 128).bfloat16(), torch.randn(4, 16, 64).bfloat16()
    torch.testing.assert_close(swiglu(h.cuda()).cpu(), swiglu_body(h), rtol=1e-2, atol=1e-2)
    for got, want in zip(swiglu_backward(h.cuda(), grad_act.cuda()), swiglu_backward_body(h, grad_act), strict=True):
        assert got.dtype == torch.bfloat16
        torch.testing.assert_close(got.cpu(), want, rtol=1e-2, atol=1e-2)
