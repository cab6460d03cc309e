"""ZeRO-3 (FSDP2) trains exactly like one process: gloo, 2 and 4 processes on this machine.

Each rank's local shards are compared with the matching selection (its rows of each tensor, of its
experts) of the single-process run's weights; losses and the final evaluation must match too. Gradient
accumulation (2 micro-batches per rank), full recomputation and random routing are on.
"""

from __future__ import annotations

import functools
import math

import pytest
import torch

from moetrain.config import Config
from moetrain.parallel.fsdp import ShardingOptions
from moetrain.parallel.memory import model_state_bytes, record_before_zero_grad
from moetrain.parallel.pieces import model_pieces
from moetrain.train.trainer import Trainer
from tests.helpers import parallel_config, run_ranks, select


def zero3_config(tmp_path, **parallel) -> Config:
    cfg = parallel_config(tmp_path, zero_stage=3, **parallel)
    cfg.model.recompute_granularity = "full"
    cfg.parallel.distributed_timeout_minutes = 1  # a hang fails the test instead of stalling CI
    return cfg


def single_process(cfg: Config) -> Config:
    single = Config.from_dict(cfg.to_dict())
    single.parallel.tensor_parallel_size = single.parallel.pipeline_parallel_size = 1
    single.parallel.expert_parallel_size, single.parallel.zero_stage = None, 0
    single.parallel.offload_param = single.parallel.offload_optimizer = False
    return single


def _train(cfg: Config, force_routing: bool = False) -> dict:
    """`cfg`'s steps on this rank: losses, gradient norms (AdamW would hide a wrongly scaled gradient from
    the weights), the final evaluation and this rank's pieces of the model."""
    trainer = Trainer(cfg, quiet=True)
    if force_routing:
        _force_routing_to_first_half(trainer)
    steps = [trainer.train_step() for _ in range(cfg.training.train_iters)]
    return {"losses": [s["losses"]["loss"] for s in steps], "norms": [s["grad_norm"] for s in steps],
            "eval": trainer.evaluate()["eval_loss"],
            "pieces": {g: (t.clone(), p) for g, t, p in model_pieces(trainer.model).values()}}


def assert_matches_single_process(cfg: Config, world: int, force_routing: bool = False) -> dict:
    results = run_ranks(functools.partial(_train, force_routing=force_routing), cfg, world)
    want = _train(single_process(cfg), force_routing)
    weights = {name: tensor for name, (tensor, _) in want["pieces"].items()}
    for rank, got in results.items():
        torch.testing.assert_close(got["losses"], want["losses"], rtol=1e-5, atol=1e-6, msg=f"rank {rank} losses")
        torch.testing.assert_close(got["norms"], want["norms"], rtol=1e-5, atol=1e-8, msg=f"rank {rank} norms")
        assert got["eval"] == pytest.approx(want["eval"], rel=1e-5)
        for name, (tensor, piece) in got["pieces"].items():
            if piece.index == ():  # this rank's shard of a tensor too small to reach it
                continue
            torch.testing.assert_close(tensor, select(weights[name], piece), rtol=1e-4, atol=1e-5,
                                       msg=f"rank {rank} {name}")
    return results


def test_zero3_data_parallel_2_with_accumulation_recompute_and_random_routing(tmp_path):
    results = assert_matches_single_process(zero3_config(tmp_path, routing="sampling"), world=2)
    for name in ("tok_emb.weight", "blocks.0.attn.qkv.weight", "blocks.1.ffn.experts.w1"):
        rows = [results[rank]["pieces"][name][1] for rank in range(2)]
        assert [p.dim for p in rows] == [0, 0], name
        assert rows[0].index + rows[1].index == tuple(range(rows[0].shape[0])), name  # each rank holds half


def test_zero3_expert_parallel_2_each_rank_its_own_experts_kept_gathered_until_backward(tmp_path):
    cfg = zero3_config(tmp_path, expert_parallel_size=2, reshard_after_forward=False)
    results = assert_matches_single_process(cfg, world=2)
    assert [results[rank]["pieces"]["blocks.1.ffn.experts.w1"][1].index for rank in range(2)] == [(0, 1), (2, 3)]


@pytest.mark.slow
def test_zero3_expert_parallel_2_by_data_parallel_2(tmp_path):
    """Experts sharded over their expert-data-parallel pair, dense weights over all 4 ranks."""
    results = assert_matches_single_process(zero3_config(tmp_path, routing="rts", expert_parallel_size=2), world=4)
    experts = {rank: results[rank]["pieces"]["blocks.1.ffn.experts.w1"][1].index for rank in range(4)}
    assert experts == {0: (0,), 1: (2,), 2: (1,), 3: (3,)}
    rows = [results[rank]["pieces"]["tok_emb.weight"][1] for rank in range(4)]
    vocab = rows[0].shape[0]
    assert sum((p.index for p in rows), ()) == tuple(range(vocab)) and all(len(p.index) <= -(-vocab // 4) for p in rows)


# -- the non-finite guard ----------------------------------------------------------------------------------
def _poisoned_step(cfg: Config) -> dict:
    """Two clean steps, then one whose gradient shard on rank 1 only is NaN: every rank must skip it."""
    trainer = Trainer(cfg, quiet=True)
    trainer.train_step()
    before = [t.clone() for _, t, _ in model_pieces(trainer.model).values()]
    forward_backward = trainer.executor.forward_backward

    def poisoned(*args, **kwargs):
        means = forward_backward(*args, **kwargs)
        if torch.distributed.get_rank() == 1:
            next(p for p in trainer.model.parameters() if p.grad is not None).grad.to_local().fill_(float("nan"))
        return means
    trainer.executor.forward_backward = poisoned
    step = trainer.train_step()
    after = [t for _, t, _ in model_pieces(trainer.model).values()]
    return {"skipped": step["skipped"], "norm": step["grad_norm"],
            "unchanged": all(torch.equal(a, b) for a, b in zip(before, after))}


def test_zero3_non_finite_gradient_on_one_rank_skips_the_step_everywhere(tmp_path):
    results = run_ranks(_poisoned_step, zero3_config(tmp_path), 2)
    for got in results.values():
        assert got["skipped"] and math.isnan(got["norm"]) and got["unchanged"]


# -- an expert that receives no tokens ------------------------------------------------------------------------
def _force_routing_to_first_half(trainer: Trainer) -> None:
    """Every router sends every token to experts 0 and 1 (expert-parallel rank 0's): rank 1's get none."""
    for _, moe in trainer.model.moe_layers():
        logits = moe.router.compute_logits
        far = torch.tensor([0.0, 0.0, -1e4, -1e4])
        moe.router.compute_logits = lambda x, logits=logits, far=far: logits(x) + far.to(x.device)


@pytest.mark.parametrize("drop_tokens", [False, True], ids=["dropless", "capacity"])
@pytest.mark.parametrize("zero_stage", [0, 3])
def test_experts_that_receive_no_tokens_never_hang(tmp_path, drop_tokens, zero_stage):
    cfg = zero3_config(tmp_path, drop_tokens=drop_tokens, expert_parallel_size=2)
    cfg.parallel.zero_stage = zero_stage
    assert_matches_single_process(cfg, world=2, force_routing=True)


# -- per-rank memory ----------------------------------------------------------------------------------------
def _held_bytes(cfg: Config) -> dict:
    """Model-state bytes this rank holds after start-up and with a step's gradients and optimizer state (just
    before they are cleared), and the bounds: whole model state / N + one block's gathered parameters."""
    trainer = Trainer(cfg, quiet=True)
    held = {"start": model_state_bytes(trainer.model, trainer.optimizer)}
    record_before_zero_grad(trainer.model, trainer.optimizer, held)
    trainer.train_step()
    whole = trainer.param_counts["total"] * 4  # fp32
    block = max(sum(p.numel() for p in b.parameters()) for b in Trainer(single_process(cfg), quiet=True).model.blocks)
    return {**held, "whole": whole, "block": block * 4}


@pytest.mark.parametrize("world", [2, pytest.param(4, marks=pytest.mark.slow)])
def test_zero3_rank_holds_its_share_of_the_model_state(tmp_path, world):
    results = run_ranks(_held_bytes, zero3_config(tmp_path, expert_parallel_size=2), world)
    for rank, got in results.items():
        whole, block = got["whole"], got["block"]
        # parameters alone after start-up; parameters, gradients and two AdamW moments after a step
        assert got["start"]["total"] <= 1.1 * whole / world + block, (rank, got["start"])
        step = got["step"]
        assert step["grads"] > 0 and step["optimizer"] > 0, step
        assert step["total"] <= 1.1 * 4 * whole / world + block, (rank, step)
        assert step["params"] < 0.6 * whole  # really sharded, not whole


# -- composed with tensor and pipeline parallelism, and distillation ------------------------------------------
@pytest.mark.slow
def test_zero3_tensor_parallel_2_by_data_parallel_2(tmp_path):
    """FSDP shards each tensor-parallel piece further, along the dimension tensor parallelism split."""
    results = assert_matches_single_process(zero3_config(tmp_path, tensor_parallel_size=2), world=4)
    proj = results[0]["pieces"]["blocks.0.attn.proj.weight"][1]  # row-parallel: columns, then their half
    assert proj.dim == 1 and len(proj.index) == proj.shape[1] // 4


@pytest.mark.slow
def test_zero3_pipeline_2_by_data_parallel_2_with_tied_embeddings(tmp_path):
    assert_matches_single_process(zero3_config(tmp_path, style="gpt", pipeline_parallel_size=2), world=4)


def test_zero3_distillation_with_a_replicated_teacher_that_initialises_the_offloaded_student(tmp_path):
    teacher = parallel_config(tmp_path)
    teacher.training.save = str(tmp_path / "teacher")
    Trainer(teacher, quiet=True).fit()
    cfg = zero3_config(tmp_path, offload_param=True)  # DeepSpeed's offload_param: FSDP2's CPUOffloadPolicy
    cfg.distill.enabled, cfg.distill.load_teacher, cfg.distill.temperature = True, str(tmp_path / "teacher"), 2.0
    cfg.distill.student_init_from_teacher = True
    assert_matches_single_process(cfg, world=2)


def test_zero3_mixed_precision_policy_on_gpus_only():
    """bf16 gathered parameters with fp32 reduction on a GPU; fp32 on the CPU (bf16 matmuls are slow there)."""
    pc = Config().parallel
    gpu = ShardingOptions.from_config(pc, "bf16", torch.device("cuda", 0))
    assert (gpu.param_dtype, gpu.reduce_dtype) == (torch.bfloat16, torch.float32)
    cpu = ShardingOptions.from_config(pc, "bf16", torch.device("cpu"))
    assert (cpu.param_dtype, cpu.reduce_dtype) == (None, None)
    assert ShardingOptions.from_config(pc, "fp32", torch.device("cuda", 0)).param_dtype is None


def _gathers_per_step(cfg: Config) -> int:
    """FSDP2 all-gathers in this rank's second step (counted at FSDP2's one all-gather function)."""
    import torch.distributed.fsdp._fully_shard._fsdp_param_group as param_group

    gather, count = param_group.foreach_all_gather, [0]

    def counted(*args, **kwargs):
        count[0] += 1
        return gather(*args, **kwargs)
    param_group.foreach_all_gather = counted
    trainer = Trainer(cfg, quiet=True)
    trainer.train_step()
    before = count[0]
    trainer.train_step()
    return count[0] - before


def test_no_reshard_after_forward_gathers_each_unit_once_per_step(tmp_path):
    """7 units (4 blocks, 2 expert units, the root), 2 micro-batches per step: by default each non-root unit
    is gathered for every forward and backward (4 x 6) and the root once per micro-batch; kept gathered, once."""
    cfg = parallel_config(tmp_path, zero_stage=3)
    assert run_ranks(_gathers_per_step, cfg, 2) == {0: 26, 1: 26}
    cfg.parallel.reshard_after_forward = False
    assert run_ranks(_gathers_per_step, cfg, 2) == {0: 7, 1: 7}
