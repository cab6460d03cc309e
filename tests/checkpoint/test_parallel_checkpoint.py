"""Sharded checkpoints load under another layout: EP 2 -> EP 4 -> one process, DP 4 -> DP 2 (ZeRO 1 -> 2).

Each resumed run must continue exactly like one uninterrupted single-process run with the same
global batch: the same losses after the resume and the same final weights.
"""

from __future__ import annotations

import pytest
import torch

from moetrain.checkpoint import CheckpointError, CheckpointReader, load_checkpoint
from moetrain.cli import main as cli_main
from moetrain.config import Config
from moetrain.train.consolidate import consolidate
from moetrain.train.trainer import Trainer
from tests.helpers import parallel_config, reference, run_parallel, select


def staged(tmp_path, name: str, iters: int, load: str | None = None, **parallel) -> Config:
    cfg = parallel_config(tmp_path, **parallel)
    cfg.training.train_iters, cfg.training.save, cfg.training.load = iters, str(tmp_path / name), load
    return cfg


def assert_continues_reference(results: dict, ref_losses: list[float], ref_weights: dict, first_step: int) -> None:
    for rank, got in results.items():
        torch.testing.assert_close(got["losses"], ref_losses[first_step:], rtol=1e-5, atol=1e-6,
                                   msg=f"rank {rank} losses after resume")
        for name, (tensor, piece) in got["pieces"].items():
            torch.testing.assert_close(tensor, select(ref_weights[name], piece), rtol=1e-4, atol=2e-5,
                                       msg=f"rank {rank} {name}")


@pytest.mark.slow
def test_expert_parallel_2_to_4_to_one_process(tmp_path):
    ref_losses, _, ref_weights = reference(staged(tmp_path, "ref", 4))
    run_parallel(staged(tmp_path, "ep2", 2, expert_parallel_size=2), world=2)
    reader = CheckpointReader(str(tmp_path / "ep2" / "iter_0000002"))
    assert reader.sharded and reader.index["model/blocks.1.ffn.experts.w1"][0]["index"] == [0, 1]

    ep4 = run_parallel(staged(tmp_path, "ep4", 3, load=str(tmp_path / "ep2"), expert_parallel_size=4), world=4)
    w1 = {rank: got["pieces"]["blocks.1.ffn.experts.w1"][1].index for rank, got in ep4.items()}
    assert w1 == {0: (0,), 1: (1,), 2: (2,), 3: (3,)}
    ref3 = reference(staged(tmp_path, "ref3", 3))
    assert_continues_reference(ep4, ref3[0], ref3[2], first_step=2)

    # one process continues from the 4-process checkpoint, and consolidation gives the same weights
    single = Trainer(staged(tmp_path, "one", 4, load=str(tmp_path / "ep4")), quiet=True)
    losses = single.fit().losses
    torch.testing.assert_close(losses, ref_losses[3:], rtol=1e-5, atol=1e-6)
    for name, value in single.model.state_dict().items():
        torch.testing.assert_close(value, ref_weights[name], rtol=1e-4, atol=2e-5, msg=name)
    merged = consolidate(str(tmp_path / "ep4"), str(tmp_path / "merged"))
    sharded_state = load_checkpoint(str(tmp_path / "ep4")).model_state
    for name, value in load_checkpoint(merged).model_state.items():
        assert torch.equal(value, sharded_state[name]), name


@pytest.mark.slow
def test_data_parallel_4_zero1_to_data_parallel_2_zero2(tmp_path):
    ref_losses, _, ref_weights = reference(staged(tmp_path, "ref", 4))
    run_parallel(staged(tmp_path, "dp4", 2, zero_stage=1), world=4)
    dp2 = run_parallel(staged(tmp_path, "dp2", 4, load=str(tmp_path / "dp4"), zero_stage=2), world=2)
    assert_continues_reference(dp2, ref_losses, ref_weights, first_step=2)


def test_resume_in_the_same_layout_and_consolidate_from_the_cli(tmp_path, capsys):
    ref_losses, _, ref_weights = reference(staged(tmp_path, "ref", 4))
    run_parallel(staged(tmp_path, "tp", 2, tensor_parallel_size=2), world=2)
    resumed = run_parallel(staged(tmp_path, "tp", 4, load=str(tmp_path / "tp"), tensor_parallel_size=2), world=2)
    assert_continues_reference(resumed, ref_losses, ref_weights, first_step=2)
    with pytest.raises(SystemExit) as done:
        cli_main(["consolidate", "--load", str(tmp_path / "tp"), "--out", str(tmp_path / "merged")])
    assert done.value.code == 0 and "consolidated into" in capsys.readouterr().out
    merged = load_checkpoint(str(tmp_path / "merged"))
    for name, value in merged.model_state.items():
        torch.testing.assert_close(value, ref_weights[name], rtol=1e-4, atol=2e-5, msg=name)
    assert merged.optimizer_state["state"] and merged.iteration == 4


def test_a_checkpoint_of_another_model_is_a_clear_error(tmp_path):
    run_parallel(staged(tmp_path, "ep2", 2, expert_parallel_size=2), world=2)
    wrong = staged(tmp_path, "wrong", 3, load=str(tmp_path / "ep2"))
    wrong.moe.num_experts = [8]
    with pytest.raises(CheckpointError, match=r"blocks\.1\.ffn\..* has shape \[4, .*needs \[8, "):
        Trainer(wrong, quiet=True)
