"""The optimizer step's tail: one host sync per step (losses, grad norm and the fp16 overflow flag copied
together), the one-pass global gradient norm, and clipping that leaves gradients unwritten under the
threshold. References: float64 norms and coefficients computed here from the gradients the step saw."""

import math

import pytest
import torch

import moetrain.train.trainer as trainer_module
from moetrain.parallel.data_parallel import clip_gradients, global_grad_norm
from moetrain.train.trainer import Trainer
from tests.helpers import count_host_syncs, tiny_config


@pytest.mark.parametrize("precision,experts", [("fp32", 4), ("fp16", 1)], ids=["fp32-moe", "fp16-dense"])
def test_a_train_step_copies_to_the_host_once(tmp_path, precision, experts):
    # fp16 runs dense: a CPU's fp16 grouped GEMM loops over experts after copying their counts (not a GPU's path)
    cfg = tiny_config(tmp_path, save=None, precision=precision, clip_grad=0.05)
    cfg.moe.num_experts = [experts]
    trainer = Trainer(cfg, quiet=True)
    trainer.train_step()  # AdamW state exists: a steady-state step
    with count_host_syncs() as events:
        step = trainer.train_step()
    assert dict(events) == {"Tensor.tolist": 1}
    assert not step["skipped"] and math.isfinite(step["grad_norm"])


def _recorded_step(trainer: Trainer, monkeypatch) -> tuple[dict, list[torch.Tensor], list[torch.Tensor]]:
    """One train step, with the reduced gradients as they were before clipping and as the optimizer saw them."""
    seen: dict[str, list[torch.Tensor]] = {}
    reduce, step = trainer.grad_sync.reduce, trainer.optimizer.step

    def reduce_and_record():
        reduce()
        seen["reduced"] = [p.grad.clone() for p, _ in trainer.grad_sync.held()]

    def step_and_record(*args, **kwargs):
        seen["stepped"] = [p.grad.clone() for p, _ in trainer.grad_sync.held()]
        return step(*args, **kwargs)

    monkeypatch.setattr(trainer.grad_sync, "reduce", reduce_and_record)
    monkeypatch.setattr(trainer.optimizer, "step", step_and_record)
    return trainer.train_step(), seen["reduced"], seen["stepped"]


@pytest.mark.parametrize("clip_grad", [0.05, 1e6, 0.0], ids=["clipped", "under-threshold", "no-clipping"])
def test_grad_norm_and_clipping_equal_a_float64_reference(tmp_path, monkeypatch, clip_grad):
    trainer = Trainer(tiny_config(tmp_path, save=None, clip_grad=clip_grad), quiet=True)
    clips = []
    monkeypatch.setattr(trainer_module, "clip_gradients", lambda *args: clips.append(clip_gradients(*args)))
    step, reduced, stepped = _recorded_step(trainer, monkeypatch)
    norm = math.sqrt(sum(g.double().square().sum().item() for g in reduced))
    assert step["grad_norm"] == pytest.approx(norm, rel=1e-6)
    coef = min(1.0, clip_grad / (norm + 1e-6)) if clip_grad > 0 else 1.0
    assert (coef < 1) == (clip_grad == 0.05) == (len(clips) == 1)  # under the threshold: not even called
    for before, after in zip(reduced, stepped, strict=True):
        if coef < 1:
            torch.testing.assert_close(after.double(), before.double() * coef, rtol=1e-6, atol=0)
        else:
            assert torch.equal(after, before)  # under the threshold nothing rewrites the gradients


def test_global_grad_norm_counts_each_copy_once_over_dtypes():
    torch.manual_seed(0)
    grads = [(torch.randn(7, 3), 1), (torch.randn(5), 2), (torch.randn(4, 4).bfloat16(), 1),
             (torch.randn(3).bfloat16(), 4), (torch.zeros(2), 1)]
    expected = math.sqrt(sum(g.double().square().sum().item() / copies for g, copies in grads))
    norm = global_grad_norm(iter(grads), world=False, device=torch.device("cpu"))
    assert norm.dtype == torch.float32 and norm.item() == pytest.approx(expected, rel=1e-6)
    assert global_grad_norm(iter(()), world=False, device=torch.device("cpu")).item() == 0.0
