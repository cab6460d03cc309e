"""The chunked LM loss equals the plain fp32 cross entropy of whole logits, value and gradients."""

import pytest
import torch
import torch.nn.functional as F

from moetrain.lm_loss import IGNORE_INDEX, linear_cross_entropy


def _inputs(rows=37, hidden=16, vocab=50, ignored=(3, 20), seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(rows, hidden, generator=g, dtype=torch.float64)
    w = torch.randn(vocab, hidden, generator=g, dtype=torch.float64) * 0.5
    t = torch.randint(vocab, (rows,), generator=g)
    t[list(ignored)] = IGNORE_INDEX
    return h, w, t


def _grads(loss_fn, h, w, t, dtype):
    h, w = h.detach().to(dtype).requires_grad_(), w.detach().to(dtype).requires_grad_()
    loss = loss_fn(h, w, t)
    (3.0 * loss).backward()  # a scaled loss, as fp16 loss scaling or a weighted sum gives
    return loss.detach().double(), h.grad.double(), w.grad.double()


def _reference(h, w, t):  # float64, whole logits: the independent reference
    return F.cross_entropy(h @ w.t(), t, ignore_index=IGNORE_INDEX)


@pytest.mark.parametrize("chunk_rows", [1, 5, 37, 100])
def test_chunked_loss_and_gradients_equal_whole_logits(chunk_rows):
    h, w, t = _inputs()
    want = _grads(_reference, h, w, t, torch.float64)
    got = _grads(lambda h, w, t: linear_cross_entropy(h, w, t, chunk_bytes=4 * 50 * chunk_rows),
                 h, w, t, torch.float32)
    for g, r in zip(got, want):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-6)


def test_batched_hidden_and_no_ignored_targets():
    h, w, t = _inputs(rows=24, ignored=())
    loss = linear_cross_entropy(h.float().view(2, 12, -1), w.float(), t.view(2, 12), chunk_bytes=4 * 50 * 7)
    torch.testing.assert_close(loss.double(), _reference(h, w, t), rtol=1e-6, atol=1e-6)


def test_without_grad_gives_the_same_loss_and_keeps_nothing():
    h, w, t = _inputs()
    w32 = w.float().requires_grad_()
    with torch.no_grad():
        loss = linear_cross_entropy(h.float(), w32, t, chunk_bytes=4 * 50 * 8)
    assert loss.grad_fn is None
    torch.testing.assert_close(loss.double(), _reference(h, w, t), rtol=1e-6, atol=1e-6)


def test_all_targets_ignored_gives_zero_loss_and_gradient():
    h, w, t = _inputs(rows=4, ignored=(0, 1, 2, 3))
    loss, grad_h, grad_w = _grads(linear_cross_entropy, h, w, t, torch.float32)
    assert loss == 0 and not grad_h.any() and not grad_w.any()


def test_autocast_projects_in_bf16_and_normalises_in_fp32():
    h, w, t = _inputs(rows=16, ignored=())
    h32, w32 = h.float().requires_grad_(), w.float().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = linear_cross_entropy(h32, w32, t, chunk_bytes=4 * 50 * 5)
        plain = F.cross_entropy((h32 @ w32.t()).float(), t)  # bf16 logits under autocast, then fp32
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, plain, rtol=1e-6, atol=1e-6)
    loss.backward()
    assert h32.grad.dtype == torch.float32 and w32.grad.dtype == torch.float32
    ref = _grads(_reference, h, w, t, torch.float64)
    torch.testing.assert_close(w32.grad.double(), ref[2] / 3, rtol=0.05, atol=0.02)


@pytest.mark.parametrize("style", ["gpt", "llama"])
def test_model_loss_and_gradients_equal_the_plain_loss_of_its_logits(style):
    from moetrain.config import ModelConfig, MoEConfig
    from moetrain.model import GPT

    torch.manual_seed(0)
    cfg = ModelConfig(style=style, num_layers=2, hidden_size=32, num_attention_heads=4, seq_length=16,
                      vocab_size=300)
    model = GPT(cfg, MoEConfig(num_experts=[4], expert_interval=2, topk=2, drop_tokens=False, use_rts=False))
    ids, targets = torch.randint(0, 300, (2, 2, 16), generator=torch.Generator().manual_seed(1))
    results = []
    for fused in (True, False):
        model.zero_grad()
        torch.manual_seed(2)
        out = model(ids, targets) if fused else model(ids)
        loss = out.lm_loss if fused else F.cross_entropy(out.logits.float().flatten(0, 1), targets.flatten())
        (loss + 0.1 * out.aux_loss).backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (fused_loss, fused_grads), (plain_loss, plain_grads) = results
    torch.testing.assert_close(fused_loss, plain_loss, rtol=1e-6, atol=1e-6)
    for name, grad in plain_grads.items():
        torch.testing.assert_close(fused_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("chunk_rows", [5, 100])
def test_padding_columns_are_never_predicted(chunk_rows):
    """A head padded past the vocabulary: the loss and gradients of the first `classes` rows alone (float64),
    zero gradient for the padding rows, however large their logits."""
    h, w, t = _inputs(ignored=(3,))
    padded = torch.cat([w, 5.0 + torch.randn(14, w.shape[1], dtype=torch.float64)])
    want = _grads(_reference, h, w, t, torch.float64)
    loss, grad_h, grad_w = _grads(lambda h, w, t: linear_cross_entropy(
        h, w, t, classes=50, chunk_bytes=4 * 64 * chunk_rows), h, padded, t, torch.float32)
    torch.testing.assert_close(loss, want[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad_h, want[1], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad_w[:50], want[2], rtol=1e-5, atol=1e-6)
    assert not grad_w[50:].any()
    with torch.no_grad():
        unrecorded = linear_cross_entropy(h.float(), padded.float(), t, classes=50, chunk_bytes=4 * 64 * chunk_rows)
    torch.testing.assert_close(unrecorded.double(), want[0], rtol=1e-5, atol=1e-6)
