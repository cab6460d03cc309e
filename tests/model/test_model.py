"""GPT decoder with MoE FFNs: MoE transformer block, MoE transformer (both styles), layer placement,
parameter counts (hand-computed), RoPE (hand checks) and greedy generation.

Every model here is tiny (2-4 layers, hidden 32, 4 heads, seq 16) so the file runs in a few seconds on CPU.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from moetrain.attention import apply_rope, rope_tables
from moetrain.config import Config, ModelConfig, MoEConfig
from moetrain.model import GPT, Block
from moetrain.moe import MLP, MoE
from moetrain.norm import RMSNorm

VOCAB, HIDDEN, HEADS, SEQ = 50, 32, 4, 16


def model_cfg(style: str = "gpt", **overrides) -> ModelConfig:
    fields = dict(style=style, num_layers=2, hidden_size=HIDDEN, num_attention_heads=HEADS, seq_length=SEQ,
                  vocab_size=VOCAB)
    return ModelConfig(**{**fields, **overrides})


def moe_cfg(**overrides) -> MoEConfig:
    fields = dict(num_experts=[4], expert_interval=1, topk=1)
    return MoEConfig(**{**fields, **overrides})


def build(style: str = "gpt", model_overrides: dict | None = None, seed: int = 0, **moe_overrides) -> GPT:
    torch.manual_seed(seed)
    mc, ec = model_cfg(style, **(model_overrides or {})), moe_cfg(**moe_overrides)
    Config(model=mc, moe=ec).validate()  # every config used here is a valid one
    return GPT(mc, ec)


# ---------------------------------------------------------------------------------------------
# MoE transformer block
# ---------------------------------------------------------------------------------------------
def reference_causal_attention(attn, x: torch.Tensor) -> torch.Tensor:
    """Multi-head causal self-attention written out with an explicit mask (no SDPA)."""
    batch, seq, hidden = x.shape
    heads, head_dim = attn.num_heads, attn.head_dim
    qkv = x @ attn.qkv.weight.T + (attn.qkv.bias if attn.qkv.bias is not None else 0)
    q, k, v = qkv.split(hidden, dim=-1)
    q, k, v = (t.view(batch, seq, heads, head_dim).transpose(1, 2) for t in (q, k, v))
    scores = q @ k.transpose(-1, -2) / math.sqrt(head_dim)
    mask = torch.ones(seq, seq, dtype=torch.bool).triu(1)
    probs = scores.masked_fill(mask, float("-inf")).softmax(-1)
    out = (probs @ v).transpose(1, 2).reshape(batch, seq, hidden)
    return out @ attn.proj.weight.T + (attn.proj.bias if attn.proj.bias is not None else 0)


def test_moe_transformer_block_shapes_laux_and_prenorm_wiring():
    torch.manual_seed(0)
    block = Block(model_cfg("gpt"), moe_cfg(drop_tokens=False), num_experts=4)
    assert isinstance(block.ffn, MoE) and block.ffn.num_experts == 4
    x = torch.randn(2, SEQ, HIDDEN)
    out, l_aux, _ = block(x, None)
    assert out.shape == x.shape
    assert l_aux is not None and l_aux.dim() == 0 and torch.isfinite(l_aux) and l_aux > 0
    # pre-norm residual block: h = x + attn(norm1 x); y = h + moe(norm2 h), with attention written out here
    h = x + reference_causal_attention(block.attn, block.norm1(x))
    moe_out, ref_aux, _ = block.ffn(block.norm2(h))
    torch.testing.assert_close(out, h + moe_out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(l_aux, ref_aux)


def test_moe_transformer_block_gradient_reaches_router_and_experts():
    torch.manual_seed(0)
    block = Block(model_cfg("llama"), moe_cfg(), num_experts=4)
    cos, sin = rope_tables(ModelConfig(seq_length=SEQ, rope_theta=10000.0), HIDDEN // HEADS)
    x = torch.randn(2, SEQ, HIDDEN, requires_grad=True)
    out, l_aux, _ = block(x, (cos, sin))
    (out.square().mean() + l_aux).backward()
    moe = block.ffn
    for name, param in [("router", moe.router.wg.weight), ("w1", moe.experts.w1), ("w2", moe.experts.w2),
                        ("qkv", block.attn.qkv.weight), ("norm2", block.norm2.weight)]:
        assert param.grad is not None, name
        assert torch.isfinite(param.grad).all() and param.grad.abs().sum() > 0, name
    # every expert that received a token got a gradient; no token -> exactly zero
    _, _, counts = moe(block.norm2(x.detach() + block.attn(block.norm1(x.detach()), (cos, sin))))
    for e in range(4):
        has_grad = bool(moe.experts.w1.grad[e].abs().sum() > 0)
        assert has_grad == bool(counts[e] > 0), (e, counts)
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_moe_transformer_block_dense_when_one_expert():
    torch.manual_seed(0)
    block = Block(model_cfg("gpt"), moe_cfg(), num_experts=1)
    assert isinstance(block.ffn, MLP)
    out, l_aux, z_loss = block(torch.randn(1, 4, HIDDEN), None)
    assert out.shape == (1, 4, HIDDEN) and l_aux is None and z_loss is None


# ---------------------------------------------------------------------------------------------
# MoE transformer
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("style", ["gpt", "llama"])
def test_moe_transformer_forward_shapes_and_losses(style):
    model = build(style, num_experts=[4], expert_interval=2, z_loss_coeff=0.1)
    tokens = torch.randint(0, VOCAB, (3, SEQ))
    targets = torch.randint(0, VOCAB, (3, SEQ))
    with torch.no_grad():
        out = model(tokens, targets)
    assert out.logits.shape == (3, SEQ, VOCAB)
    assert out.lm_loss.dim() == 0 and out.aux_loss.dim() == 0 and out.z_loss.dim() == 0
    # independent cross entropy: -log softmax at the target, averaged over all positions
    logp = out.logits.double().log_softmax(-1)
    ref = -logp.gather(-1, targets.unsqueeze(-1)).mean()
    assert abs(float(out.lm_loss) - float(ref)) < 1e-5
    # near-uniform predictions at init (std 0.02): loss close to ln(V)
    assert abs(float(out.lm_loss) - math.log(VOCAB)) < 0.1
    # shorter input works; too long an input is refused
    assert model(tokens[:, :5]).logits.shape == (3, 5, VOCAB)
    assert model(tokens).lm_loss is None
    with pytest.raises(ValueError, match="exceeds seq_length"):
        model(torch.zeros(1, SEQ + 1, dtype=torch.long))


@pytest.mark.parametrize("style", ["gpt", "llama"])
def test_moe_transformer_aux_and_z_loss_are_sums_over_moe_layers(style):
    """aux_loss / z_loss of the output equal the per-layer l_aux and a z-loss recomputed from router inputs."""
    model = build(style, num_experts=[4], expert_interval=1, topk=2)
    router_inputs, laux = [], []
    hooks = [moe.router.register_forward_hook(lambda mod, args, out: router_inputs.append((mod, args[0])))
             for _, moe in model.moe_layers()]
    hooks += [moe.register_forward_hook(lambda mod, args, out: laux.append(out[1]))
              for _, moe in model.moe_layers()]
    model.eval()
    with torch.no_grad():
        out = model(torch.randint(0, VOCAB, (2, SEQ)))
    for hook in hooks:
        hook.remove()
    assert len(router_inputs) == len(laux) == 2
    z_ref = sum(torch.logsumexp(x.double() @ router.wg.weight.detach().double().T, dim=1).square().mean()
                for router, x in router_inputs)
    assert abs(float(out.z_loss) - float(z_ref)) < 1e-5 * float(z_ref)
    assert abs(float(out.aux_loss) - float(sum(laux))) < 1e-6
    assert float(out.aux_loss) > 0


@pytest.mark.parametrize("style", ["gpt", "llama"])
def test_moe_transformer_is_causal(style):
    # drop_tokens=False: with capacity dropping, tokens of the whole batch compete for expert slots (as in
    # DeepSpeed), so a later token can legitimately change whether an earlier token is dropped.
    model = build(style, num_experts=[4], expert_interval=1, drop_tokens=False).eval()
    torch.manual_seed(1)
    tokens = torch.randint(0, VOCAB, (2, SEQ))
    base = model(tokens).logits
    for pos in (5, SEQ - 1):
        changed = tokens.clone()
        changed[:, pos] = (changed[:, pos] + 7) % VOCAB
        logits = model(changed).logits
        torch.testing.assert_close(logits[:, :pos], base[:, :pos], rtol=1e-5, atol=1e-5)
        # the changed position itself (and, for pos 5, later ones) do see the change
        assert (logits[:, pos] - base[:, pos]).abs().max() > 1e-4


@pytest.mark.parametrize("interval,moe_layers", [(1, [0, 1, 2, 3]), (2, [1, 3]), (4, [3])])
def test_moe_transformer_layer_placement(interval, moe_layers):
    model = build("gpt", {"num_layers": 4}, num_experts=[4], expert_interval=interval)
    assert [i for i, _ in model.moe_layers()] == moe_layers
    for i, block in enumerate(model.blocks):
        if i in moe_layers:
            assert isinstance(block.ffn, MoE) and block.ffn.num_experts == 4
            assert block.ffn.experts.w1.shape[0] == 4
        else:
            assert isinstance(block.ffn, MLP)


@pytest.mark.parametrize("interval,layer_experts", [(1, {0: 4, 1: 8}), (2, {1: 4, 3: 8})])
def test_moe_transformer_pyramid_expert_counts(interval, layer_experts):
    num_layers = 2 * interval
    model = build("gpt", {"num_layers": num_layers}, num_experts=[4, 8], expert_interval=interval)
    got = {i: moe.num_experts for i, moe in model.moe_layers()}
    assert got == layer_experts
    for i, moe in model.moe_layers():
        assert moe.router.wg.weight.shape == (layer_experts[i], HIDDEN)
        assert moe.experts.w1.shape[0] == layer_experts[i]
    out = model(torch.randint(0, VOCAB, (2, SEQ)))
    assert out.logits.shape == (2, SEQ, VOCAB)


@pytest.mark.parametrize("counts", [[0], [1]])
def test_moe_transformer_dense_when_zero_or_one_expert(counts):
    model = build("gpt", num_experts=counts, expert_interval=1)
    assert model.moe_layers() == []
    assert not any(isinstance(m, MoE) for m in model.modules())
    assert all(isinstance(b.ffn, MLP) for b in model.blocks)
    out = model(torch.randint(0, VOCAB, (2, SEQ)), torch.randint(0, VOCAB, (2, SEQ)))
    assert float(out.aux_loss) == 0.0 and float(out.z_loss) == 0.0
    counts_ = model.parameter_counts()
    assert counts_["total"] == counts_["active"]


def test_moe_transformer_residual_moe_builds_pr_moe_layers():
    model = build("gpt", num_experts=[4], expert_interval=1, mlp_type="residual")
    layers = model.moe_layers()
    assert len(layers) == 2
    for _, moe in layers:
        assert moe.use_residual
        assert isinstance(moe.mlp, MLP) and isinstance(moe.coefficient, nn.Linear)
        assert moe.coefficient.out_features == 2
    standard = build("gpt", num_experts=[4], expert_interval=1)
    assert all(not moe.use_residual for _, moe in standard.moe_layers())
    # the residual MLP and the coefficient are always active: 2 layers x (fc1 + fc2 + coefficient)
    per_layer_extra = (HIDDEN * 128 + 128) + (128 * HIDDEN + HIDDEN) + (HIDDEN * 2 + 2)
    assert model.parameter_counts()["total"] - standard.parameter_counts()["total"] == 2 * per_layer_extra
    assert model.parameter_counts()["active"] - standard.parameter_counts()["active"] == 2 * per_layer_extra
    out = model(torch.randint(0, VOCAB, (2, SEQ)), torch.randint(0, VOCAB, (2, SEQ)))
    out.lm_loss.backward()
    assert model.blocks[0].ffn.coefficient.weight.grad.abs().sum() > 0
    assert model.blocks[0].ffn.mlp.fc1.weight.grad.abs().sum() > 0


def test_moe_transformer_parameter_counts_gpt_by_hand():
    # gpt: V=50, h=32, T=16, 2 layers, MoE (4 experts, top-1) in layer 1 only, ffn = 4h = 128, biases.
    model = build("gpt", num_experts=[4], expert_interval=2, topk=1)
    embeddings = 128 * 32 + 16 * 32 + 2 * 32  # tokens (50, padded to 128), positions, final LayerNorm (lm_head tied)
    block_common = 4 * 32 + (32 * 96 + 96) + (32 * 32 + 32)  # 2 LayerNorms, qkv, proj
    mlp = (32 * 128 + 128) + (128 * 32 + 32)  # = 8352, also the size of one expert
    moe = 32 * 4 + 4 * mlp  # router (no bias) + 4 experts
    total = embeddings + 2 * block_common + mlp + moe
    assert total == 55264
    counts = model.parameter_counts()
    assert counts["total"] == total == sum(p.numel() for p in model.parameters())
    assert counts["active"] == total - (4 - 1) * mlp == 30208


def test_moe_transformer_parameter_counts_llama_by_hand():
    # llama: no biases, no position table, RMSNorm, SwiGLU at ffn 128 (fc1 32 -> 256), top-2 of 4 in both layers.
    model = build("llama", num_experts=[4], expert_interval=1, topk=2)
    assert model.cfg.ffn_size() == 128
    embeddings = 128 * 32 + 32  # 50 tokens padded to 128 rows
    block_common = 2 * 32 + 32 * 96 + 32 * 32
    expert = 32 * 256 + 128 * 32  # 12288
    moe = 32 * 4 + 4 * expert
    total = embeddings + 2 * (block_common + moe)
    assert total == 111008
    counts = model.parameter_counts()
    assert counts["total"] == total == sum(p.numel() for p in model.parameters())
    assert counts["active"] == total - 2 * (4 - 2) * expert == 61856
    # pyramid [4, 8], top-1: each layer deactivates its own E - k experts
    pyramid = build("llama", num_experts=[4, 8], expert_interval=1, topk=1).parameter_counts()
    assert pyramid["total"] == embeddings + 2 * block_common + (32 * 4 + 4 * expert) + (32 * 8 + 8 * expert)
    assert pyramid["active"] == pyramid["total"] - (3 + 7) * expert


def test_moe_transformer_biases_by_style():
    llama = build("llama", num_experts=[4], expert_interval=1)
    assert [n for n, _ in llama.named_parameters() if "bias" in n.split(".")[-1] or n.endswith(("b1", "b2"))] == []
    assert llama.pos_emb is None
    assert all(isinstance(m, RMSNorm) for m in (llama.norm, llama.blocks[0].norm1))
    gpt = build("gpt", num_experts=[4], expert_interval=1)
    names = {n for n, _ in gpt.named_parameters()}
    for expected in ("blocks.0.attn.qkv.bias", "blocks.0.attn.proj.bias", "blocks.0.norm1.bias",
                     "blocks.0.ffn.experts.b1", "blocks.0.ffn.experts.b2", "norm.bias"):
        assert expected in names
    assert gpt.lm_head.bias is None  # output layer has no bias in either style


def test_moe_transformer_tied_embeddings_share_storage():
    tied = build("gpt", num_experts=[4])
    assert tied.lm_head.weight is tied.tok_emb.weight
    assert tied.lm_head.weight.data_ptr() == tied.tok_emb.weight.data_ptr()
    with torch.no_grad():
        tied.tok_emb.weight[3, 0] = 123.0
    assert tied.lm_head.weight[3, 0] == 123.0
    untied = build("gpt", {"tie_embeddings": False}, num_experts=[4])
    assert untied.lm_head.weight.data_ptr() != untied.tok_emb.weight.data_ptr()
    assert untied.parameter_counts()["total"] - tied.parameter_counts()["total"] == 128 * HIDDEN  # padded rows


# ---------------------------------------------------------------------------------------------
# RoPE
# ---------------------------------------------------------------------------------------------
def test_rms_norm_matches_torch_and_its_gradients_are_exact():
    torch.manual_seed(0)
    norm = RMSNorm(16, eps=1e-5)
    with torch.no_grad():
        norm.weight.normal_()
    x = torch.randn(3, 5, 16, requires_grad=True)
    reference = F.rms_norm(x, [16], norm.weight, 1e-5)
    torch.testing.assert_close(norm(x), reference)
    grad = torch.randn_like(reference)
    expected = torch.autograd.grad(reference, (x, norm.weight), grad)
    torch.testing.assert_close(torch.autograd.grad(norm(x), (x, norm.weight), grad), expected)
    wide = RMSNorm(16, eps=1e-5).double()
    with torch.no_grad():
        wide.weight.normal_()
    assert torch.autograd.gradcheck(wide, (torch.randn(2, 3, 16, dtype=torch.float64, requires_grad=True),))
    half = norm(x.detach().bfloat16())  # statistics in fp32, output in the input's precision
    assert half.dtype == torch.bfloat16
    torch.testing.assert_close(half.float(), reference.detach(), atol=0.05, rtol=0.02)


def test_rope_tables_and_rotation_by_hand():
    cos, sin = rope_tables(ModelConfig(seq_length=4, rope_theta=100.0), 4)
    # angle(t, i) = t / theta^(2i / d): inv_freq = [1, 1/10] for d=4, theta=100
    expected = torch.tensor([[t * 1.0, t / 10.0] for t in range(4)])
    torch.testing.assert_close(cos, torch.cat([expected.cos(), expected.cos()], dim=-1))
    torch.testing.assert_close(sin, torch.cat([-expected.sin(), expected.sin()], dim=-1))  # signed for the first half
    # d=2: the pair (x1, x2) at position t rotates by t radians
    cos2, sin2 = rope_tables(ModelConfig(seq_length=3, rope_theta=10000.0), 2)
    x = torch.tensor([[0.3, -0.7]] * 3)
    out = apply_rope(x, cos2, sin2)
    for t in range(3):
        c, s = math.cos(t), math.sin(t)
        assert out[t].tolist() == pytest.approx([0.3 * c + 0.7 * s, -0.7 * c + 0.3 * s], abs=1e-6)


def test_rope_preserves_norms_and_depends_on_relative_position():
    torch.manual_seed(0)
    T, D = 12, 8
    cos, sin = rope_tables(ModelConfig(seq_length=T, rope_theta=10000.0), D)
    x = torch.randn(2, 3, T, D, dtype=torch.float64)  # [batch, heads, T, head_dim]
    rotated = apply_rope(x, cos.double(), sin.double())
    torch.testing.assert_close(rotated.norm(dim=-1), x.norm(dim=-1))
    # the same q and k placed at every position: q_m . k_n depends only on m - n
    q, k = torch.randn(D, dtype=torch.float64), torch.randn(D, dtype=torch.float64)
    qs = apply_rope(q.expand(T, D), cos.double(), sin.double())
    ks = apply_rope(k.expand(T, D), cos.double(), sin.double())
    dots = qs @ ks.T
    for offset in (0, 1, 3, -2):
        diagonal = torch.diagonal(dots, offset=-offset)  # entries with m - n = offset
        assert (diagonal - diagonal[0]).abs().max() < 1e-6  # tables are float32 angles
    assert abs(float(dots[0, 0]) - float(q @ k)) < 1e-12  # position 0 is the identity
    assert (dots[1, 0] - dots[0, 1]).abs() > 1e-6  # but direction matters: not a symmetric function


# ---------------------------------------------------------------------------------------------
# Generation
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("style", ["gpt", "llama"])
def test_moe_transformer_generate_greedy(style):
    model = build(style, num_experts=[4], expert_interval=1).eval()
    prompt = torch.tensor([[1, 2, 3, 4]])
    out = model.generate(prompt, max_new_tokens=6, temperature=0)
    assert out.shape == (1, 10)
    assert torch.equal(out[:, :4], prompt)
    assert torch.equal(model.generate(prompt, max_new_tokens=6, temperature=0), out)
    # every new token is the argmax of a fresh forward over the prefix before it
    for i in range(4, 10):
        assert int(out[0, i]) == int(model(out[:, :i]).logits[0, -1].argmax())
    # generating past seq_length keeps working on the last seq_length tokens
    long = model.generate(prompt, max_new_tokens=SEQ + 2, temperature=0)
    assert long.shape == (1, 4 + SEQ + 2)
    assert int(long[0, -1]) == int(model(long[:, -SEQ - 1:-1]).logits[0, -1].argmax())
    # eos stops early
    first = int(out[0, 4])
    assert model.generate(prompt, max_new_tokens=6, temperature=0, eos_id=first).shape == (1, 5)


def test_moe_transformer_generate_sampling_seeded():
    model = build("gpt", num_experts=[4], expert_interval=1).eval()
    prompt = torch.tensor([[5, 6]])
    torch.manual_seed(3)
    a = model.generate(prompt, 8, temperature=1.0, top_k=1)
    # top_k=1 sampling is greedy
    assert torch.equal(a, model.generate(prompt, 8, temperature=0))
    torch.manual_seed(3)
    b = model.generate(prompt, 8, temperature=1.5, top_k=10)
    torch.manual_seed(3)
    c = model.generate(prompt, 8, temperature=1.5, top_k=10)
    assert torch.equal(b, c) and b.shape == (1, 10)


# ---------------------------------------------------------------------------------------------
# The model's parallelism plan: tensor-parallel splits, tied weights, pipeline stages
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("style", ["gpt", "llama"])
def test_tp_plan_splits_attention_and_dense_mlps_but_not_routed_experts(style):
    model = build(style, model_overrides={"num_layers": 4}, expert_interval=2, mlp_type="residual",
                  num_shared_experts=1)
    plan = model.tp_plan()
    fused = (1, 1) if style == "llama" else (1,)
    for i in range(4):
        assert plan[f"blocks.{i}.attn.qkv"] == ("column", (4, 4, 4)) and plan[f"blocks.{i}.attn.proj"] == ("row", (1,))
    assert plan["blocks.0.ffn.fc1"] == ("column", fused) and plan["blocks.0.ffn.fc2"] == ("row", (1,))  # dense layer
    for mlp in ("blocks.1.ffn.mlp", "blocks.1.ffn.shared_experts"):  # PR-MoE residual MLP, shared experts
        assert plan[f"{mlp}.fc1"] == ("column", fused) and plan[f"{mlp}.fc2"] == ("row", (1,))
    assert not any(".experts" in name for name in plan)
    assert all(isinstance(model.get_submodule(name), nn.Linear) for name in plan)


def test_tied_parameters_name_the_shared_tensor():
    tied, untied = build("gpt"), build("gpt", model_overrides={"tie_embeddings": False})
    assert tied.tied_parameters() == {"lm_head.weight": "tok_emb.weight"}
    params = dict(tied.named_parameters(remove_duplicate=False))
    assert all(params[a] is params[b] for a, b in tied.tied_parameters().items())
    assert untied.tied_parameters() == {}


@pytest.mark.parametrize("style", ["gpt", "llama"])
def test_pipeline_stages_are_gpts_over_layer_ranges_and_chain_to_the_whole_forward(style):
    model = build(style, model_overrides={"num_layers": 4}, expert_interval=2, drop_tokens=False,
                  use_rts=False).eval()  # deterministic routing
    ids = torch.randint(0, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        whole = model(ids)
        stages = [model.pipeline_stage(range(0, 1)), model.pipeline_stage(range(1, 3)),
                  model.pipeline_stage(range(3, 4))]
        x, aux, z = ids, 0.0, 0.0
        for stage in stages:
            assert isinstance(stage, GPT)
            x, stage_aux, stage_z = stage.forward_stage(x)
            aux, z = aux + stage_aux, z + stage_z
    torch.testing.assert_close(x, whole.hidden)
    torch.testing.assert_close(aux, whole.aux_loss)
    torch.testing.assert_close(z, whole.z_loss)
    assert [[i for i, _ in s.moe_layers()] for s in stages] == [[], [1], [3]]
    assert stages[1].tok_emb is None and stages[1].lm_head is None and stages[0].lm_head is None
    with pytest.raises(ValueError, match="not a run of the 4 layers"):
        model.pipeline_stage(range(2, 6))


@pytest.mark.parametrize("style", ["gpt", "llama"])
def test_position_tables_may_be_longer_than_the_training_length(style):
    """Megatron's --max-position-embeddings above --seq-length: longer tables, the same first positions."""
    torch.manual_seed(0)
    short = GPT(model_cfg(style), moe_cfg())
    torch.manual_seed(0)
    long = GPT(model_cfg(style, max_position_embeddings=2 * SEQ), moe_cfg())
    tables = [long.pos_emb.weight] if style == "gpt" else [long.rope_cos, long.rope_sin]
    assert all(table.shape[0] == 2 * SEQ for table in tables)
    if style == "llama":  # RoPE tables are a function of the position: the short model's are a prefix
        assert torch.equal(long.rope_cos[:SEQ], short.rope_cos) and torch.equal(long.rope_sin[:SEQ], short.rope_sin)
    tokens = torch.randint(0, VOCAB, (2, 2 * SEQ + 1))
    assert long(tokens[:, :2 * SEQ]).logits.shape == (2, 2 * SEQ, VOCAB)
    with pytest.raises(ValueError, match=f"exceeds seq_length {SEQ} and max_position_embeddings {2 * SEQ}"):
        long(tokens)


# ---------------------------------------------------------------------------------------------
# Vocabulary padding (--make-vocab-size-divisible-by)
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("tied", [True, False])
def test_padded_vocabulary_rows_start_zero_are_never_predicted_and_get_no_gradient(tied):
    """50 tokens padded to 128 rows: the same loss and gradients as the unpadded model with the same weights
    (float64 here, so equal to rounding), logits of the 50 tokens only, and no sample of a padding id."""
    padded = build("llama", {"tie_embeddings": tied}, num_experts=[4]).double()
    assert padded.tok_emb.weight.shape[0] == padded.lm_head.weight.shape[0] == 128
    assert not padded.tok_emb.weight[VOCAB:].any() and not padded.lm_head.weight[VOCAB:].any()
    plain = build("llama", {"tie_embeddings": tied, "make_vocab_size_divisible_by": 1}, num_experts=[4]).double()
    plain.load_state_dict({k: v[:VOCAB] if k in ("tok_emb.weight", "lm_head.weight") else v
                           for k, v in padded.state_dict().items()})
    tokens = torch.randint(0, VOCAB, (2, SEQ + 1), generator=torch.Generator().manual_seed(0))
    losses = []
    for model in (padded, plain):
        torch.manual_seed(1)  # the same routing draws (random token selection) for both
        losses.append(model(tokens[:, :-1], tokens[:, 1:]).lm_loss)
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-6, atol=0)  # the softmax runs in fp32
    for loss in losses:
        loss.backward()
    for (name, got), want in zip(padded.named_parameters(), plain.parameters(), strict=True):
        torch.testing.assert_close(got.grad[:want.shape[0]], want.grad, rtol=1e-5, atol=1e-7)
        assert not got.grad[want.shape[0]:].any(), name
    with torch.no_grad():
        padded.lm_head.weight[VOCAB:] = 100.0  # padding rows that would win every argmax if they were shown
    padded.eval()
    assert padded(tokens[:, :SEQ]).logits.shape == (2, SEQ, VOCAB)
    assert int(padded.generate(tokens[:, :4], max_new_tokens=8, temperature=0).max()) < VOCAB
    assert int(padded.generate(tokens[:, :4], max_new_tokens=8, temperature=2.0).max()) < VOCAB
