"""Attention's layouts against a float64 reference written here, head by head: grouped-query heads, QK RMSNorm
per head and over the whole projection, RoPE over part of each head; and the options' one-line refusals."""

from __future__ import annotations

import math

import pytest
import torch

from moetrain.attention import Attention
from moetrain.config import Config, ConfigError, MoEConfig, parse_train_args
from moetrain.model import GPT

HIDDEN, HEADS, SEQ, EPS, THETA = 48, 4, 9, 1e-6, 500.0


def model_config(**overrides):
    cfg = Config().model
    cfg.style, cfg.hidden_size, cfg.num_attention_heads, cfg.seq_length, cfg.norm_eps = "llama", HIDDEN, HEADS, SEQ, EPS
    cfg.rope_theta, cfg.vocab_size = THETA, 50
    for key, value in overrides.items():
        setattr(cfg, key, value)
    return cfg


def rms(x, weight):
    return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + EPS) * weight


def rotate(x, rotary):
    """RoPE of one head's [T, d] rows by the textbook formula: pair (i, i + r/2) of the first r dimensions
    turned by position * THETA^(-2i/r)."""
    out = x.clone()
    for t in range(x.shape[0]):
        for i in range(rotary // 2):
            angle = t * THETA ** (-2 * i / rotary)
            a, b = x[t, i], x[t, i + rotary // 2]
            out[t, i], out[t, i + rotary // 2] = a * math.cos(angle) - b * math.sin(angle), \
                b * math.cos(angle) + a * math.sin(angle)
    return out


def reference(attn: Attention, x: torch.Tensor, cfg) -> torch.Tensor:
    """float64, one head at a time: q/k/v from qkv's row blocks, the norms, RoPE, causal softmax attention."""
    d, heads, groups = cfg.head_dim(), cfg.num_attention_heads, cfg.kv_heads()
    w = attn.qkv.weight.double()
    wq, wk, wv = w[:heads * d], w[heads * d:(heads + groups) * d], w[(heads + groups) * d:]
    q, k, v = x @ wq.t(), x @ wk.t(), x @ wv.t()
    if cfg.qk_norm == "projection":
        q, k = rms(q, attn.q_norm.weight.double()), rms(k, attn.k_norm.weight.double())
    outputs = []
    for h in range(heads):
        g = h // (heads // groups)  # the key/value head this query head shares
        qh, kh, vh = q[:, h * d:(h + 1) * d], k[:, g * d:(g + 1) * d], v[:, g * d:(g + 1) * d]
        if cfg.qk_norm == "head":
            qh, kh = rms(qh, attn.q_norm.weight.double()), rms(kh, attn.k_norm.weight.double())
        qh, kh = rotate(qh, cfg.rotary_dim()), rotate(kh, cfg.rotary_dim())
        scores = qh @ kh.t() / math.sqrt(d)
        scores = scores.masked_fill(torch.ones(SEQ, SEQ, dtype=torch.bool).triu(1), -math.inf)
        outputs.append(torch.softmax(scores, -1) @ vh)
    return torch.cat(outputs, -1) @ attn.proj.weight.double().t()


LAYOUTS = {
    "plain": {},
    "grouped-query": dict(num_query_groups=2),
    "multi-query": dict(num_query_groups=1),
    "qk-norm-head": dict(qk_norm="head", num_query_groups=2, kv_channels=16),  # Qwen3: heads x d != hidden
    "qk-norm-projection": dict(qk_norm="projection", num_query_groups=2),  # OLMoE
    "partial-rotary": dict(rotary_percent=0.5, qk_norm="head"),  # GLM-4.5
}


@pytest.mark.parametrize("layout", LAYOUTS)
def test_attention_equals_a_float64_reference(layout):
    cfg = model_config(**LAYOUTS[layout])
    torch.manual_seed(0)
    model = GPT(cfg, MoEConfig(num_experts=[1]), seed=0).double()
    attn = model.blocks[0].attn
    with torch.no_grad():
        for norm in (attn.q_norm, attn.k_norm):
            if norm is not None:
                norm.weight.uniform_(0.5, 1.5)  # not the identity
    x = torch.randn(SEQ, HIDDEN, dtype=torch.float64)
    rope = (model.rope_cos.double(), model.rope_sin.double())
    torch.testing.assert_close(attn(x.unsqueeze(0), rope)[0], reference(attn, x, cfg), rtol=1e-6, atol=1e-7)


def latent_reference(attn, x, cfg) -> torch.Tensor:
    """float64 Multi-head Latent Attention, one head at a time, from the module's weights: queries (low-rank
    or not), the normed key/value latent, RoPE on each head's last dimensions with the key's shared by all."""
    nope, rot, vd, latent_dim = cfg.qk_head_dim, cfg.qk_pos_emb_head_dim, cfg.v_head_dim, cfg.kv_lora_rank
    w = {name: p.double() for name, p in attn.named_parameters()}
    q = rms(x @ w["q_down.weight"].t(), w["q_norm.weight"]) @ w["q_up.weight"].t() if cfg.q_lora_rank \
        else x @ w["q_proj.weight"].t()
    down = x @ w["kv_down.weight"].t()
    kv = rms(down[:, :latent_dim], w["kv_norm.weight"]) @ w["kv_up.weight"].t()
    k_rope = rotate(down[:, latent_dim:], rot)
    outputs = []
    for h in range(cfg.num_attention_heads):
        qh, kvh = q[:, h * (nope + rot):(h + 1) * (nope + rot)], kv[:, h * (nope + vd):(h + 1) * (nope + vd)]
        scores = (qh[:, :nope] @ kvh[:, :nope].t() + rotate(qh[:, nope:], rot) @ k_rope.t()) / math.sqrt(nope + rot)
        scores = scores.masked_fill(torch.ones(SEQ, SEQ, dtype=torch.bool).triu(1), -math.inf)
        outputs.append(torch.softmax(scores, -1) @ kvh[:, nope:])
    return torch.cat(outputs, -1) @ w["proj.weight"].t()


@pytest.mark.parametrize("q_lora_rank", [None, 12], ids=["full-query", "low-rank-query"])
def test_latent_attention_equals_a_float64_reference(q_lora_rank):
    cfg = model_config(multi_latent_attention=True, q_lora_rank=q_lora_rank, kv_lora_rank=10, qk_head_dim=6,
                       qk_pos_emb_head_dim=4, v_head_dim=5)
    cfg_check = Config()
    cfg_check.model, cfg_check.moe.num_experts = cfg, [1]
    cfg_check.validate()
    model = GPT(cfg, MoEConfig(num_experts=[1]), seed=0).double()
    attn = model.blocks[0].attn
    with torch.no_grad():
        for norm in (attn.kv_norm, getattr(attn, "q_norm", None)):
            if norm is not None:
                norm.weight.uniform_(0.5, 1.5)
    x = torch.randn(SEQ, HIDDEN, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    rope = (model.rope_cos.double(), model.rope_sin.double())
    torch.testing.assert_close(attn(x.unsqueeze(0), rope)[0], latent_reference(attn, x, cfg), rtol=1e-6, atol=1e-7)


def test_layer_pattern_is_read_without_eval_and_places_dense_layers_first():
    cfg = parse_train_args(["--num-layers", "5", "--moe-layer-freq", "([0]*2+[1]*3)", "--num-experts", "4"])
    assert cfg.moe.moe_layer_freq == [0, 0, 1, 1, 1] and cfg.experts_per_layer() == [0, 0, 4, 4, 4]
    cfg = parse_train_args(["--num-layers", "5", "--moe-layer-freq", "2", "--num-experts", "4"])
    assert cfg.experts_per_layer() == [4, 0, 4, 0, 4]  # Megatron-Core's integer form: layers 0, 2, 4
    for bad in ("__import__('os')", "[1]*2+3", "[0.5]"):
        with pytest.raises(SystemExit):
            parse_train_args(["--moe-layer-freq", bad])
    cfg = parse_train_args(["--num-layers", "4", "--moe-layer-freq", "[1,0,1]"])
    with pytest.raises(ConfigError, match="--moe-layer-freq lists 3 entries"):
        cfg.validate()


@pytest.mark.parametrize("flags, message", [
    (["--num-query-groups", "3"], "--num-query-groups 3 does not divide"),
    (["--rotary-percent", "0"], "--rotary-percent must be in"),
    (["--model-style", "gpt", "--rotary-percent", "0.5"], "applies to RoPE"),
    (["--qk-norm", "projection", "--tensor-parallel-size", "2"], "tensor parallelism splits"),
    (["--num-query-groups", "1", "--tensor-parallel-size", "2"], "whole key/value heads"),
    (["--multi-latent-attention", "--num-query-groups", "2"], "--num-query-groups does not apply"),
    (["--rope-scaling", "yarn", "--rope-scaling-factor", "0.5"], "--rope-scaling-factor must be at least 1"),
    (["--rope-scaling", "llama3", "--low-freq-factor", "4"], "--high-freq-factor 4.0 must exceed"),
])
def test_attention_options_are_refused_in_one_line(flags, message):
    cfg = parse_train_args(["--model-style", "llama", "--num-experts", "1", *flags])
    with pytest.raises(ConfigError, match=message) as error:
        cfg.validate(world_size=2)
    assert "\n" not in str(error.value)


def test_qk_layernorm_is_megatrons_name_for_per_head_norm():
    assert parse_train_args(["--qk-layernorm"]).model.qk_norm == "head"


@pytest.mark.parametrize("layout", ["mla", "qk-norm-partial-rotary-yarn"])
def test_new_attention_recomputes_to_the_same_gradients(layout):
    options = {"mla": dict(multi_latent_attention=True, q_lora_rank=12, kv_lora_rank=10, qk_head_dim=6,
                           qk_pos_emb_head_dim=4, v_head_dim=5),
               "qk-norm-partial-rotary-yarn": dict(qk_norm="head", rotary_percent=0.5, num_query_groups=2,
                                                   rope_scaling="yarn", rope_scaling_factor=2.0)}[layout]
    tokens = torch.randint(0, 50, (2, SEQ + 1), generator=torch.Generator().manual_seed(1))
    grads = []
    for recompute in (None, "full", "selective"):
        model = GPT(model_config(**options, recompute_granularity=recompute),
                    MoEConfig(num_experts=[4], expert_interval=1, topk=2, drop_tokens=False,
                              top2_2nd_expert_sampling=False), seed=0)
        model(tokens[:, :-1], tokens[:, 1:]).lm_loss.backward()
        grads.append({name: p.grad for name, p in model.named_parameters()})
    for other in grads[1:]:
        for name, grad in grads[0].items():
            torch.testing.assert_close(other[name], grad, rtol=1e-5, atol=1e-7, msg=name)
