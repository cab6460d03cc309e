"""Parallel layouts train exactly like one process: gloo, 2 and 4 processes on this machine.

For a few steps on fixed data with the same global batch, every layout's losses and final weights
must equal the single-process run's to float32 tolerance. Each rank's local tensors are compared
with the matching selection (its experts, its tensor-parallel rows or columns) of the reference.
Random routing (second-expert sampling, RTS, Jitter, RSample) included: its noise is keyed by global
token position (moetrain.moe.routing_noise), so it is the same in every layout and micro-batch split.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
import torch

from moetrain.config import Config
from moetrain.train.trainer import Trainer
from tests.helpers import RANDOM_ROUTING, free_port, parallel_config, reference, run_parallel, select


def assert_matches_single_process(cfg: Config, world: int) -> dict:
    results = run_parallel(cfg, world)
    losses, eval_loss, weights = reference(cfg)
    for rank, got in results.items():
        torch.testing.assert_close(got["losses"], losses, rtol=1e-5, atol=1e-6, msg=f"rank {rank} losses")
        assert got["eval"] == pytest.approx(eval_loss, rel=1e-5)
        for name, (tensor, piece) in got["pieces"].items():
            torch.testing.assert_close(tensor, select(weights[name], piece), rtol=1e-4, atol=2e-5,
                                       msg=f"rank {rank} {name}")
    return results


def test_data_parallel_2(tmp_path):
    assert_matches_single_process(parallel_config(tmp_path), world=2)


@pytest.mark.parametrize("drop_tokens", [False, True], ids=["dropless", "capacity"])
def test_expert_parallel_2(tmp_path, drop_tokens):
    results = assert_matches_single_process(parallel_config(tmp_path, drop_tokens=drop_tokens,
                                                            expert_parallel_size=2), world=2)
    w1 = [results[rank]["pieces"]["blocks.1.ffn.experts.w1"] for rank in range(2)]
    assert [p.index for _, p in w1] == [(0, 1), (2, 3)]  # each rank holds half of the experts


@pytest.mark.slow
def test_data_parallel_2_by_expert_parallel_2(tmp_path):
    assert_matches_single_process(parallel_config(tmp_path, style="gpt", expert_parallel_size=2), world=4)


LAYOUTS = {"dp2": {}, "ep2": dict(expert_parallel_size=2), "zero2": dict(zero_stage=2),
           "tp2": dict(tensor_parallel_size=2), "pp2": dict(pipeline_parallel_size=2)}
QUICK = {("sampling", "dp2"), ("sampling", "pp2"), ("rts", "ep2")}  # the rest of the matrix is marked slow


@pytest.mark.parametrize("routing, layout", [
    pytest.param(routing, layout, id=f"{routing}-{name}",
                 marks=() if (routing, name) in QUICK else pytest.mark.slow)
    for routing in RANDOM_ROUTING for name, layout in LAYOUTS.items()])
def test_random_routing_is_the_same_in_every_layout(tmp_path, routing, layout):
    assert_matches_single_process(parallel_config(tmp_path, routing=routing, **layout), world=2)


@pytest.mark.parametrize("routing", list(RANDOM_ROUTING))
def test_random_routing_is_the_same_in_every_micro_batch_split(tmp_path, routing):
    """One process, the global batch of 8 in micro-batches of 1, 2 or 4: the same losses and weights. The
    split changes which tokens share a forward, so the test keeps what depends on that out: no capacity
    limit and no batch-statistics losses (aux, z); only the routing noise could still differ. (Evaluation
    reads eval_iters batches of the micro-batch size, different data: not compared.)"""
    runs = []
    for micro in (1, 2, 4):
        cfg = parallel_config(tmp_path, routing=routing)
        cfg.moe.drop_tokens, cfg.moe.aux_loss_coeff, cfg.moe.z_loss_coeff = False, 0.0, 0.0
        cfg.training.micro_batch_size = micro
        runs.append(reference(cfg))
    (losses, _, weights), *others = runs
    assert len(losses) == 3 and len(set(losses)) == 3  # trained, not stuck
    for other_losses, _, other_weights in others:
        torch.testing.assert_close(other_losses, losses, rtol=1e-5, atol=1e-6)
        for name, tensor in weights.items():
            torch.testing.assert_close(other_weights[name], tensor, rtol=1e-4, atol=2e-5, msg=name)


@pytest.mark.parametrize("offload", [False, True], ids=["", "offload"])
def test_zero_stage_1(tmp_path, offload):
    assert_matches_single_process(parallel_config(tmp_path, zero_stage=1, offload_optimizer=offload), world=2)


@pytest.mark.slow
def test_zero_stage_2_with_experts_sharded_over_their_data_parallel_group(tmp_path):
    assert_matches_single_process(parallel_config(tmp_path, zero_stage=2, expert_parallel_size=2), world=4)


@pytest.mark.parametrize("style", ["llama", "gpt"])
def test_tensor_parallel_2_with_experts_following_it(tmp_path, style):
    # no --expert-parallel-size: experts split over the tensor-parallel ranks (the seed guides' mode)
    results = assert_matches_single_process(parallel_config(tmp_path, style=style, tensor_parallel_size=2),
                                            world=2)
    qkv = results[1]["pieces"]["blocks.0.attn.qkv.weight"][1]
    assert qkv.dim == 0 and qkv.index[:2] == (16, 17) and len(qkv.index) == 3 * 32 // 2  # q, k, v of heads 2, 3


def test_tensor_parallel_2_with_grouped_query_heads_qk_norm_and_partial_rotary(tmp_path):
    cfg = parallel_config(tmp_path, tensor_parallel_size=2)
    cfg.model.num_query_groups, cfg.model.qk_norm, cfg.model.rotary_percent = 2, "head", 0.5
    results = assert_matches_single_process(cfg, world=2)
    qkv = results[1]["pieces"]["blocks.0.attn.qkv.weight"][1]  # q of heads 2, 3; k and v of key/value head 1
    assert qkv.index[:2] == (16, 17) and qkv.index[16:18] == (40, 41) and len(qkv.index) == 32


def test_tensor_parallel_2_with_latent_attention(tmp_path):
    cfg = parallel_config(tmp_path, tensor_parallel_size=2)
    m = cfg.model
    m.multi_latent_attention, m.q_lora_rank, m.kv_lora_rank, m.qk_head_dim, m.qk_pos_emb_head_dim, m.v_head_dim = \
        True, 12, 10, 6, 4, 5
    results = assert_matches_single_process(cfg, world=2)
    kv_up = results[1]["pieces"]["blocks.0.attn.kv_up.weight"][1]  # heads 2, 3: rows 2 * (6 + 5) onwards
    assert kv_up.dim == 0 and kv_up.index[0] == 22 and len(kv_up.index) == 22


@pytest.mark.parametrize("style", ["gpt", "llama"])
def test_pipeline_parallel_2(tmp_path, style):
    # gpt style ties the embedding to the output layer: the two stages' copies must step alike
    assert_matches_single_process(parallel_config(tmp_path, style=style, pipeline_parallel_size=2), world=2)


@pytest.mark.slow
def test_pipeline_2_by_data_parallel_2_with_expert_parallel_2_and_zero_2(tmp_path):
    cfg = parallel_config(tmp_path, style="gpt", pipeline_parallel_size=2, expert_parallel_size=2,
                          pipeline_schedule="gpipe", zero_stage=2)
    assert_matches_single_process(cfg, world=4)


@pytest.mark.slow
def test_tensor_parallel_2_by_pipeline_2(tmp_path):
    assert_matches_single_process(parallel_config(tmp_path, tensor_parallel_size=2, pipeline_parallel_size=2),
                                  world=4)


def test_layer_expert_parallel_size_follows_its_expert_count():
    from moetrain.parallel.mesh import ParallelState

    state = ParallelState(ep=4)
    assert [state.layer_ep_size(count) for count in (8, 6, 2, 3)] == [4, 2, 2, 1]


def test_console_script_under_torchrun(tmp_path):
    """`torchrun moetrain train` (the console script) trains, prints one loss line per step, saves shards."""
    script = shutil.which("moetrain")
    assert script, "the moetrain console script is not installed (pip install -e .)"
    cfg = parallel_config(tmp_path)
    args = ["--data-path", cfg.data.data_path[0], "--tokenizer-type", "byte", "--split", "80,20,0",
            "--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4", "--seq-length", "16",
            "--num-experts", "4", "--expert-parallel-size", "2", "--micro-batch-size", "2",
            "--global-batch-size", "4", "--train-iters", "2", "--log-interval", "1", "--eval-iters", "1",
            "--save", str(tmp_path / "run"), "--device", "cpu", "--data-cache-dir", str(tmp_path / "cache"),
            "--no-progress-bar", "--lr-warmup-iters", "0"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--no-python",
                           f"--master_port={free_port()}", script, "train", *args],
                          capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    lines = [line for line in done.stdout.splitlines() if line.startswith("Step ") and "| Loss:" in line]
    assert [line.split(" |")[0] for line in lines] == ["Step 1", "Step 2"]  # rank 0 only
    assert "parallel: 2 processes = DP 2 (EP 2) x TP 1 x PP 1" in done.stdout
    shards = sorted(os.listdir(tmp_path / "run" / "iter_0000002"))
    assert "index.json" in shards and "shard-00000.safetensors" in shards


def test_distillation_with_teacher_and_student_both_expert_parallel(tmp_path):
    # an MoE teacher (4 experts, every other layer), saved by one process; then an expert-parallel student
    teacher = parallel_config(tmp_path)
    teacher.training.save = str(tmp_path / "teacher")
    Trainer(teacher, quiet=True).fit()
    cfg = parallel_config(tmp_path, expert_parallel_size=2)
    cfg.model.num_layers, cfg.moe.num_experts = 2, [2]
    cfg.distill.enabled, cfg.distill.load_teacher, cfg.distill.temperature = True, str(tmp_path / "teacher"), 2.0
    assert_matches_single_process(cfg, world=2)


@pytest.mark.slow
def test_pyramid_layers_take_the_expert_parallel_size_their_counts_allow(tmp_path):
    cfg = parallel_config(tmp_path, expert_parallel_size=4)
    cfg.moe.num_experts = [4, 2]  # layer 1 over 4 ranks, layer 3 over gcd(2, 4) = 2 ranks
    results = assert_matches_single_process(cfg, world=4)
    held = {rank: (got["pieces"]["blocks.1.ffn.experts.w1"][1].index, got["pieces"]["blocks.3.ffn.experts.w1"][1].index)
            for rank, got in results.items()}
    assert held == {0: ((0,), (0,)), 1: ((1,), (1,)), 2: ((2,), (0,)), 3: ((3,), (1,))}
