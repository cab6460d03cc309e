"""Activation recomputation changes memory, not results: losses, gradients, routing statistics and the
aux-free router's pending load equal the run without it, with dropout and routing noise on."""

from __future__ import annotations

import pytest
import torch

from moetrain.config import Config, ConfigError, ModelConfig, MoEConfig
from moetrain.config.parser import parse_train_args
from moetrain.model import GPT
from moetrain.moe.routing_noise import routing_key
from tests.helpers import parallel_config, reference, run_parallel

SETTINGS = [("full", "uniform", 1), ("full", "uniform", 2), ("full", "block", 1), ("selective", "uniform", 1)]


def _model(style: str, granularity: str | None, method: str = "uniform", num_layers: int = 1) -> GPT:
    torch.manual_seed(0)
    cfg = ModelConfig(style=style, num_layers=4, hidden_size=32, num_attention_heads=4, seq_length=16,
                      vocab_size=64, hidden_dropout=0.1, attention_dropout=0.1, recompute_granularity=granularity,
                      recompute_method=method, recompute_num_layers=num_layers)
    moe = MoEConfig(num_experts=[4], expert_interval=2, topk=2, noisy_gate_policy="RSample", use_rts=True,
                    expert_bias=True, min_capacity=1, train_capacity_factor=1.0)
    return GPT(cfg, moe).train()


def _step(model: GPT, keyed: bool = False) -> dict:
    """Two forward-backwards from one RNG seed (routing noise from torch's RNG or keyed by position): loss,
    gradients, routing counts and pending loads."""
    ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(1))
    torch.manual_seed(5)
    losses = []
    for iteration in range(2):
        out = model(ids, ids.roll(-1, 1), routing_key=routing_key(3, iteration, 0, "cpu") if keyed else None)
        loss = out.lm_loss + 0.1 * out.aux_loss + 0.01 * out.z_loss
        loss.backward()
        losses.append(loss.detach())
    return {"loss": torch.stack(losses),
            "grads": {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None},
            "routed": [m.routing_stats.routed.clone() for _, m in model.moe_layers()],
            "pending": [m.router.pending_load.clone() for _, m in model.moe_layers()]}


@pytest.mark.parametrize("keyed", [False, True], ids=["torch-rng", "keyed"])
@pytest.mark.parametrize("style", ["gpt", "llama"])
def test_recompute_equals_no_recompute(style, keyed):
    want = _step(_model(style, None), keyed)
    assert all(int(r.sum()) > 0 for r in want["routed"])
    for setting in SETTINGS:
        model = _model(style, *setting)
        got = _step(model, keyed)
        torch.testing.assert_close(got["loss"], want["loss"], rtol=0, atol=0, msg=f"{setting} loss")
        assert got["grads"].keys() == want["grads"].keys()
        for name, grad in want["grads"].items():
            torch.testing.assert_close(got["grads"][name], grad, rtol=1e-6, atol=1e-7, msg=f"{setting} {name}")
        for key in ("routed", "pending"):  # recorded once per forward, not again on the recompute
            for a, b in zip(got[key], want[key]):
                torch.testing.assert_close(a, b, rtol=0, atol=0, msg=f"{setting} {key}")


def test_units_follow_megatron_methods():
    model = _model("gpt", "full", "uniform", 3)
    assert [(len(blocks), on) for blocks, on in model.recompute_units()] == [(3, True), (1, True)]
    model = _model("gpt", "full", "block", 3)
    assert [(len(blocks), on) for blocks, on in model.recompute_units()] == [(1, True)] * 3 + [(1, False)]
    assert [on for _, on in model.eval().recompute_units()] == [False]


def test_checkpoint_activations_is_full_uniform_one_layer(tmp_path):
    cfg = parse_train_args(["--checkpoint-activations"])
    assert (cfg.model.recompute_granularity, cfg.model.recompute_method, cfg.model.recompute_num_layers) == \
        ("full", "uniform", 1)
    bad = Config()
    bad.model.recompute_num_layers = 0
    with pytest.raises(ConfigError, match="--recompute-num-layers"):
        bad.validate()


@pytest.mark.parametrize("granularity", ["full", "selective"])
def test_pipeline_2_with_recompute_matches_one_process_without(tmp_path, granularity):
    cfg = parallel_config(tmp_path, style="gpt", pipeline_parallel_size=2)
    losses, eval_loss, _ = reference(cfg)
    cfg.model.recompute_granularity = granularity
    for rank, got in run_parallel(cfg, 2).items():
        torch.testing.assert_close(got["losses"], losses, rtol=1e-5, atol=1e-6, msg=f"rank {rank} losses")
        assert got["eval"] == pytest.approx(eval_loss, rel=1e-5)
