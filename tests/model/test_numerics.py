"""--deterministic turns on torch's deterministic algorithms and changes no CPU result; --no-tf32 parses."""

from __future__ import annotations

import torch

from moetrain.config.parser import parse_train_args
from moetrain.train.trainer import train
from tests.helpers import tiny_config


def test_deterministic_run_trains_like_the_default(tmp_path):
    plain = train(tiny_config(tmp_path, save=None, train_iters=3), quiet=True).losses
    assert not torch.are_deterministic_algorithms_enabled()
    try:
        strict = train(tiny_config(tmp_path, save=None, train_iters=3, deterministic=True), quiet=True).losses
        assert torch.are_deterministic_algorithms_enabled()
    finally:
        torch.use_deterministic_algorithms(False)
    assert strict == plain


def test_flags():
    cfg = parse_train_args(["--deterministic", "--no-tf32"])
    assert cfg.training.deterministic and not cfg.training.tf32
    assert parse_train_args([]).training.tf32
