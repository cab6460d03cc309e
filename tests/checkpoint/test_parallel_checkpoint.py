"""Sharded checkpoints load under another layout: EP 2 -> EP 4 -> one process, DP 4 -> DP 2 (ZeRO 1 -> 2),
ZeRO-3 -> ZeRO-2 / one process and back (each ZeRO-3 rank writes only its shards); a kill -9 during a
ZeRO-3 save leaves the previous checkpoint loadable.

Each resumed run must continue exactly like one uninterrupted single-process run with the same
global batch: the same losses after the resume and the same final weights.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from moetrain.checkpoint import CheckpointError, CheckpointReader, load_checkpoint
from moetrain.cli import main as cli_main
from moetrain.config import Config, ConfigError
from moetrain.train.consolidate import consolidate
from moetrain.train.trainer import Trainer
from tests.helpers import ROOT, parallel_config, reference, run_parallel, select


def staged(tmp_path, name: str, iters: int, load: str | None = None, **parallel) -> Config:
    cfg = parallel_config(tmp_path, **parallel)
    cfg.training.train_iters, cfg.training.save, cfg.training.load = iters, str(tmp_path / name), load
    return cfg


def assert_continues_reference(results: dict, ref_losses: list[float], ref_weights: dict, first_step: int) -> None:
    for rank, got in results.items():
        torch.testing.assert_close(got["losses"], ref_losses[first_step:], rtol=1e-5, atol=1e-6,
                                   msg=f"rank {rank} losses after resume")
        for name, (tensor, piece) in got["pieces"].items():
            if piece.index == ():  # a ZeRO-3 rank's empty shard of a small tensor
                continue
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
@pytest.mark.parametrize("first_stage", [1, 3], ids=["zero1", "zero3"])
def test_data_parallel_4_to_data_parallel_2_zero2(tmp_path, first_stage):
    """A DP 4 checkpoint (ZeRO-1's owner pieces, or ZeRO-3's parameter shards) continues under ZeRO-2 DP 2."""
    ref_losses, _, ref_weights = reference(staged(tmp_path, "ref", 4))
    run_parallel(staged(tmp_path, "dp4", 2, zero_stage=first_stage), world=4)
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
    with pytest.raises(ConfigError, match=r"--num-experts .*\[0, 4, 0, 4\] \(checkpoint\) vs \[0, 8, 0, 8\]"):
        Trainer(wrong, quiet=True)  # the saved config is compared before any tensor is read
    wrong.training.finetune = True  # weights only, into whatever model they fit: the shapes are checked
    with pytest.raises(CheckpointError, match=r"blocks\.1\.ffn\..* has shape \[4, .*needs \[8, "):
        Trainer(wrong, quiet=True)


# -- ZeRO-3: each rank writes only its shards -------------------------------------------------------------
def test_zero3_to_zero2_and_to_one_process_and_consolidated(tmp_path):
    ref_losses, _, ref_weights = reference(staged(tmp_path, "ref", 4))
    run_parallel(staged(tmp_path, "z3", 2, zero_stage=3, expert_parallel_size=2), world=2)
    reader = CheckpointReader(str(tmp_path / "z3" / "iter_0000002"))
    embedding = reader.index["model/tok_emb.weight"]  # one piece per rank, each written by its holder
    assert sorted(e["file"] for e in embedding) == ["shard-00000.safetensors", "shard-00001.safetensors"]
    assert sorted(len(e["index"]) for e in embedding) == [192, 192]  # 257 byte ids padded to 384 rows
    assert {e["file"] for e in reader.index["optim/blocks.0.attn.qkv.weight/exp_avg"]} == \
        {"shard-00000.safetensors", "shard-00001.safetensors"}

    zero2 = run_parallel(staged(tmp_path, "z2", 4, load=str(tmp_path / "z3"), zero_stage=2), world=2)
    assert_continues_reference(zero2, ref_losses, ref_weights, first_step=2)
    single = Trainer(staged(tmp_path, "one", 4, load=str(tmp_path / "z3")), quiet=True)
    torch.testing.assert_close(single.fit().losses, ref_losses[2:], rtol=1e-5, atol=1e-6)
    merged = load_checkpoint(consolidate(str(tmp_path / "z3"), str(tmp_path / "merged")))
    sharded_state = load_checkpoint(str(tmp_path / "z3")).model_state
    assert merged.optimizer_state["state"]
    for name, value in merged.model_state.items():
        assert torch.equal(value, sharded_state[name]), name


def test_zero2_and_one_process_to_zero3(tmp_path):
    ref_losses, _, ref_weights = reference(staged(tmp_path, "ref", 4))
    run_parallel(staged(tmp_path, "z2", 2, zero_stage=2), world=2)
    zero3 = run_parallel(staged(tmp_path, "z3", 4, load=str(tmp_path / "z2"), zero_stage=3), world=2)
    assert_continues_reference(zero3, ref_losses, ref_weights, first_step=2)
    Trainer(staged(tmp_path, "one", 2), quiet=True).fit()
    zero3 = run_parallel(staged(tmp_path, "z3b", 4, load=str(tmp_path / "one"), zero_stage=3), world=2)
    assert_continues_reference(zero3, ref_losses, ref_weights, first_step=2)


# A ZeRO-3 run on 2 processes that saves every step until it is killed.
SAVING_RUN = textwrap.dedent("""
    import json, sys
    from moetrain.config import Config
    from tests.helpers import run_parallel
    if __name__ == "__main__":
        run_parallel(Config.from_dict(json.load(open(sys.argv[1]))), 2)
""")


def test_kill_9_during_a_zero3_save_leaves_the_previous_checkpoint_loadable(tmp_path):
    cfg = staged(tmp_path, "run", 10_000, zero_stage=3)
    cfg.training.save_interval, cfg.training.eval_interval, cfg.training.keep_last_checkpoints = 1, 0, 2
    (tmp_path / "cfg.json").write_text(json.dumps(cfg.to_dict()))
    (tmp_path / "saving_run.py").write_text(SAVING_RUN)
    save_dir = cfg.training.save
    child = subprocess.Popen([sys.executable, str(tmp_path / "saving_run.py"), str(tmp_path / "cfg.json")],
                             env={**os.environ, "PYTHONPATH": str(ROOT)}, start_new_session=True,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 300
        while not os.path.exists(os.path.join(save_dir, "latest")):
            assert child.poll() is None and time.monotonic() < deadline, "the run saved nothing"
            time.sleep(0.1)
        time.sleep(random.Random(25).uniform(0.5, 1.5))  # some saves later, most likely in the middle of one
    finally:
        os.killpg(child.pid, signal.SIGKILL)
        child.wait()
    latest = load_checkpoint(save_dir)  # verified against its manifest, shard by shard
    assert latest.iteration >= 1 and "model/tok_emb.weight" in CheckpointReader(latest.path).index
    resumed = staged(tmp_path, "run", latest.iteration + 1, load=save_dir, zero_stage=3)
    assert len(run_parallel(resumed, 2)[0]["losses"]) == 1

