"""Sparse upcycling: the MoE model starts with the dense model's loss (experts are copies of the FFN and the
top-k weights sum to 1), noise breaks the copies apart, bad requests are refused, and the upcycled
checkpoint of a trained dense run continues with `moetrain train --load`."""

from __future__ import annotations

import math
import shlex

import pytest
import torch

from moetrain.checkpoint import load_model
from moetrain.cli import main
from moetrain.config import Config, MoEConfig, parse_train_args
from moetrain.data import build_tokenizer
from moetrain.interop import save_model_checkpoint
from moetrain.interop.upcycle import upcycle
from moetrain.model import GPT
from moetrain.train.trainer import Trainer
from tests.helpers import write_corpus


def dense_checkpoint(path, style: str) -> str:
    cfg = Config()
    m = cfg.model
    m.style, m.num_layers, m.hidden_size, m.num_attention_heads, m.seq_length, m.vocab_size = style, 4, 32, 4, 32, 257
    cfg.moe.num_experts = [1]
    torch.manual_seed(0)
    model = GPT(cfg.model, cfg.moe)
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0.0, 0.1)  # biases too: they are copied as well
    save_model_checkpoint(str(path), cfg, model.state_dict(), build_tokenizer("byte"))
    return str(path)


def lm_loss(model: GPT, seed: int = 3) -> float:
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, 257, (4, 33), generator=generator)
    with torch.no_grad():
        return float(model.eval()(tokens[:, :-1], tokens[:, 1:].contiguous()).lm_loss)


CASES = {
    "llama top-2, random router": ("llama", dict(num_experts=[4], expert_interval=2, topk=2), "random"),
    "gpt top-2, zero router": ("gpt", dict(num_experts=[8], expert_interval=1, topk=2), "zeros"),
    "llama top-3 pyramid": ("llama", dict(num_experts=[4, 8], expert_interval=2, topk=3), "random"),
    "gpt residual MoE": ("gpt", dict(num_experts=[4], expert_interval=2, topk=2, mlp_type="residual"), "random"),
}


@pytest.mark.parametrize("case", CASES)
def test_upcycled_model_starts_with_the_dense_loss(tmp_path, case):
    style, moe_options, router_init = CASES[case]
    dense = dense_checkpoint(tmp_path / "dense", style)
    moe = MoEConfig(drop_tokens=False, **moe_options)
    cfg, _ = upcycle(dense, str(tmp_path / "moe"), moe, router_init=router_init)
    assert cfg.moe.is_moe and cfg.experts_per_layer()[1] == moe_options["num_experts"][0]
    dense_model, _, _ = load_model(dense)
    moe_model, _, saved = load_model(str(tmp_path / "moe"))
    assert saved.experts_per_layer() == cfg.experts_per_layer()
    assert lm_loss(moe_model) == pytest.approx(lm_loss(dense_model), rel=1e-5)
    for i, layer in moe_model.moe_layers():
        dense_ffn = dense_model.blocks[i].ffn
        assert torch.equal(layer.experts.w1[-1], dense_ffn.fc1.weight.t())
        assert (layer.router.wg.weight == 0).all() == (router_init == "zeros")


GRANULAR = {
    "llama G=2 top-2": ("llama", dict(num_experts=[8], expert_interval=2, topk=2, top2_2nd_expert_sampling=False), 2),
    "llama G=4 top-8": ("llama", dict(num_experts=[16], expert_interval=1, topk=8), 4),
    "gpt G=2 top-4 sigmoid": ("gpt", dict(num_experts=[8], expert_interval=2, topk=4, score_func="sigmoid"), 2),
}


@pytest.mark.parametrize("case", GRANULAR)
def test_granular_upcycling_starts_with_the_dense_output(tmp_path, case):
    style, moe_options, granularity = GRANULAR[case]
    dense = dense_checkpoint(tmp_path / "dense", style)
    cfg, _ = upcycle(dense, str(tmp_path / "moe"), MoEConfig(drop_tokens=False, **moe_options),
                     granularity=granularity)
    dense_model, _, _ = load_model(dense)
    moe_model, _, _ = load_model(str(tmp_path / "moe"))
    assert cfg.moe.expert_ffn_size(cfg.model) * granularity == cfg.model.ffn_size()
    tokens = torch.randint(0, 257, (2, 32), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        torch.testing.assert_close(moe_model.eval()(tokens).logits, dense_model.eval()(tokens).logits,
                                   rtol=1e-5, atol=1e-5)
    _, layer = moe_model.moe_layers()[0]
    dense_fc2 = dense_model.blocks[moe_model.moe_layers()[0][0]].ffn.fc2.weight
    piece = dense_fc2.shape[1] // granularity
    torch.testing.assert_close(layer.experts.w2[granularity + 1], granularity * dense_fc2[:, piece:2 * piece].t())


def test_granular_upcycling_refusals(tmp_path):
    dense = dense_checkpoint(tmp_path / "dense", "llama")
    for moe, granularity, message in ((MoEConfig(num_experts=[8], topk=3), 2, "must divide --topk 3"),
                                      (MoEConfig(num_experts=[6], topk=4), 4, "every expert count"),
                                      (MoEConfig(num_experts=[8], topk=4, expert_ffn_hidden_size=8), 2,
                                       "granularity 2"),
                                      (MoEConfig(num_experts=[8], topk=2), 0, "at least 1")):
        with pytest.raises(ValueError, match=message):
            upcycle(dense, str(tmp_path / "moe"), moe, granularity=granularity)
    with pytest.raises(ValueError, match="--disable-moe-top2-2nd-expert-sampling"):
        upcycle(dense, str(tmp_path / "moe"), MoEConfig(num_experts=[8], topk=2), granularity=2)
    with pytest.raises(ValueError, match="--router-init random"):
        upcycle(dense, str(tmp_path / "moe"), MoEConfig(num_experts=[8], topk=4), granularity=2, router_init="zeros")


def test_expert_noise_breaks_the_symmetry(tmp_path):
    dense = dense_checkpoint(tmp_path / "dense", "llama")
    upcycle(dense, str(tmp_path / "moe"), MoEConfig(num_experts=[4], topk=2, drop_tokens=False), expert_noise=0.01)
    dense_model, _, _ = load_model(dense)
    moe_model, _, _ = load_model(str(tmp_path / "moe"))
    w1 = moe_model.moe_layers()[0][1].experts.w1
    assert not torch.equal(w1[0], w1[1])
    relative = (w1 - dense_model.blocks[1].ffn.fc1.weight.t()).std() / w1.std()
    assert 0.005 < relative < 0.02
    assert lm_loss(moe_model) == pytest.approx(lm_loss(dense_model), rel=1e-2)


def test_refusals(tmp_path):
    dense = dense_checkpoint(tmp_path / "dense", "llama")
    for moe, message in ((MoEConfig(topk=1), "needs --topk 2"),
                         (MoEConfig(topk=2, num_shared_experts=1), "drop --num-shared-experts"),
                         (MoEConfig(topk=2, expert_ffn_hidden_size=64), "differs from the dense FFN width"),
                         (MoEConfig(num_experts=[1]), "at least 2")):
        with pytest.raises(ValueError, match=message):
            upcycle(dense, str(tmp_path / "moe"), moe)
    upcycle(dense, str(tmp_path / "moe"), MoEConfig(topk=2))
    with pytest.raises(ValueError, match="holds an MoE model"):
        upcycle(str(tmp_path / "moe"), str(tmp_path / "moe2"), MoEConfig(topk=2))
    with pytest.raises(ValueError, match="already holds checkpoints"):
        upcycle(dense, str(tmp_path / "moe"), MoEConfig(topk=2))


def test_trained_dense_run_upcycles_and_trains_on(tmp_path, capsys):
    corpus = write_corpus(tmp_path)
    common = ["--data-path", corpus, "--data-cache-dir", str(tmp_path / "cache"), "--split", "80,20,0",
              "--micro-batch-size", "2", "--lr-warmup-iters", "0", "--eval-iters", "1", "--log-interval", "1",
              "--device", "cpu", "--tokenizer-type", "byte"]
    model_flags = ["--model-style", "llama", "--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4",
                   "--seq-length", "16"]
    dense_cfg = parse_train_args(model_flags + common + ["--num-experts", "1", "--train-iters", "3",
                                                         "--save", str(tmp_path / "dense")])
    dense_cfg.training.progress_bar = False
    Trainer(dense_cfg, quiet=True).fit()

    with pytest.raises(SystemExit) as exited:
        main(["upcycle", "--load", str(tmp_path / "dense"), "--out", str(tmp_path / "moe"), "--num-experts", "4",
              "--expert-interval", "1", "--disable-moe-token-dropping"])
    assert exited.value.code == 0
    command = next(line for line in capsys.readouterr().out.splitlines() if "moetrain train --load" in line)
    moe_cfg = parse_train_args(shlex.split(command)[2:] + common[:-2] +
                               ["--train-iters", "2", "--save", str(tmp_path / "tuned")])
    moe_cfg.training.progress_bar = False
    assert moe_cfg.experts_per_layer() == [4, 4] and moe_cfg.moe.topk == 2
    trainer = Trainer(moe_cfg, quiet=True)
    assert trainer.iteration == 0  # a fresh run: the upcycled checkpoint has no optimizer or data state
    start = trainer.evaluate()["eval_loss"]
    dense_cfg.training.load = str(tmp_path / "dense")
    dense_trainer = Trainer(dense_cfg, quiet=True)  # the trained dense model on the same validation batches
    assert start == pytest.approx(dense_trainer.evaluate()["eval_loss"], rel=1e-5)
    result = trainer.fit()
    assert result.iteration == 2 and all(math.isfinite(loss) for loss in result.losses)
