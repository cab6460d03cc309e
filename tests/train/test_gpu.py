"""On a GPU (skipped without one): a bf16 training run with evaluation, and recomputation and the chunked
loss under bf16 autocast, as on the CPU."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from moetrain.config import ModelConfig, MoEConfig
from moetrain.model import GPT
from moetrain.train.trainer import train
from tests.helpers import tiny_config

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def test_bf16_training_with_evaluation(tmp_path):
    cfg = tiny_config(tmp_path, save=None, train_iters=20, eval_interval=10, device="cuda", precision="bf16")
    result = train(cfg, quiet=True)
    assert all(math.isfinite(loss) for loss in result.losses)
    assert result.losses[-1] < result.losses[0] and math.isfinite(result.final_eval_loss)


def _model(granularity: str | None) -> GPT:
    torch.manual_seed(0)
    cfg = ModelConfig(style="llama", num_layers=4, hidden_size=64, num_attention_heads=4, seq_length=32,
                      vocab_size=1000, hidden_dropout=0.1, recompute_granularity=granularity)
    return GPT(cfg, MoEConfig(num_experts=[4], expert_interval=2, topk=2, drop_tokens=False)).cuda().train()


def _loss_and_grads(model: GPT, chunked: bool) -> tuple[torch.Tensor, dict]:
    ids = torch.randint(0, 1000, (4, 32), generator=torch.Generator().manual_seed(1)).cuda()
    torch.manual_seed(5)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = model(ids, ids.roll(-1, 1)) if chunked else model(ids)
        loss = out.lm_loss if chunked else F.cross_entropy(out.logits.float().flatten(0, 1),
                                                           ids.roll(-1, 1).flatten())
    loss.backward()
    return loss.detach(), {n: p.grad.float() for n, p in model.named_parameters() if p.grad is not None}


def test_chunked_loss_and_recompute_on_gpu():
    plain_loss, plain_grads = _loss_and_grads(_model(None), chunked=False)
    for granularity in (None, "full", "selective"):
        loss, grads = _loss_and_grads(_model(granularity), chunked=True)
        torch.testing.assert_close(loss, plain_loss, rtol=2e-2, atol=2e-2)
        for name, grad in plain_grads.items():
            torch.testing.assert_close(grads[name], grad, rtol=5e-2, atol=2e-3, msg=f"{granularity} {name}")


def _master_grads(fused: bool, monkeypatch) -> tuple[dict, int]:
    """The fp32 gradients of every weight with a bf16 compute copy (experts and linears) after two micro-batches,
    with or without the fused weight-gradient paths, and how many times a linear's GEMM wrote its master's."""
    import moetrain.main_grad as main_grad
    from moetrain.mixed_precision import ComputeWeights, gemm_weights

    model = _model(None)
    ComputeWeights(model, torch.bfloat16)
    masters = {id(module._parameters[name]) for module, name in gemm_weights(model)}
    linear_writes = []
    accumulated = main_grad.accumulated  # the experts' backward holds its own reference: linears' calls only
    with monkeypatch.context() as patch:
        patch.setattr(main_grad, "fused_kernels", lambda device: fused)
        patch.setattr(main_grad, "accumulated", lambda master: (linear_writes.append(master), accumulated(master)))
        for seed in (1, 2):  # two micro-batches: the first GEMM writes the gradient, the second adds to it
            ids = torch.randint(0, 1000, (4, 32), generator=torch.Generator().manual_seed(seed)).cuda()
            with torch.autocast("cuda", dtype=torch.bfloat16):
                model(ids, ids.roll(-1, 1)).lm_loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if id(p) in masters}
    return grads, len(linear_writes)


def test_weight_gradients_accumulate_into_the_fp32_masters_on_gpu(monkeypatch):
    (fused, linear_writes), (unfused, none) = _master_grads(True, monkeypatch), _master_grads(False, monkeypatch)
    assert fused.keys() == unfused.keys() and any(n.endswith(".w1") for n in fused)
    assert linear_writes == 2 * sum(not n.endswith((".w1", ".w2")) for n in fused) and none == 0
    for name, grad in fused.items():
        assert grad.dtype == torch.float32
        torch.testing.assert_close(grad, unfused[name], rtol=2e-2, atol=1e-4, msg=name)
