"""--compile: each transformer block torch.compile'd on its own (regional compilation) trains to the same
losses as eager, on a CPU (Inductor's C++ backend: skipped without a C++ compiler)."""

import shutil

import pytest
import torch

from moetrain.train.trainer import Trainer
from tests.helpers import tiny_config

pytestmark = pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None,
                                reason="Inductor's CPU backend needs a C++ compiler")


def test_compiled_blocks_train_to_the_eager_losses(tmp_path):
    losses = {}
    for compiled in (False, True):
        cfg = tiny_config(tmp_path, save=None, train_iters=2, compile=compiled)
        cfg.model.style = "llama"
        cfg.moe.use_rts = False  # routing without torch's RNG stream: compiled and eager draw alike
        torch._dynamo.reset()
        trainer = Trainer(cfg, quiet=True)
        assert all((block._compiled_call_impl is not None) == compiled for block in trainer.model.blocks)
        losses[compiled] = trainer.fit().losses
    assert losses[True] == pytest.approx(losses[False], rel=1e-5)
