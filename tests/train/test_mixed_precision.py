"""bf16/fp16 compute copies of the fp32 master weights (moetrain/mixed_precision.py): the same losses and
weights as plain autocast (which casts the same fp32 values in every forward), bit for bit; close to fp32
within bf16 rounding; the copies written once per optimizer step; fp32 masters in the model and checkpoints."""

import pytest
import torch

import moetrain.train.run as run_module
from moetrain.mixed_precision import ComputeWeights, gemm_weights
from moetrain.train.trainer import Trainer
from tests.helpers import tiny_config


def _config(tmp_path, name, precision, **training):
    cfg = tiny_config(tmp_path, save=name, precision=precision, train_iters=3, lr_decay_style="constant",
                      **training)
    cfg.training.global_batch_size = 8  # 2 micro-batches of 4 per step
    return cfg


def _trained(cfg, monkeypatch, copies: bool) -> tuple[Trainer, list[float]]:
    with monkeypatch.context() as patch:
        if not copies:
            patch.setattr(run_module, "applies_to", lambda precision, zero_stage: False)  # plain autocast
        trainer = Trainer(cfg, quiet=True)
    return trainer, trainer.fit().losses


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_compute_copies_give_plain_autocasts_results_bit_for_bit(tmp_path, monkeypatch, precision):
    with_copies, losses = _trained(_config(tmp_path, "copies", precision), monkeypatch, copies=True)
    plain, plain_losses = _trained(_config(tmp_path, "plain", precision), monkeypatch, copies=False)
    assert isinstance(with_copies.compute_weights, ComputeWeights) and plain.compute_weights is None
    assert losses == plain_losses
    for (name, got), want in zip(with_copies.model.state_dict().items(), plain.model.state_dict().values()):
        assert got.dtype == torch.float32 and torch.equal(got, want), name  # fp32 masters, the same values
    # written from the initial weights, then from each of the 3 steps' (the last read by the final evaluation);
    # never per micro-batch (2 a step)
    assert with_copies.compute_weights.refreshes == 1 + 3


def test_bf16_with_compute_copies_is_close_to_fp32(tmp_path, monkeypatch):
    _, bf16 = _trained(_config(tmp_path, "bf16", "bf16"), monkeypatch, copies=True)
    _, fp32 = _trained(_config(tmp_path, "fp32", "fp32"), monkeypatch, copies=True)
    assert bf16 == pytest.approx(fp32, rel=2e-2)


def test_copies_stand_in_only_inside_a_forward_and_follow_the_masters(tmp_path):
    trainer = Trainer(_config(tmp_path, "run", "bf16"), quiet=True)
    weights = trainer.compute_weights
    slots = gemm_weights(trainer.model)
    names = {f"{type(module).__name__}.{name}" for module, name in slots}
    assert names == {"Linear.weight", "GroupedExperts.w1", "GroupedExperts.w2"}
    routers = [m.router.wg for _, m in trainer.model.moe_layers()]
    assert all(module is not router for module, _ in slots for router in routers)  # routers stay fp32
    assert all(module is not trainer.model.lm_head for module, _ in slots)
    seen = []
    module, name = slots[0]
    module.register_forward_pre_hook(lambda m, args: seen.append(getattr(m, name).dtype))  # after ours
    trainer.train_step()
    assert seen == [torch.bfloat16, torch.bfloat16] and isinstance(getattr(module, name), torch.nn.Parameter)
    assert all(p.dtype == torch.float32 for p in trainer.model.parameters())
    trainer.evaluate()  # the first forward after the step writes the copies from the new masters
    for slot_module, slot_name, copy in ((m, n, c) for m, slots in weights.slots.items() for n, _, c in slots):
        assert torch.equal(copy, getattr(slot_module, slot_name).detach().bfloat16())
    assert weights.refreshes == 2
