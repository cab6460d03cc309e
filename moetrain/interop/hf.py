"""Hugging Face export and import: moetrain checkpoints <-> transformers model directories.

Export writes what `transformers.AutoModelForCausalLM.from_pretrained(OUT)` loads as a native class
(config.json, safetensors in the Hub's layout, tokenizer.json + tokenizer_config.json), and refuses any
model whose outputs that class cannot reproduce. Only llama-style moetrain models (RoPE, RMSNorm, SwiGLU)
have Hugging Face counterparts; the class is chosen by the attention and the MoE layout:

- dense -> LlamaForCausalLM
- sigmoid scores (with an optional selection-only expert bias, groups, a top-k scaling factor, ungated shared
  experts, dense first layers, partial rotary, per-head QK-norm, q/k/v biases) -> Glm4MoeForCausalLM
- --qk-norm projection, softmax top-k (renormalised or pre-softmax) in every layer -> OlmoeForCausalLM
- --qk-norm head, softmax top-k, no shared expert -> Qwen3MoeForCausalLM
- MoE in every layer, top-k >= 2, no shared experts, no expert bias -> MixtralForCausalLM
- top-1 (the expert output weighted by its gate probability, DeepSpeed's top-1), MoE every N-th layer,
  pre-softmax weights (--moe-router-pre-softmax: norm_topk_prob = false) or a sigmoid-gated shared expert
  (--moe-shared-expert-gate), without expert bias -> Qwen2MoeForCausalLM (norm_topk_prob = k > 1 unless
  pre-softmax; without a gated shared expert an empty one, since Qwen2-MoE always adds one)
- shared experts (added ungated, DeepSeek-style) or an aux-loss-free expert bias, top-k >= 2, softmax
  -> Ernie4_5_MoeForCausalLM (its e_score_correction_bias is the same selection-only bias; its
  interleaved RoPE layout is matched by permuting the query/key rows)

Refused: GPT style (learned positions, LayerNorm, GELU, biases), residual MoE (PR-MoE), pyramid expert
counts, group-limited routing or a top-k scaling factor with softmax scores, Sinkhorn routing, top-1 with
shared experts, expert bias or sigmoid scores, and an attention feature the chosen class lacks. Capacity
dropping and top-2 second-expert sampling (stochastic, eval included) have no Hugging Face equivalent either;
export refuses them unless `dropless=True` (`--dropless`) asks for the model with plain dropless top-k routing,
whose outputs then differ from moetrain's wherever moetrain would drop a token or sample a second expert.
Training-only settings (noisy gating, z-loss, dropout) do not affect the exported outputs and are not
carried; router_aux_loss_coef is.

Import reads a local directory of one of these classes (and dense Mistral) into a moetrain checkpoint,
grouped-query attention kept as --num-query-groups, and refuses in one line, naming the config field, what
moetrain would compute differently (RoPE scaling, clip_qkv, biases elsewhere, a routing rule it lacks).
One key map (`_links`) serves both directions. transformers is an optional dependency:
`pip install "moetrain[hf]"`.
"""

from __future__ import annotations

import contextlib
import functools
import os
import pickle
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from moetrain.checkpoint import CheckpointError, load_model
from moetrain.config import Config
from moetrain.data import DataError, Tokenizer
from moetrain.interop.checkpoint import check_new_checkpoint_dir, save_model_checkpoint

IMPORTABLE = ("llama", "mistral", "mixtral", "qwen2_moe", "ernie4_5_moe", "qwen3_moe", "olmoe", "glm4_moe",
              "deepseek_v2", "deepseek_v3")


@dataclass(frozen=True)
class _Target:
    """One transformers class: where moetrain's pieces live in it and which attention features it has."""

    architecture: str
    model_type: str
    interleaved_rope: bool = False  # rotates pairs (2i, 2i + 1) instead of (i, i + head_dim / 2)
    qk_norm: tuple[str | None, ...] = (None,)  # the --qk-norm values it can hold
    head_dim: bool = False  # a head width other than hidden / heads (config head_dim)
    qkv_bias: bool = False  # optional biases on q, k, v only
    partial_rotary: bool = False
    latent: bool = False  # Multi-head Latent Attention


LLAMA = _Target("LlamaForCausalLM", "llama", head_dim=True)
MISTRAL = _Target("MistralForCausalLM", "mistral", head_dim=True)
MIXTRAL = _Target("MixtralForCausalLM", "mixtral", head_dim=True)
QWEN2_MOE = _Target("Qwen2MoeForCausalLM", "qwen2_moe", qkv_bias=True)
ERNIE = _Target("Ernie4_5_MoeForCausalLM", "ernie4_5_moe", interleaved_rope=True)
QWEN3_MOE = _Target("Qwen3MoeForCausalLM", "qwen3_moe", qk_norm=("head",), head_dim=True)
OLMOE = _Target("OlmoeForCausalLM", "olmoe", qk_norm=("projection",))
GLM4_MOE = _Target("Glm4MoeForCausalLM", "glm4_moe", qk_norm=(None, "head"), head_dim=True, qkv_bias=True,
                   partial_rotary=True)
DEEPSEEK_V2 = _Target("DeepseekV2ForCausalLM", "deepseek_v2", interleaved_rope=True, latent=True)
DEEPSEEK_V3 = _Target("DeepseekV3ForCausalLM", "deepseek_v3", latent=True)  # exported with rope_interleave false
_BY_MODEL_TYPE = {t.model_type: t for t in (LLAMA, MISTRAL, MIXTRAL, QWEN2_MOE, ERNIE, QWEN3_MOE, OLMOE, GLM4_MOE,
                                            DEEPSEEK_V2, DEEPSEEK_V3)}
_SOFTMAX_TOPK = (QWEN2_MOE, QWEN3_MOE, OLMOE, DEEPSEEK_V2)  # softmax scores, renormalised over the top-k or not
_SIGMOID_BIASED = (GLM4_MOE, DEEPSEEK_V3)  # sigmoid scores, a selection-only bias, groups, routed_scaling_factor
_FIRST_DENSE = (GLM4_MOE, DEEPSEEK_V2, DEEPSEEK_V3)  # dense first_k_dense_replace layers, then MoE; shared experts


def _transformers() -> Any:
    try:
        import transformers
    except ImportError:
        raise ValueError('Hugging Face export/import needs transformers; install it with pip install "moetrain[hf]"') \
            from None
    return transformers


# ------------------------------------------------------------------------------------------- the choice


def hf_target(cfg: Config) -> _Target:
    """The transformers class that reproduces cfg's model, or a ValueError saying why none does."""
    target = _moe_target(cfg)
    _check_attention(cfg, target)
    return target


def _moe_target(cfg: Config) -> _Target:
    """The class chosen by the attention's QK norm and the MoE layout."""
    model, moe = cfg.model, cfg.moe
    if model.style != "llama":
        raise ValueError("GPT-style models (learned positions, LayerNorm, GELU, biases) have no Hugging Face "
                         "counterpart in export; train with --model-style llama")
    if not moe.is_moe:
        return LLAMA
    counts = {count for count in cfg.experts_per_layer() if count}
    if len(counts) > 1:
        raise ValueError(f"pyramid expert counts {sorted(counts)} have no Hugging Face counterpart (every MoE layer "
                         "of a transformers model has the same number of experts)")
    if moe.mlp_type == "residual":
        raise ValueError("residual MoE (--mlp-type residual, PR-MoE) has no Hugging Face counterpart")
    if "sinkhorn" in (moe.load_balancing_type or []):
        raise ValueError("Sinkhorn routing (--moe-router-load-balancing-type sinkhorn) has no Hugging Face "
                         "counterpart among the supported classes")
    sampled = moe.topk == 2 and moe.top2_2nd_expert_sampling and not moe.expert_bias
    if moe.drop_tokens or sampled:
        what = "capacity dropping (--disable-moe-token-dropping is off)" if moe.drop_tokens else \
            "top-2 second-expert sampling (--disable-moe-top2-2nd-expert-sampling is off)"
        raise ValueError(f"the model uses {what}, which Hugging Face MoE classes do not have; fine-tune without it, "
                         "or pass --dropless to export it with plain dropless top-k routing (its outputs then "
                         "differ from moetrain's where moetrain drops tokens or samples experts)")
    shared = bool(moe.num_shared_experts or moe.shared_expert_ffn_size)
    if model.multi_latent_attention:
        return _latent_target(cfg)
    if moe.score_func == "sigmoid":
        if moe.shared_expert_gate or moe.topk == 1:
            raise ValueError("sigmoid routing (--moe-score-func sigmoid) exports as GLM-4.5-MoE, which has no gated "
                             "shared expert and renormalises the top-1 weight to 1; use --topk 2 or more, ungated")
        return GLM4_MOE
    for name, value, flag in (("group-limited routing", moe.num_groups, "--moe-router-num-groups"),
                              ("a top-k scaling factor", moe.topk_scaling_factor, "--moe-router-topk-scaling-factor")):
        if value:
            raise ValueError(f"{name} ({flag}) with softmax scores has no Hugging Face counterpart among the supported "
                             "classes (GLM-4.5-MoE has it with --moe-score-func sigmoid)")
    if model.qk_norm == "projection":
        if shared or moe.expert_bias or moe.topk == 1 or cfg.experts_per_layer().count(0):
            raise ValueError("--qk-norm projection exports as OLMoE, which has experts in every layer, top-k >= 2, "
                             "no shared expert and no expert bias")
        return OLMOE
    if model.qk_norm == "head":
        if shared or moe.expert_bias or moe.topk == 1:
            raise ValueError("--qk-norm head with softmax routing exports as Qwen3-MoE, which has no shared expert, no "
                             "expert bias and renormalises the top-1 weight to 1; use --topk 2 or more")
        return QWEN3_MOE
    if moe.shared_expert_gate or (moe.pre_softmax and moe.topk > 1):
        if moe.expert_bias:
            raise ValueError("a gated shared expert or pre-softmax weights with an expert bias have no Hugging Face "
                             "counterpart (Qwen2-MoE has no selection bias)")
        return QWEN2_MOE
    if shared or moe.expert_bias:
        if moe.topk == 1:
            raise ValueError("top-1 routing with shared experts or an expert bias has no Hugging Face counterpart "
                             "(ERNIE-4.5, which has both, renormalises the top-1 weight to 1); use --topk 2 or more")
        return ERNIE
    if moe.topk > 1 and all(cfg.experts_per_layer()):
        return MIXTRAL
    return QWEN2_MOE


def _latent_target(cfg: Config) -> _Target:
    """DeepSeek-V3 for sigmoid routing, DeepSeek-V2 for softmax (which never renormalises the top-k)."""
    moe = cfg.moe
    if moe.shared_expert_gate:
        raise ValueError("DeepSeek-V2/V3, the classes with Multi-head Latent Attention, have no gated shared expert")
    if moe.score_func == "sigmoid":
        if moe.topk == 1:
            raise ValueError("sigmoid routing with MLA exports as DeepSeek-V3, which renormalises the top-1 weight to "
                             "1; use --topk 2 or more")
        return DEEPSEEK_V3
    if moe.expert_bias or (moe.topk > 1 and not moe.pre_softmax):
        raise ValueError("softmax routing with MLA exports as DeepSeek-V2, which has no expert bias and never "
                         "renormalises the top-k weights; use --moe-router-pre-softmax, or sigmoid scores (V3)")
    return DEEPSEEK_V2


def _check_attention(cfg: Config, target: _Target) -> None:
    """Refuse attention features the chosen class does not have."""
    model = cfg.model
    own_width = model.head_dim() * model.num_attention_heads != model.hidden_size
    features = ((f"--qk-norm {model.qk_norm}", model.qk_norm not in target.qk_norm, False),
                (f"--kv-channels {model.kv_channels}", own_width, target.head_dim),
                ("--add-qkv-bias", model.add_qkv_bias, target.qkv_bias),
                (f"--rotary-percent {model.rotary_percent}", model.rotary_percent != 1.0, target.partial_rotary),
                ("--multi-latent-attention", model.multi_latent_attention, target.latent))
    missing = [what for what, used, held in features if used and not held]
    if missing:
        raise ValueError(f"{target.architecture}, the class this MoE layout exports as, has no {missing[0]}")


def _moe_layers(target: _Target, hf_config: Any) -> list[bool]:
    """Which layers of a transformers model of this class hold experts (the class's own rule)."""
    layers = range(hf_config.num_hidden_layers)
    if target in (MIXTRAL, OLMOE):
        return [True for _ in layers]
    if target in (QWEN2_MOE, QWEN3_MOE):
        return [i not in hf_config.mlp_only_layers and (i + 1) % hf_config.decoder_sparse_step == 0
                and _num_experts(hf_config) > 0 for i in layers]
    if target is ERNIE:
        return [(i + 1) % hf_config.moe_layer_interval == 0
                and hf_config.moe_layer_start_index <= i <= hf_config.moe_layer_end_index for i in layers]
    if target in _FIRST_DENSE:
        return [i >= hf_config.first_k_dense_replace for i in layers]
    return [False for _ in layers]


def _num_experts(hf_config: Any) -> int:
    for name in ("num_local_experts", "n_routed_experts", "moe_num_experts", "num_experts"):
        if getattr(hf_config, name, None):
            return getattr(hf_config, name)
    return 0


def _hf_config(cfg: Config, target: _Target, eos_id: int) -> Any:
    model, moe = cfg.model, cfg.moe
    experts_per_layer = cfg.experts_per_layer()
    moe_layers = [i for i, count in enumerate(experts_per_layer) if count]
    rope = _rope_parameters(cfg)
    if target.partial_rotary:
        rope["partial_rotary_factor"] = model.rotary_percent
    common = dict(
        vocab_size=model.vocab_size, hidden_size=model.hidden_size, num_hidden_layers=model.num_layers,
        num_attention_heads=model.num_attention_heads, num_key_value_heads=model.kv_heads(),
        max_position_embeddings=model.positions(), rms_norm_eps=model.norm_eps, hidden_act="silu",
        rope_parameters=rope, tie_word_embeddings=model.tie_embeddings, initializer_range=model.init_method_std,
        bos_token_id=eos_id, eos_token_id=eos_id)
    if target.head_dim:
        common["head_dim"] = model.head_dim()
    if target.latent:
        common["head_dim"] = model.qk_pos_emb_head_dim  # the rotary width, as DeepSeek's configs carry it
    num_experts, expert_ffn = max(experts_per_layer), moe.expert_ffn_size(model)
    routing = dict(num_experts_per_tok=moe.topk, router_aux_loss_coef=moe.aux_loss_coeff)
    dense_layers = [i for i, count in enumerate(experts_per_layer) if not count]
    if target is LLAMA:
        specific = dict(intermediate_size=model.ffn_size(), attention_bias=False, mlp_bias=False)
    elif target is MIXTRAL:
        specific = dict(intermediate_size=expert_ffn, num_local_experts=num_experts, sliding_window=None,
                        router_jitter_noise=0.0, **routing)
    elif target is QWEN2_MOE:
        slots = range(moe.expert_interval - 1, model.num_layers, moe.expert_interval)
        interval = moe.expert_interval if moe.moe_layer_freq is None else 1
        specific = dict(intermediate_size=model.ffn_size(), moe_intermediate_size=expert_ffn,
                        shared_expert_intermediate_size=_shared_width(cfg) if moe.shared_expert_gate else 0,
                        num_experts=num_experts, norm_topk_prob=moe.topk > 1 and not moe.pre_softmax,
                        decoder_sparse_step=interval, mlp_only_layers=[i for i in slots if not experts_per_layer[i]]
                        if moe.moe_layer_freq is None else dense_layers, qkv_bias=model.add_qkv_bias,
                        use_sliding_window=False, **routing)
    elif target is QWEN3_MOE:
        specific = dict(intermediate_size=model.ffn_size(), moe_intermediate_size=expert_ffn, num_experts=num_experts,
                        norm_topk_prob=not moe.pre_softmax, decoder_sparse_step=1, mlp_only_layers=dense_layers,
                        attention_bias=False, use_sliding_window=False, **routing)
    elif target is OLMOE:
        specific = dict(intermediate_size=expert_ffn, num_experts=num_experts, norm_topk_prob=not moe.pre_softmax,
                        clip_qkv=None, attention_bias=False, **routing)
    elif target in (DEEPSEEK_V2, DEEPSEEK_V3):
        specific = dict(intermediate_size=model.ffn_size(), moe_intermediate_size=expert_ffn,
                        n_routed_experts=num_experts, n_shared_experts=_shared_experts(cfg),
                        first_k_dense_replace=len(dense_layers), q_lora_rank=model.q_lora_rank,
                        kv_lora_rank=model.kv_lora_rank, qk_nope_head_dim=model.qk_head_dim,
                        qk_rope_head_dim=model.qk_pos_emb_head_dim, v_head_dim=model.v_head_dim,
                        routed_scaling_factor=moe.topk_scaling_factor or 1.0, n_group=moe.num_groups or 1,
                        topk_group=moe.group_topk or 1, norm_topk_prob=target is DEEPSEEK_V3, attention_bias=False,
                        **routing)
        specific |= {"rope_interleave": False} if target is DEEPSEEK_V3 else {
            "topk_method": "group_limited_greedy" if moe.num_groups else "greedy"}
    elif target is GLM4_MOE:
        specific = dict(intermediate_size=model.ffn_size(), moe_intermediate_size=expert_ffn,
                        n_routed_experts=num_experts, n_shared_experts=_shared_experts(cfg),
                        n_group=moe.num_groups or 1, topk_group=moe.group_topk or 1, norm_topk_prob=True,
                        routed_scaling_factor=moe.topk_scaling_factor or 1.0, first_k_dense_replace=len(dense_layers),
                        use_qk_norm=model.qk_norm == "head", attention_bias=model.add_qkv_bias, **routing)
    else:
        specific = dict(intermediate_size=model.ffn_size(), moe_intermediate_size=expert_ffn,
                        moe_num_experts=num_experts, moe_k=moe.topk, moe_num_shared_experts=_shared_experts(cfg),
                        moe_layer_interval=moe.expert_interval,
                        moe_layer_start_index=moe_layers[0], moe_layer_end_index=moe_layers[-1],
                        use_bias=False, router_aux_loss_coef=moe.aux_loss_coeff)
    if target in _FIRST_DENSE and dense_layers != list(range(len(dense_layers))):
        raise ValueError(f"dense layers {dense_layers} are not the first layers; {target.architecture} has its dense "
                         "layers first (first_k_dense_replace): use --moe-layer-freq '([0]*K+[1]*N)'")
    config_class = getattr(_transformers(), target.architecture.replace("ForCausalLM", "Config"))
    hf_config = config_class(**common, **specific)
    if _moe_layers(target, hf_config) != [bool(count) for count in experts_per_layer]:
        raise ValueError(f"MoE layers {moe_layers} of {model.num_layers} cannot be expressed in {target.architecture}")
    return hf_config


def _rope_parameters(cfg: Config) -> dict[str, Any]:
    """transformers' rope_parameters for cfg's RoPE and its scaling."""
    model = cfg.model
    rope: dict[str, Any] = {"rope_type": model.rope_scaling or "default", "rope_theta": model.rope_theta}
    if model.rope_scaling:
        rope |= {"factor": model.rope_scaling_factor, "original_max_position_embeddings": model.original_positions()}
    if model.rope_scaling == "yarn":
        rope |= {"beta_fast": model.beta_fast, "beta_slow": model.beta_slow, "truncate": True}
        rope |= {name: getattr(model, name) for name in ("mscale", "mscale_all_dim") if getattr(model, name)}
    elif model.rope_scaling == "llama3":
        rope |= {"low_freq_factor": model.low_freq_factor, "high_freq_factor": model.high_freq_factor}
    return rope


def _read_rope_scaling(rope: dict[str, Any], cfg: Config) -> None:
    """cfg's --rope-scaling options from transformers' rope_parameters."""
    model = cfg.model
    model.rope_scaling = None if rope.get("rope_type", "default") == "default" else rope["rope_type"]
    if model.rope_scaling is None:
        return
    model.rope_scaling_factor = float(rope["factor"])
    model.original_max_position_embeddings = rope.get("original_max_position_embeddings")
    if model.rope_scaling == "yarn":
        model.beta_fast, model.beta_slow = float(rope.get("beta_fast") or 32), float(rope.get("beta_slow") or 1)
        model.mscale, model.mscale_all_dim = rope.get("mscale"), rope.get("mscale_all_dim")
    else:
        model.low_freq_factor, model.high_freq_factor = rope["low_freq_factor"], rope["high_freq_factor"]


def _shared_width(cfg: Config) -> int:
    """The shared expert's FFN width (0 without one), as MoE builds it."""
    moe = cfg.moe
    if moe.shared_expert_ffn_size is not None:
        return moe.shared_expert_ffn_size
    return moe.num_shared_experts * moe.expert_ffn_size(cfg.model)


def _shared_experts(cfg: Config) -> int:
    """The shared expert as a whole number of routed experts' widths (ERNIE, GLM, DeepSeek count it so)."""
    width, expert = _shared_width(cfg), cfg.moe.expert_ffn_size(cfg.model)
    if width % expert:
        raise ValueError(f"a shared expert of width {width} is not a whole number of experts of width {expert}; "
                         "use a multiple of it")
    return width // expert


# --------------------------------------------------------------------------------------- weight mapping


@dataclass(frozen=True)
class _Link:
    """One moetrain tensor and the transformers tensors it is made of, both ways: `split` gives theirs from
    ours (export), `join` ours from theirs (import)."""

    ours: str
    theirs: tuple[str, ...]
    split: Callable[[Tensor], tuple[Tensor, ...]]
    join: Callable[..., Tensor]


def _same(ours: str, theirs: str) -> _Link:
    return _Link(ours, (theirs,), lambda t: (t,), lambda t: t)


def _transposed(ours: str, theirs: str) -> _Link:
    """Stacked experts: moetrain's [E, in, out] against transformers' [E, out, in]."""
    return _Link(ours, (theirs,), lambda t: (t.transpose(1, 2),), lambda t: t.transpose(1, 2))


def _reshaped(ours: str, theirs: str, shape: tuple[int, ...]) -> _Link:
    return _Link(ours, (theirs,), lambda t: (t.reshape(shape),), lambda t: t.reshape(-1))


def _rows(ours: str, theirs: tuple[str, ...], sizes: list[int], orders: list[Tensor | None]) -> _Link:
    """A tensor whose rows are the transformers tensors stacked, each part's rows in the order `orders` gives
    transformers (None: as they are)."""
    inverses = [None if order is None else torch.argsort(order) for order in orders]

    def split(t: Tensor) -> tuple[Tensor, ...]:
        return tuple(p if o is None else p[o] for p, o in zip(t.split(sizes), orders, strict=True))

    def join(*parts: Tensor) -> Tensor:
        return torch.cat([p if o is None else p[o] for p, o in zip(parts, inverses, strict=True)])

    return _Link(ours, theirs, split, join)


def _rope_permutation(head_dim: int) -> Tensor:
    """Row order that turns moetrain's half-split RoPE pairs (i, i + d/2) into adjacent pairs (2i, 2i + 1)."""
    return torch.arange(head_dim).view(2, head_dim // 2).t().reshape(-1)


def _heads_order(num_heads: int, order: Tensor) -> Tensor:
    """`order` applied within each of `num_heads` consecutive heads."""
    return (torch.arange(num_heads).unsqueeze(1) * len(order) + order).reshape(-1)


def _mlp_links(src: str, dst: str, width: int) -> list[_Link]:
    """A SwiGLU MLP: moetrain's fused fc1 = [gate; up] against gate_proj and up_proj."""
    return [_rows(src + "fc1.weight", (dst + "gate_proj.weight", dst + "up_proj.weight"), [width, width], [None, None]),
            _same(src + "fc2.weight", dst + "down_proj.weight")]


def _latent_links(cfg: Config, src: str, attn: str, interleaved: bool) -> list[_Link]:
    """MLA's projections against DeepSeek's (q_a/q_b or q_proj, kv_a_proj_with_mqa, kv_b_proj), the rotary rows
    of each query head and of the shared key reordered when transformers holds them interleaved."""
    model = cfg.model
    nope, rotary, latent = model.qk_head_dim, model.qk_pos_emb_head_dim, model.kv_lora_rank
    turn = _rope_permutation(rotary) if interleaved else torch.arange(rotary)
    query_order = _heads_order(model.num_attention_heads, torch.cat([torch.arange(nope), nope + turn]))
    query = (_rows(src + "q_up.weight", (attn + "q_b_proj.weight",), [len(query_order)], [query_order]) if
             model.q_lora_rank else _rows(src + "q_proj.weight", (attn + "q_proj.weight",), [len(query_order)],
                                          [query_order]))
    links = [query, _rows(src + "kv_down.weight", (attn + "kv_a_proj_with_mqa.weight",), [latent + rotary],
                          [torch.cat([torch.arange(latent), latent + turn])]),
             _same(src + "kv_norm.weight", attn + "kv_a_layernorm.weight"),
             _same(src + "kv_up.weight", attn + "kv_b_proj.weight"), _same(src + "proj.weight", attn + "o_proj.weight")]
    if model.q_lora_rank:
        links += [_same(src + "q_down.weight", attn + "q_a_proj.weight"),
                  _same(src + "q_norm.weight", attn + "q_a_layernorm.weight")]
    return links


def _links(cfg: Config, target: _Target, interleaved: bool | None = None) -> list[_Link]:
    """Every moetrain tensor of cfg's model and its transformers counterparts in `target`'s layout (`interleaved`:
    whether its RoPE turns adjacent pairs; None: the class's own default)."""
    model, moe = cfg.model, cfg.moe
    interleaved = target.interleaved_rope if interleaved is None else interleaved
    heads, kv_heads, head_dim = model.num_attention_heads, model.kv_heads(), model.head_dim()
    order = _rope_permutation(head_dim) if interleaved else None
    q_order, k_order = ((_heads_order(heads, order), _heads_order(kv_heads, order)) if order is not None
                        else (None, None))
    sizes = [heads * head_dim, kv_heads * head_dim, kv_heads * head_dim]
    links = [_same("tok_emb.weight", "model.embed_tokens.weight"), _same("norm.weight", "model.norm.weight")]
    if not model.tie_embeddings:
        links.append(_same("lm_head.weight", "lm_head.weight"))
    for i, experts in enumerate(cfg.experts_per_layer()):
        src, dst = f"blocks.{i}.", f"model.layers.{i}."
        attn = dst + "self_attn."
        if model.multi_latent_attention:
            links += _latent_links(cfg, src + "attn.", attn, interleaved)
        else:
            links += [_rows(src + "attn.qkv.weight", tuple(attn + f"{name}_proj.weight" for name in "qkv"), sizes,
                            [q_order, k_order, None]), _same(src + "attn.proj.weight", attn + "o_proj.weight")]
        links += [_same(src + "norm1.weight", dst + "input_layernorm.weight"),
                  _same(src + "norm2.weight", dst + "post_attention_layernorm.weight")]
        if model.add_qkv_bias:
            links.append(_rows(src + "attn.qkv.bias", tuple(attn + f"{name}_proj.bias" for name in "qkv"), sizes,
                               [None, None, None]))
        if model.qk_norm:
            links += [_same(src + "attn.q_norm.weight", attn + "q_norm.weight"),
                      _same(src + "attn.k_norm.weight", attn + "k_norm.weight")]
        if not experts:
            links += _mlp_links(src + "ffn.", dst + "mlp.", model.ffn_size())
            continue
        links += [_same(src + "ffn.router.wg.weight", dst + "mlp.gate.weight"),
                  _transposed(src + "ffn.experts.w1", dst + "mlp.experts.gate_up_proj"),
                  _transposed(src + "ffn.experts.w2", dst + "mlp.experts.down_proj")]
        if moe.expert_bias:
            bias_name = "moe_statics.e_score_correction_bias" if target is ERNIE else "e_score_correction_bias"
            links.append(_reshaped(src + "ffn.router.expert_bias", dst + "mlp.gate." + bias_name,
                                   (1, experts) if target is ERNIE else (experts,)))
        shared = _shared_width(cfg)
        if moe.shared_expert_gate:  # Qwen2-MoE's, behind its sigmoid gate
            links += _mlp_links(src + "ffn.shared_experts.", dst + "mlp.shared_expert.", shared)
            links.append(_same(src + "ffn.shared_expert_gate.weight", dst + "mlp.shared_expert_gate.weight"))
        elif shared:  # ERNIE's, GLM's and DeepSeek's, ungated
            links += _mlp_links(src + "ffn.shared_experts.", dst + "mlp.shared_experts.", shared)
    return links


def _to_hf_state(cfg: Config, state: dict[str, Tensor], target: _Target) -> dict[str, Tensor]:
    """moetrain state dict -> the transformers model's in-memory state dict; what the class holds and moetrain's
    model does not (a zero selection bias, Qwen2-MoE's empty shared expert) is filled in; the rows padding the
    vocabulary (--make-vocab-size-divisible-by) are not exported."""
    vocab = cfg.model.vocab_size
    state = {name: t[:vocab] if name in ("tok_emb.weight", "lm_head.weight") else t for name, t in state.items()}
    out = {name: part for link in _links(cfg, target)
           for name, part in zip(link.theirs, link.split(state[link.ours]), strict=True)}
    if cfg.model.tie_embeddings:
        out["lm_head.weight"] = state["tok_emb.weight"]
    hidden = cfg.model.hidden_size
    for i, experts in enumerate(cfg.experts_per_layer()):
        dst = f"model.layers.{i}.mlp."
        if experts and not cfg.moe.expert_bias and target is ERNIE:
            out[dst + "gate.moe_statics.e_score_correction_bias"] = torch.zeros(1, experts)
        if experts and not cfg.moe.expert_bias and target in _SIGMOID_BIASED:
            out[dst + "gate.e_score_correction_bias"] = torch.zeros(experts)
        if experts and target is QWEN2_MOE and not cfg.moe.shared_expert_gate:  # zero width: adds exactly 0
            out |= _empty_mlp(dst + "shared_expert.", hidden)
            out[dst + "shared_expert_gate.weight"] = torch.zeros(1, hidden)
        if experts and target in _FIRST_DENSE and not _shared_width(cfg):
            out |= _empty_mlp(dst + "shared_experts.", hidden)
    return out


def _empty_mlp(prefix: str, hidden: int) -> dict[str, Tensor]:
    """A zero-width MLP, which adds exactly 0: the shared expert of a class that always has one."""
    return {prefix + "gate_proj.weight": torch.zeros(0, hidden), prefix + "up_proj.weight": torch.zeros(0, hidden),
            prefix + "down_proj.weight": torch.zeros(hidden, 0)}


def _from_hf_state(cfg: Config, state: dict[str, Tensor], target: _Target, interleaved: bool) -> dict[str, Tensor]:
    """The transformers model's in-memory state dict -> moetrain state dict."""
    return {link.ours: link.join(*(state[name] for name in link.theirs)).contiguous()
            for link in _links(cfg, target, interleaved)} | (
        {"lm_head.weight": state["model.embed_tokens.weight"]} if cfg.model.tie_embeddings else {})


def _selection_bias(hf_config: Any, state: dict[str, Tensor], target: _Target) -> bool:
    """Whether the model's selection bias is in use: not all zero (an all-zero bias changes nothing)."""
    if target not in (ERNIE, *_SIGMOID_BIASED):
        return False
    return any(bool(tensor.any()) for name, tensor in state.items() if name.endswith("e_score_correction_bias"))


# ------------------------------------------------------------------------------------------------ export


def export_hf(load_dir: str, out_dir: str, *, dropless: bool = False) -> str:
    """Write the checkpoint in `load_dir` as a transformers model directory; return the class name."""
    transformers = _transformers()
    if os.path.isdir(out_dir) and os.listdir(out_dir):
        raise ValueError(f"--out {out_dir} is not empty; export into a new or empty directory")
    model, tokenizer, cfg = load_model(load_dir)
    if dropless:
        cfg.moe.drop_tokens = cfg.moe.top2_2nd_expert_sampling = False
    target = hf_target(cfg)
    hf_config = _hf_config(cfg, target, tokenizer.eos_id)
    with torch.device("meta"), _quiet_empty_shared_expert():
        hf_model = transformers.AutoModelForCausalLM.from_config(hf_config)
    hf_model.load_state_dict(_to_hf_state(cfg, model.state_dict(), target), strict=True, assign=True)
    if cfg.model.tie_embeddings:
        hf_model.tie_weights()
    hf_model.save_pretrained(out_dir)
    backend = _tokenizers_backend(tokenizer)
    eos = backend.id_to_token(tokenizer.eos_id)
    transformers.PreTrainedTokenizerFast(tokenizer_object=backend, eos_token=eos, bos_token=eos,
                                         model_max_length=cfg.model.seq_length).save_pretrained(out_dir)
    return target.architecture


@contextlib.contextmanager
def _quiet_empty_shared_expert():
    """Building Qwen2-MoE's zero-width shared expert makes torch warn that initialising it is a no-op."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Initializing zero-element tensors")
        yield


@contextlib.contextmanager
def _pickles_trusted(transformers: Any, trusted: bool):
    """A trusted import unpickles pytorch_model.bin in full. transformers 5 drops from_pretrained's
    weights_only on its way to torch.load (its load_state_dict is called with the default, True), so the
    trusted choice is handed to that function itself for the duration of the load."""
    if not trusted:
        yield
        return
    utils = transformers.modeling_utils
    original = utils.load_state_dict
    utils.load_state_dict = functools.partial(original, weights_only=False)
    try:
        yield
    finally:
        utils.load_state_dict = original


def _tokenizers_backend(tokenizer: Tokenizer) -> Any:
    import tokenizers

    return tokenizers.Tokenizer.from_str(tokenizer.to_json())


# ------------------------------------------------------------------------------------------------ import


def _check_importable(hf_config: Any, target: _Target, where: str) -> None:
    """Refuse what moetrain cannot compute exactly, naming the config field."""
    def refuse(what: str) -> None:
        raise ValueError(f"{where}: {what}, which moetrain cannot represent; this model cannot be imported")

    if hf_config.hidden_act != "silu":
        refuse(f"hidden_act {hf_config.hidden_act!r} (moetrain's SwiGLU uses silu)")
    head_dim = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // hf_config.num_attention_heads
    if head_dim * hf_config.num_attention_heads != hf_config.hidden_size and not (target.head_dim or target.latent):
        refuse(f"head_dim {head_dim} x {hf_config.num_attention_heads} heads != hidden_size {hf_config.hidden_size}")
    rope = getattr(hf_config, "rope_parameters", None) or {}
    if rope.get("rope_type", "default") not in ("default", "yarn", "llama3"):
        refuse(f"rope_parameters.rope_type {rope['rope_type']!r} (moetrain scales RoPE by yarn or llama3)")
    if rope.get("rope_type") == "yarn" and (rope.get("truncate") is False or rope.get("attention_factor")):
        refuse("rope_parameters.truncate = false or attention_factor (moetrain's yarn truncates the ramp bounds "
               "and derives the attention factor)")
    if _rotary_fraction(hf_config) != 1.0 and not target.partial_rotary:
        refuse(f"partial_rotary_factor {_rotary_fraction(hf_config)}")
    biases = ("mlp_bias", "use_bias") + (() if target.qkv_bias else ("qkv_bias", "attention_bias"))
    for flag in biases:
        if getattr(hf_config, flag, False):
            refuse(f"{flag} = true (moetrain's llama style has no biases there)")
    if getattr(hf_config, "clip_qkv", None) is not None:
        refuse(f"clip_qkv {hf_config.clip_qkv}")
    if target is DEEPSEEK_V2 and hf_config.topk_method not in ("greedy", "group_limited_greedy"):
        refuse(f"topk_method {hf_config.topk_method!r} (moetrain routes greedy or group_limited_greedy)")
    k = getattr(hf_config, "num_experts_per_tok", 0) or 0
    renormalised = _renormalised(hf_config, target)
    pre_softmax = target in _SOFTMAX_TOPK and not renormalised and k > 1  # --moe-router-pre-softmax
    if renormalised is not None and bool(renormalised) != (k > 1) and not pre_softmax:
        refuse(f"top-{k} routing {'with' if renormalised else 'without'} renormalised weights, norm_topk_prob = "
               f"{str(bool(renormalised)).lower()} (moetrain renormalises exactly when k > 1)")


_MUP = "embedding_multiplier, residual_multiplier, attention_multiplier and logits_scaling (muP scalings)"
_UNSUPPORTED = {  # MoE classes moetrain does not import: the config fields that compute something it lacks
    "gpt_oss": "sinks (learned attention sinks), biased experts and attention, sliding-window layer_types and "
               "swiglu_limit (a clamped SwiGLU)",
    "granitemoe": _MUP, "granitemoeshared": _MUP, "granitemoe_swa": _MUP, "granitemoehybrid": _MUP,
    "phimoe": "router_jitter_noise (SparseMixer routing) and LayerNorm with biases",
    "dbrx": "attn_config.clip_qkv and LayerNorm without bias-free RMS",
    "jetmoe": "moe_num_experts in attention (mixture-of-attention heads)",
    "llama4": "attention_chunk_size and no_rope_layers (chunked attention, layers without RoPE)",
    "deepseek_v32": "index_topk (the sparse-attention indexer)",
    "switch_transformers": "is_encoder_decoder (an encoder-decoder)",
    "nllb_moe": "is_encoder_decoder (an encoder-decoder)",
}


def _unsupported(hf_config: Any) -> str:
    """What an unsupported class computes that moetrain does not, naming the config field."""
    if hf_config.model_type in _UNSUPPORTED:
        return _UNSUPPORTED[hf_config.model_type]
    for field, what in (("layer_types", "layer_types (layers of several kinds)"), ("vision_config", "vision_config "
                        "(a multimodal model)"), ("text_config", "text_config (a multimodal model)")):
        if getattr(hf_config, field, None):
            return what
    return f"model_type {hf_config.model_type!r} (no key map to moetrain's layers)"


def _renormalised(hf_config: Any, target: _Target) -> bool | None:
    """Whether the class renormalises the top-k weights (None: it has no experts)."""
    if target in (MIXTRAL, ERNIE):
        return True
    if target is DEEPSEEK_V2:  # whatever its config says
        return False
    return getattr(hf_config, "norm_topk_prob", None)


def _interleaved(hf_config: Any, target: _Target) -> bool:
    """Whether the model's RoPE turns adjacent pairs of dimensions (DeepSeek-V3: its rope_interleave)."""
    return bool(getattr(hf_config, "rope_interleave", target.interleaved_rope))


def _rotary_fraction(hf_config: Any) -> float:
    rope = getattr(hf_config, "rope_parameters", None) or {}
    return float(rope.get("partial_rotary_factor", getattr(hf_config, "partial_rotary_factor", 1.0)))


def _moetrain_config(hf_config: Any, target: _Target) -> Config:
    cfg = Config()
    model, moe = cfg.model, cfg.moe
    model.style = "llama"
    model.num_layers, model.hidden_size = hf_config.num_hidden_layers, hf_config.hidden_size
    heads = hf_config.num_attention_heads
    model.num_attention_heads, model.vocab_size = heads, hf_config.vocab_size
    if target.latent:
        model.multi_latent_attention, model.q_lora_rank = True, hf_config.q_lora_rank
        model.kv_lora_rank, model.qk_head_dim = hf_config.kv_lora_rank, hf_config.qk_nope_head_dim
        model.qk_pos_emb_head_dim, model.v_head_dim = hf_config.qk_rope_head_dim, hf_config.v_head_dim
    else:
        kv_heads = getattr(hf_config, "num_key_value_heads", None) or heads
        model.num_query_groups = kv_heads if kv_heads != heads else None
        head_dim = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // heads
        model.kv_channels = head_dim if head_dim * heads != hf_config.hidden_size else None
    model.qk_norm = "head" if target is GLM4_MOE and hf_config.use_qk_norm else target.qk_norm[0]
    model.rotary_percent = _rotary_fraction(hf_config)
    model.add_qkv_bias = bool(getattr(hf_config, "qkv_bias", False) or getattr(hf_config, "attention_bias", False))
    model.ffn_hidden_size = hf_config.intermediate_size
    model.seq_length = hf_config.max_position_embeddings
    window = getattr(hf_config, "sliding_window", None)
    if window and window < model.seq_length:
        warnings.warn(f"the model attends within a sliding window of {window} tokens; moetrain has no sliding "
                      f"window, so the import uses --seq-length {window}, where both compute the same")
        model.seq_length = window
    model.norm_eps, model.rope_theta = hf_config.rms_norm_eps, float(hf_config.rope_parameters["rope_theta"])
    _read_rope_scaling(hf_config.rope_parameters, cfg)
    model.tie_embeddings = bool(hf_config.tie_word_embeddings)
    model.init_method_std = hf_config.initializer_range
    model.attention_dropout = float(getattr(hf_config, "attention_dropout", 0.0))
    moe_layers = _moe_layers(target, hf_config)
    if not any(moe_layers):
        moe.num_experts = [1]
        return cfg
    num_experts = _num_experts(hf_config)
    if target in (QWEN2_MOE, ERNIE):  # Megatron-DeepSpeed's interval, dense slots as zero counts
        interval = hf_config.decoder_sparse_step if target is QWEN2_MOE else hf_config.moe_layer_interval
        counts = [num_experts if moe_layers[i] else 0 for i in range(interval - 1, model.num_layers, interval)]
        moe.num_experts, moe.expert_interval = [num_experts] if all(counts) else counts, interval
    else:
        moe.num_experts, moe.expert_interval = [num_experts], 1
        moe.moe_layer_freq = None if all(moe_layers) else [int(layer) for layer in moe_layers]
    moe.topk = hf_config.num_experts_per_tok
    moe.drop_tokens, moe.top2_2nd_expert_sampling = False, False
    moe.aux_loss_coeff = float(getattr(hf_config, "router_aux_loss_coef", moe.aux_loss_coeff))
    moe.expert_ffn_hidden_size = getattr(hf_config, "moe_intermediate_size", None)
    if target is ERNIE:
        moe.num_shared_experts = hf_config.moe_num_shared_experts
    if target in _SOFTMAX_TOPK:
        moe.pre_softmax = moe.topk > 1 and not _renormalised(hf_config, target)
    if target is QWEN2_MOE and hf_config.shared_expert_intermediate_size:
        moe.shared_expert_ffn_size, moe.shared_expert_gate = hf_config.shared_expert_intermediate_size, True
    if target in _FIRST_DENSE:
        moe.num_shared_experts = hf_config.n_shared_experts or 0
        grouped = target is not DEEPSEEK_V2 or hf_config.topk_method == "group_limited_greedy"
        if grouped and (hf_config.n_group or 1) > 1:
            moe.num_groups, moe.group_topk = hf_config.n_group, hf_config.topk_group
    if target in _SIGMOID_BIASED:
        moe.score_func = "sigmoid"
    if target in _FIRST_DENSE and hf_config.routed_scaling_factor != 1.0:
        moe.topk_scaling_factor = float(hf_config.routed_scaling_factor)
    return cfg


def import_hf(hf_dir: str, out_dir: str, trust_checkpoint: bool = False) -> tuple[Config, str]:
    """Convert a local transformers model directory into a moetrain checkpoint; return its config and path.
    A pickled weights file (pytorch_model.bin) is read weights_only unless `trust_checkpoint`."""
    transformers = _transformers()
    check_new_checkpoint_dir(out_dir)
    if not os.path.isfile(os.path.join(hf_dir, "config.json")):
        raise FileNotFoundError(f"{hf_dir} has no config.json; pass a local Hugging Face model directory to --from-hf")
    tokenizer_path = os.path.join(hf_dir, "tokenizer.json")
    if not os.path.isfile(tokenizer_path):
        raise FileNotFoundError(f"{hf_dir} has no tokenizer.json; save the fast tokenizer there first "
                                f"(AutoTokenizer.from_pretrained(DIR).save_pretrained(DIR))")
    hf_config = transformers.AutoConfig.from_pretrained(hf_dir, local_files_only=True)
    target = _BY_MODEL_TYPE.get(hf_config.model_type)
    if target is None:
        raise ValueError(f"{hf_dir} holds a {hf_config.model_type!r} model with {_unsupported(hf_config)}, which "
                         f"moetrain cannot represent; import reads {', '.join(IMPORTABLE)}")
    _check_importable(hf_config, target, hf_dir)
    cfg = _moetrain_config(hf_config, target)
    try:
        tokenizer = Tokenizer.load(tokenizer_path)
    except DataError as error:
        raise ValueError(f"{tokenizer_path}: {error}") from None
    eos = hf_config.eos_token_id
    if isinstance(eos, int) and eos != tokenizer.eos_id:
        warnings.warn(f"config.json names end-of-text id {eos} but moetrain ends documents with id "
                      f"{tokenizer.eos_id}; fine-tuning data will use {tokenizer.eos_id}")
    try:
        with _quiet_empty_shared_expert(), _pickles_trusted(transformers, trust_checkpoint):
            hf_model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32,
                                                                         local_files_only=True)
    except pickle.UnpicklingError:
        raise CheckpointError(f"the weights in {hf_dir} are pickled Python objects besides tensors; unpickling them "
                              "can run code stored in the file. If you trust its source, pass --trust-checkpoint "
                              "(or save the model as safetensors)") from None
    hf_state = hf_model.state_dict()
    cfg.moe.expert_bias = cfg.moe.is_moe and _selection_bias(hf_config, hf_state, target)
    state = _from_hf_state(cfg, hf_state, target, _interleaved(hf_config, target))
    return cfg, save_model_checkpoint(out_dir, cfg, state, tokenizer)
