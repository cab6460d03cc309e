"""Pipeline parallelism with 2 gloo processes (pp=2) against the single-process model.

The pipelined step must give the single process's mean loss over the same micro-batches and
the gradients it accumulates from lm_loss + aux_coeff * aux + z_coeff * z averaged over them;
the tied embedding's two copies, after their all-reduce, the gradient of the shared weight.
"""

import os

import torch
import torch.multiprocessing as mp

from moetrain.config import ModelConfig, MoEConfig, ParallelConfig
from moetrain.model import GPT
from moetrain.parallel.mesh import init_parallel
from moetrain.parallel.pipeline import (
    PipelineRunner,
    all_reduce_tied_embedding_grads,
    embedding_group,
    split_for_pipeline,
    stage_layers,
    tied_embedding_params,
)
from tests.helpers import free_port

WORLD = 2
MICRO, BATCH, SEQ, VOCAB = 4, 2, 16, 64
AUX, Z = 0.1, 0.01  # larger than the defaults, so a lost aux or z gradient shows
RUNS = (("1f1b", 1.0), ("gpipe", 1.0), ("gpipe", 4.0))  # (schedule, fp16-style loss scale)
STYLES = ("gpt", "llama")  # tied embeddings and learned positions; untied, RoPE


def _model(style: str, num_layers: int = 4) -> GPT:
    torch.manual_seed(0)
    cfg = ModelConfig(style=style, num_layers=num_layers, hidden_size=32, num_attention_heads=4,
                      seq_length=SEQ, vocab_size=VOCAB, tie_embeddings=style == "gpt")
    moe = MoEConfig(num_experts=[4], expert_interval=2, topk=2, drop_tokens=False, use_rts=False,
                    top2_2nd_expert_sampling=False, aux_loss_coeff=AUX, z_loss_coeff=Z)
    return GPT(cfg, moe)


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, VOCAB, (MICRO * BATCH, SEQ + 1), generator=generator)
    return tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()


def _routed(model) -> dict[int, list[int]]:
    """Tokens routed to each expert of each MoE layer since the last call."""
    return {i: moe.routing_stats.summary(reset=True)["tokens_per_expert"] for i, moe in model.moe_layers()}


def _worker(rank: int, port: int, results) -> None:
    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    state = init_parallel(ParallelConfig(pipeline_parallel_size=WORLD), "cpu")
    try:
        group = embedding_group(state)
        inputs, targets = _batch()
        out = {}
        for style in STYLES:  # one spawn for both: starting the processes costs far more than the runs
            stage = split_for_pipeline(_model(style), state.pp, state.pp_rank)
            tied = tied_embedding_params(stage)
            out[style, "tied"] = [n for n, p in stage.named_parameters() if any(p is t for t in tied)]
            for schedule, loss_scale in RUNS:
                runner = PipelineRunner(stage, state, MICRO, BATCH, SEQ, torch.device("cpu"),
                                        aux_loss_coeff=AUX, z_loss_coeff=Z, schedule=schedule)
                stage.zero_grad(set_to_none=True)
                logged = runner.step(inputs, targets, loss_scale=loss_scale)
                all_reduce_tied_embedding_grads(stage, group)
                out[style, schedule, loss_scale] = {
                    "logged": logged,
                    "grads": {n: p.grad.clone() / loss_scale for n, p in stage.named_parameters()},
                    "routed": _routed(stage),
                    "eval": runner.evaluate(inputs, targets)}
        results[rank] = out
    finally:
        torch.distributed.destroy_process_group()


def _reference(style: str) -> dict:
    """The single process: gradients of the loss averaged over the micro-batches, and the means."""
    model = _model(style)
    inputs, targets = _batch()
    sums = torch.zeros(3)
    for inp, tgt in zip(inputs.chunk(MICRO), targets.chunk(MICRO)):
        out = model(inp, tgt)
        ((out.lm_loss + AUX * out.aux_loss + Z * out.z_loss) / MICRO).backward()
        sums += torch.stack([out.lm_loss, out.aux_loss, out.z_loss]).detach() / MICRO
    grads = {n: p.grad for n, p in model.named_parameters()}
    routed = _routed(model)
    if model.cfg.tie_embeddings:
        grads["lm_head.weight"] = model.tok_emb.weight.grad
    model.eval()
    with torch.no_grad():
        eval_loss = torch.stack([model(i, t).lm_loss
                                 for i, t in zip(inputs.chunk(MICRO), targets.chunk(MICRO))])
    return {"lm_loss": sums[0], "aux_loss": sums[1], "z_loss": sums[2], "grads": grads,
            "routed": routed, "eval": eval_loss.mean()}


def test_pipeline_matches_single_process() -> None:
    results = mp.Manager().dict()
    mp.spawn(_worker, args=(free_port(), results), nprocs=WORLD, join=True)
    first, last = results[0], results[1]
    close = {"atol": 1e-5, "rtol": 1e-5}
    for style in STYLES:
        ref = _reference(style)
        tied = (["tok_emb.weight"], ["lm_head.weight"]) if style == "gpt" else ([], [])
        assert (first[style, "tied"], last[style, "tied"]) == tied
        for run in RUNS:
            got0, got1 = first[(style, *run)], last[(style, *run)]
            torch.testing.assert_close(got1["logged"]["lm_loss"], ref["lm_loss"], **close)
            assert float(got0["logged"]["lm_loss"]) == 0.0
            for key in ("aux_loss", "z_loss"):  # the trainer sums the stages' values over the pp group
                torch.testing.assert_close(got0["logged"][key] + got1["logged"][key], ref[key], **close)
            torch.testing.assert_close(got1["eval"], ref["eval"], **close)
            # each micro-batch is routed once: static stage shapes skip torch's shape-inference forward
            assert {**got0["routed"], **got1["routed"]} == ref["routed"]
            assert not set(got0["grads"]) & set(got1["grads"])  # no parameter on both stages
            grads = {**got0["grads"], **got1["grads"]}
            assert set(grads) == set(ref["grads"])
            for name, grad in grads.items():
                where = f"{style} {run} {name}"
                torch.testing.assert_close(grad, ref["grads"][name], **close, msg=lambda m, w=where: f"{w}: {m}")


def test_split_keeps_names_and_balances_layers() -> None:
    assert [list(stage_layers(5, 2, r)) for r in range(2)] == [[0, 1, 2], [3, 4]]
    assert [list(stage_layers(7, 3, r)) for r in range(3)] == [[0, 1, 2], [3, 4], [5, 6]]
    model = _model("gpt", num_layers=5)
    whole = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    stages = [split_for_pipeline(model, 3, r) for r in range(3)]
    keys = [set(s.state_dict()) for s in stages]
    assert keys[0] | keys[1] | keys[2] == set(whole)
    assert not (keys[0] & keys[1] or keys[1] & keys[2] or keys[0] & keys[2])
    assert "tok_emb.weight" in keys[0] and "blocks.1.attn.qkv.weight" in keys[0]
    assert "blocks.3.attn.qkv.weight" in keys[1] and "lm_head.weight" in keys[2]
    assert stages[1].tok_emb is None and stages[1].lm_head is None
    assert [i for i, _ in stages[1].moe_layers()] == [3]
    # the last stage's lm_head starts as a copy of the tied weight, not the same tensor
    tied = stages[2].lm_head.weight
    assert tied is not stages[0].tok_emb.weight and torch.equal(tied, whole["tok_emb.weight"])
    assert tied_embedding_params(stages[0]) == [stages[0].tok_emb.weight]
    assert tied_embedding_params(stages[2]) == [tied] and not tied_embedding_params(stages[1])
    single = split_for_pipeline(_model("gpt"), 1, 0)  # pp=1: the whole model, tie kept
    assert single.lm_head.weight is single.tok_emb.weight and not tied_embedding_params(single)
