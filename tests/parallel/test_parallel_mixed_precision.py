"""bf16 compute copies of the fp32 masters (moetrain/mixed_precision.py) compose with every ZeRO 0-2
layout: in each layout, a bf16 run with the copies equals, bit for bit, the same layout's run with plain
autocast (which casts the same fp32 masters in every forward), losses and every rank's weights."""

from __future__ import annotations

import pytest
import torch

import moetrain.train.run as run_module
from moetrain.config import Config
from moetrain.parallel.pieces import model_pieces
from moetrain.train.trainer import Trainer
from tests.helpers import parallel_config, run_parallel, run_ranks


def _train_rank_plain_autocast(cfg: Config) -> dict:
    """A rank's run without compute copies (every forward casts the fp32 masters): its losses and pieces."""
    run_module.applies_to = lambda precision, zero_stage: False  # this spawned process only
    trainer = Trainer(cfg, quiet=True)
    assert trainer.compute_weights is None
    losses = trainer.fit().losses
    return {"losses": losses, "pieces": {g: (t.clone(), p) for g, t, p in model_pieces(trainer.model).values()}}


LAYOUTS = {
    "ep2-zero2": dict(expert_parallel_size=2, zero_stage=2),
    "zero1-offload": dict(zero_stage=1, offload_optimizer=True),
    "tp2": dict(tensor_parallel_size=2),
    "pp2": dict(pipeline_parallel_size=2),
}


@pytest.mark.parametrize("layout", LAYOUTS)
def test_compute_copies_change_nothing_in_a_layout(tmp_path, layout):
    cfg = parallel_config(tmp_path, **LAYOUTS[layout])
    cfg.training.precision = "bf16"
    cfg.training.train_iters = 2
    with_copies = run_parallel(cfg, 2)
    plain = run_ranks(_train_rank_plain_autocast, cfg, 2)
    for rank, got in with_copies.items():
        assert got["losses"] == plain[rank]["losses"], rank
        for name, (tensor, _) in got["pieces"].items():
            assert tensor.dtype == torch.float32 and torch.equal(tensor, plain[rank]["pieces"][name][0]), name


def _train_rank_fused(cfg: Config) -> dict:
    """A rank's run with the linears' fused weight-gradient path on (as on CUDA): its losses, and how many
    times each tensor-parallel linear's master took its gradient from its GEMM."""
    from moetrain import main_grad
    from moetrain.parallel.tensor_parallel import ColumnParallelLinear, RowParallelLinear

    calls: dict[int, int] = {}
    accumulated = main_grad.accumulated

    def counted(master):
        calls[id(master)] = calls.get(id(master), 0) + 1
        accumulated(master)

    main_grad.fused_kernels, main_grad.accumulated = (lambda device: True), counted  # this spawned process only
    trainer = Trainer(cfg, quiet=True)
    losses = trainer.fit().losses
    parallel = [m.weight for m in trainer.model.modules() if isinstance(m, ColumnParallelLinear | RowParallelLinear)]
    return {"losses": losses, "calls": [calls.get(id(weight), 0) for weight in parallel]}


def test_tensor_parallel_linears_write_their_masters_gradients(tmp_path):
    cfg = parallel_config(tmp_path, tensor_parallel_size=2)
    cfg.training.precision = "bf16"
    cfg.training.train_iters = 2
    fused, unfused = run_ranks(_train_rank_fused, cfg, 2), run_parallel(cfg, 2)
    micro_batches = cfg.training.global_batch_size // cfg.training.micro_batch_size
    for rank, got in fused.items():
        assert got["calls"] and got["calls"] == [2 * micro_batches] * len(got["calls"]), rank
        assert got["losses"] == pytest.approx(unfused[rank]["losses"], rel=1e-2), rank
