"""`moetrain import --from-deepspeed` on checkpoint directories written here in Megatron-DeepSpeed's layout.

The MoE layers' keys come from real `deepspeed.moe.layer.MoE` modules (with a Megatron-named expert) and are
split into per-expert files the way DeepSpeedEngine._save_moe_checkpoint splits them, named by DeepSpeed's
own `_get_expert_ckpt_name`; the rest follows Megatron-DeepSpeed's GPT model (per-head [q, k, v] blocks of
query_key_value, grouped for GQA). Importing must give back the moetrain model the files were made from.
"""

from __future__ import annotations

import argparse
import os
import re

import numpy as np
import pytest
import tokenizers
import torch
from torch import nn

pytest.importorskip("deepspeed")

from deepspeed.moe.layer import MoE as DeepSpeedMoE
from deepspeed.runtime.engine import DeepSpeedEngine

from moetrain.checkpoint import CheckpointError, load_model
from moetrain.cli import main
from moetrain.config import Config
from moetrain.data import Tokenizer, build_tokenizer
from moetrain.interop.deepspeed import import_deepspeed
from moetrain.model import GPT

TAG = "global_step7"


class MegatronMLP(nn.Module):
    """The parameter names of Megatron's ParallelMLP, as a DeepSpeed expert."""

    def __init__(self, hidden: int, first_width: int, ffn: int, bias: bool) -> None:
        super().__init__()
        self.dense_h_to_4h = nn.Linear(hidden, first_width, bias=bias)
        self.dense_4h_to_h = nn.Linear(ffn, hidden, bias=bias)


def megatron_qkv(qkv: torch.Tensor, heads: int, kv_heads: int) -> torch.Tensor:
    """moetrain [q; k; v] -> Megatron [kv heads, (q of the group, k, v), head_dim, ...]."""
    groups = heads // kv_heads
    q, k, v = (part.reshape(heads, -1, *qkv.shape[1:]) for part in qkv.chunk(3))
    q = q.reshape(kv_heads, groups, *q.shape[1:])
    k, v = k[::groups].unsqueeze(1), v[::groups].unsqueeze(1)  # one key/value head per group
    return torch.cat([q, k, v], dim=1).reshape(-1, *qkv.shape[1:])


def megatron_module(model: GPT, cfg: Config, kv_heads: int) -> dict[str, torch.Tensor]:
    """The full Megatron-DeepSpeed state dict of `model`, MoE layers made by DeepSpeed's MoE."""
    sd, gpt, heads = model.state_dict(), cfg.model.style == "gpt", cfg.model.num_attention_heads
    out = {"language_model.embedding.word_embeddings.weight": sd["tok_emb.weight"],
           "language_model.encoder.final_layernorm.weight": sd["norm.weight"]}
    if gpt:
        out["language_model.embedding.position_embeddings.weight"] = sd["pos_emb.weight"]
        out["language_model.encoder.final_layernorm.bias"] = sd["norm.bias"]
    if not cfg.model.tie_embeddings:
        out["language_model.output_layer.weight"] = sd["lm_head.weight"]
    names = {"norm1": "input_layernorm", "norm2": "post_attention_layernorm", "attn.proj": "self_attention.dense"}
    for i, (block, experts) in enumerate(zip(model.blocks, cfg.experts_per_layer(), strict=True)):
        src, dst = f"blocks.{i}.", f"language_model.encoder.layers.{i}."
        for ours, theirs in names.items():
            for kind in ("weight", "bias"):
                if f"{src}{ours}.{kind}" in sd:
                    out[f"{dst}{theirs}.{kind}"] = sd[f"{src}{ours}.{kind}"]
        for kind in ("weight", "bias"):
            if f"{src}attn.qkv.{kind}" in sd:
                out[f"{dst}self_attention.query_key_value.{kind}"] = megatron_qkv(sd[f"{src}attn.qkv.{kind}"], heads,
                                                                                  kv_heads)
        ffn = block.ffn
        if not experts:
            out |= {f"{dst}mlp.dense_h_to_4h.{k}": v for k, v in ffn.fc1.state_dict().items()}
            out |= {f"{dst}mlp.dense_4h_to_h.{k}": v for k, v in ffn.fc2.state_dict().items()}
            continue
        w1, w2 = ffn.experts.w1, ffn.experts.w2
        expert = MegatronMLP(cfg.model.hidden_size, w1.shape[2], w2.shape[1], bias=gpt)
        ds = DeepSpeedMoE(cfg.model.hidden_size, expert, num_experts=experts, k=cfg.moe.topk,
                          use_residual=cfg.moe.mlp_type == "residual")
        with torch.no_grad():
            ds.deepspeed_moe.gate.wg.weight.copy_(ffn.router.wg.weight)
            for e, linear in enumerate(ds.deepspeed_moe.experts.deepspeed_experts):
                linear.dense_h_to_4h.weight.copy_(w1[e].t())
                linear.dense_4h_to_h.weight.copy_(w2[e].t())
                if gpt:
                    linear.dense_h_to_4h.bias.copy_(ffn.experts.b1[e])
                    linear.dense_4h_to_h.bias.normal_()  # DeepSpeed never applies it
            if ds.use_residual:
                ds.mlp.dense_h_to_4h.load_state_dict(ffn.mlp.fc1.state_dict())
                ds.mlp.dense_4h_to_h.weight.copy_(ffn.mlp.fc2.weight)
                ds.mlp.dense_4h_to_h.bias.normal_()  # not applied either
                ds.coefficient.load_state_dict(ffn.coefficient.state_dict())
        out |= {f"{dst}mlp.{k}": v for k, v in ds.state_dict().items()}
    return out


def write_checkpoint(root, model: GPT, cfg: Config, *, kv_heads: int | None = None, args: dict | None = None,
                     client_state: dict | None = None, old_names: bool = False) -> str:
    """SAVE/latest + SAVE/global_step7/{mp_rank_00_model_states.pt, layer_L_expert_E_mp_rank_00_model_states.pt}."""
    module = megatron_module(model, cfg, kv_heads or cfg.model.num_attention_heads)
    if old_names:
        module = {re.sub(r"self_attention\.", "attention.", k.replace(".encoder.", ".transformer.")): v
                  for k, v in module.items()}
    os.makedirs(os.path.join(root, TAG))
    moe_layers = [i for i, count in enumerate(cfg.experts_per_layer()) if count]
    for moe_layer_id, i in enumerate(moe_layers):  # as _save_moe_checkpoint: one file per (layer, expert)
        experts: dict[str, dict[str, torch.Tensor]] = {}
        for key in [k for k in module if re.search(rf"layers\.{i}\.mlp\.", k)]:
            if "expert" in key and "moe.gate.wg.weight" not in key:
                expert_id = re.search(r"deepspeed_experts\.(\d+)\.", key).group(1)
                experts.setdefault(expert_id, {})[key] = module.pop(key)
        for expert_id, tensors in experts.items():
            torch.save(tensors, DeepSpeedEngine._get_expert_ckpt_name(str(root), moe_layer_id, expert_id, TAG))
    state = {"module": module, "iteration": 7, "ds_version": "0.19.8", **(client_state or {})}
    if args is not None:
        state["args"] = argparse.Namespace(**args)
    torch.save(state, os.path.join(root, TAG, "mp_rank_00_model_states.pt"))
    with open(os.path.join(root, "latest"), "w") as f:
        f.write(TAG)
    return str(root)


def random_model(cfg: Config, seed: int = 0) -> GPT:
    """Every weight random (biases too); the biases DeepSpeed's experts and residual MLP ignore set to zero."""
    torch.manual_seed(seed)
    model = GPT(cfg.model, cfg.moe)
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.normal_(0.0, 0.5 if "router" in name else 0.1)
            if name.endswith(("experts.b2", "mlp.fc2.bias")):
                param.zero_()
    return model


def gpt_config() -> Config:
    cfg = Config()
    m = cfg.model
    m.style, m.num_layers, m.hidden_size, m.num_attention_heads, m.seq_length, m.vocab_size = "gpt", 4, 32, 4, 32, 260
    moe = cfg.moe
    moe.num_experts, moe.expert_interval, moe.topk, moe.mlp_type = [4, 8], 2, 2, "residual"
    moe.train_capacity_factor, moe.eval_capacity_factor, moe.drop_tokens = 1.5, 2.0, True
    moe.top2_2nd_expert_sampling = False
    return cfg


GPT_ARGS = dict(num_layers=4, hidden_size=32, num_attention_heads=4, seq_length=32, max_position_embeddings=32,
                num_experts=[4, 8], expert_interval=2, topk=2, mlp_type="residual", moe_train_capacity_factor=1.5,
                moe_eval_capacity_factor=2.0, moe_min_capacity=4, moe_token_dropping=True,
                moe_top2_2nd_expert_sampling=False, layernorm_epsilon=1e-5, bias_gelu_fusion=False, swiglu=False,
                params_dtype=torch.float32)


@pytest.fixture
def tokenizer_file(tmp_path):
    path = tmp_path / "tokenizer.json"
    build_tokenizer("byte").save(path)
    return str(path)


def assert_same_model(path: str, model: GPT) -> None:
    imported, _, _ = load_model(path)
    assert imported.state_dict().keys() == model.state_dict().keys()
    for name, tensor in model.state_dict().items():
        assert torch.equal(imported.state_dict()[name], tensor), name
    tokens = torch.randint(0, 257, (2, 9))
    with torch.no_grad():  # the byte tokenizer's 257 tokens are predicted; the rest of the rows pad the head
        got, want = imported(tokens).logits, model.eval()(tokens).logits
    assert got.shape[-1] == 257 and torch.equal(got, want[..., :257])


@pytest.mark.parametrize("old_names", [False, True])
def test_gpt_style_pyramid_residual_moe_with_megatron_args(tmp_path, tokenizer_file, old_names):
    cfg = gpt_config()
    model = random_model(cfg)
    root = write_checkpoint(tmp_path / "ds", model, cfg, args=GPT_ARGS, old_names=old_names)
    imported_cfg, path = import_deepspeed(root, str(tmp_path / "ckpt"), build_tokenizer("byte"))
    assert imported_cfg.experts_per_layer() == [0, 4, 0, 8]
    moe = imported_cfg.moe
    assert (moe.mlp_type, moe.topk, moe.drop_tokens, moe.train_capacity_factor) == ("residual", 2, True, 1.5)
    assert imported_cfg.model.tie_embeddings and imported_cfg.model.style == "gpt"
    assert_same_model(path, model)


def test_llama_style_gqa_untied_dense_slot_through_the_cli(tmp_path, tokenizer_file, capsys):
    cfg = Config()
    m = cfg.model
    m.style, m.num_layers, m.hidden_size, m.num_attention_heads, m.seq_length = "llama", 2, 32, 4, 16
    m.vocab_size, m.tie_embeddings = 257, False
    cfg.moe.num_experts, cfg.moe.expert_interval, cfg.moe.topk = [4, 1], 1, 2  # layer 1 stays dense
    cfg.moe.top2_2nd_expert_sampling, cfg.moe.drop_tokens = False, False
    model = random_model(cfg)
    with torch.no_grad():  # grouped-query attention: heads 0-1 and 2-3 share their key and value
        for block in model.blocks:
            k, v = block.attn.qkv.weight[32:64].view(4, 8, 32), block.attn.qkv.weight[64:].view(4, 8, 32)
            k[1], k[3], v[1], v[3] = k[0], k[2], v[0], v[2]
    args = dict(num_attention_heads=4, num_key_value_heads=2, seq_length=16, max_position_embeddings=16, topk=2,
                swiglu=True, normalization="rmsnorm", moe_top2_2nd_expert_sampling=False)
    root = write_checkpoint(tmp_path / "ds", model, cfg, kv_heads=2, args=args)
    out = str(tmp_path / "ckpt")
    with pytest.raises(SystemExit) as exited:
        main(["import", "--from-deepspeed", os.path.join(root, TAG), "--out", out, "--tokenizer", tokenizer_file,
              "--disable-moe-token-dropping"])
    assert exited.value.code == 0
    assert "--tokenizer-type json" in capsys.readouterr().out
    _, _, saved = load_model(out)
    assert saved.experts_per_layer() == [4, 0] and not saved.moe.drop_tokens  # the flag over the args' default
    assert saved.model.style == "llama" and not saved.model.tie_embeddings
    assert_same_model(out, model)


def test_pickled_extras_need_trust_checkpoint(tmp_path, tokenizer_file):
    cfg = gpt_config()
    model = random_model(cfg)
    rng = {"random_rng_state": np.random.get_state()}  # what Megatron stores: numpy objects
    root = write_checkpoint(tmp_path / "ds", model, cfg, args=GPT_ARGS, client_state={"rng_state": [rng]})
    with pytest.raises(CheckpointError, match="numpy.*--trust-checkpoint"):
        import_deepspeed(root, str(tmp_path / "ckpt"), build_tokenizer("byte"))
    _, path = import_deepspeed(root, str(tmp_path / "ckpt"), build_tokenizer("byte"), trust_checkpoint=True)
    assert_same_model(path, model)


def test_without_args_the_flags_fill_in_what_weights_cannot_tell(tmp_path):
    cfg = gpt_config()
    cfg.moe.drop_tokens = False
    model = random_model(cfg)
    root = write_checkpoint(tmp_path / "ds", model, cfg)
    overrides = {"model.num_attention_heads": 4, "moe.topk": 2, "moe.drop_tokens": False,
                 "moe.top2_2nd_expert_sampling": False, "moe.train_capacity_factor": 1.5,
                 "moe.eval_capacity_factor": 2.0}
    # without args, Megatron's default fused bias-GeLU (tanh approximation) is assumed, and said
    with pytest.warns(UserWarning, match="tanh approximation"):
        with pytest.raises(ValueError, match="pass --num-attention-heads"):
            import_deepspeed(root, str(tmp_path / "ckpt"), build_tokenizer("byte"))
        with pytest.raises(ValueError, match="model.num_layers = 3 contradicts the checkpoint's weights, which give 4"):
            import_deepspeed(root, str(tmp_path / "ckpt"), build_tokenizer("byte"),
                             overrides=overrides | {"model.num_layers": 3})
        _, path = import_deepspeed(root, str(tmp_path / "ckpt"), build_tokenizer("byte"), overrides=overrides)
    assert_same_model(path, model)


def test_missing_and_mismatched_files_are_named(tmp_path):
    tokenizer = build_tokenizer("byte")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        import_deepspeed(str(tmp_path / "nowhere"), str(tmp_path / "out"), tokenizer)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no mp_rank_00_model_states.pt"):
        import_deepspeed(str(tmp_path / "empty"), str(tmp_path / "out"), tokenizer)

    cfg = gpt_config()
    root = write_checkpoint(tmp_path / "ds", random_model(cfg), cfg, args=GPT_ARGS)
    expert_file = DeepSpeedEngine._get_expert_ckpt_name(root, 1, 3, TAG)
    os.rename(expert_file, expert_file + ".moved")
    with pytest.raises(FileNotFoundError, match=r"expert 3 \(layer_1_expert_3_mp_rank_00") as error:
        import_deepspeed(root, str(tmp_path / "out"), tokenizer)
    assert "\n" not in str(error.value)
    os.rename(expert_file + ".moved", expert_file)
    backend = tokenizers.Tokenizer.from_str(tokenizer.to_json())
    backend.add_special_tokens([f"<extra_{i}>" for i in range(130)])  # past the 384 rows 260 tokens pad to
    with pytest.raises(ValueError, match="the tokenizer has 387 tokens but the model's embedding only 384"):
        import_deepspeed(root, str(tmp_path / "out"), Tokenizer(backend))
    torch.save({}, os.path.join(root, TAG, "mp_rank_01_model_states.pt"))
    with pytest.raises(ValueError, match="several tensor-parallel ranks"):
        import_deepspeed(root, str(tmp_path / "out"), tokenizer)
