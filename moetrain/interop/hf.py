"""Hugging Face export and import: moetrain checkpoints <-> transformers model directories.

Export writes what `transformers.AutoModelForCausalLM.from_pretrained(OUT)` loads as a native class
(config.json, safetensors in the Hub's layout, tokenizer.json + tokenizer_config.json), and refuses any
model whose outputs that class cannot reproduce. Only llama-style moetrain models (RoPE, RMSNorm, SwiGLU,
no biases) have Hugging Face counterparts; the class is chosen by the MoE layout:

- dense -> LlamaForCausalLM
- MoE in every layer, top-k >= 2, no shared experts, no expert bias -> MixtralForCausalLM
- top-1 (the expert output weighted by its gate probability, DeepSpeed's top-1), MoE every N-th layer,
  pre-softmax weights (--moe-router-pre-softmax: norm_topk_prob = false) or a sigmoid-gated shared expert
  (--moe-shared-expert-gate), without expert bias -> Qwen2MoeForCausalLM (norm_topk_prob = k > 1 unless
  pre-softmax; without a gated shared expert an empty one, since Qwen2-MoE always adds one)
- shared experts (added ungated, DeepSeek-style) or an aux-loss-free expert bias, top-k >= 2
  -> Ernie4_5_MoeForCausalLM (its e_score_correction_bias is the same selection-only bias; its
  interleaved RoPE layout is matched by permuting the query/key rows)

Refused: GPT style (learned positions, LayerNorm, GELU, biases), residual MoE (PR-MoE), pyramid expert
counts, sigmoid router scores, group-limited routing, a top-k scaling factor, Sinkhorn routing, and top-1
with shared experts or expert bias. Capacity dropping and top-2
second-expert sampling (stochastic, eval included) have no Hugging Face equivalent either; export refuses
them unless `dropless=True` (`--dropless`) asks for the model with plain dropless top-k routing, whose
outputs then differ from moetrain's wherever moetrain would drop a token or sample a second expert.
Training-only settings (noisy gating, z-loss, dropout) do not affect the exported outputs and are not
carried; router_aux_loss_coef is.

Import reads a local directory of one of these four classes (and dense Mistral) into a moetrain
checkpoint; grouped-query attention is expanded to one key/value head per query head, which computes the
same function. transformers is an optional dependency: `pip install "moetrain[hf]"`.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from moetrain.checkpoint import load_model
from moetrain.config import Config
from moetrain.data import DataError, Tokenizer
from moetrain.interop.checkpoint import check_new_checkpoint_dir, save_model_checkpoint

IMPORTABLE = ("llama", "mistral", "mixtral", "qwen2_moe", "ernie4_5_moe")


@dataclass(frozen=True)
class _Target:
    """One transformers class and where moetrain's MoE pieces live in it."""

    architecture: str
    model_type: str
    interleaved_rope: bool = False  # rotates pairs (2i, 2i + 1) instead of (i, i + head_dim / 2)


LLAMA = _Target("LlamaForCausalLM", "llama")
MISTRAL = _Target("MistralForCausalLM", "mistral")
MIXTRAL = _Target("MixtralForCausalLM", "mixtral")
QWEN2_MOE = _Target("Qwen2MoeForCausalLM", "qwen2_moe")
ERNIE = _Target("Ernie4_5_MoeForCausalLM", "ernie4_5_moe", interleaved_rope=True)
_BY_MODEL_TYPE = {t.model_type: t for t in (LLAMA, MISTRAL, MIXTRAL, QWEN2_MOE, ERNIE)}


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
    if moe.score_func != "softmax":
        raise ValueError(f"--moe-score-func {moe.score_func} has no Hugging Face counterpart among the supported "
                         "classes (Mixtral, Qwen2-MoE and ERNIE-4.5 route on softmax scores)")
    for name, value, flag in (("group-limited routing", moe.num_groups, "--moe-router-num-groups"),
                              ("a top-k scaling factor", moe.topk_scaling_factor, "--moe-router-topk-scaling-factor"),
                              ("Sinkhorn routing", "sinkhorn" in (moe.load_balancing_type or []),
                               "--moe-router-load-balancing-type sinkhorn")):
        if value:
            raise ValueError(f"{name} ({flag}) has no Hugging Face counterpart among the supported classes")
    sampled = moe.topk == 2 and moe.top2_2nd_expert_sampling and not moe.expert_bias
    if moe.drop_tokens or sampled:
        what = "capacity dropping (--disable-moe-token-dropping is off)" if moe.drop_tokens else \
            "top-2 second-expert sampling (--disable-moe-top2-2nd-expert-sampling is off)"
        raise ValueError(f"the model uses {what}, which Hugging Face MoE classes do not have; fine-tune without it, "
                         "or pass --dropless to export it with plain dropless top-k routing (its outputs then "
                         "differ from moetrain's where moetrain drops tokens or samples experts)")
    if moe.shared_expert_gate or (moe.pre_softmax and moe.topk > 1):
        if moe.expert_bias:
            raise ValueError("a gated shared expert or pre-softmax weights with an expert bias have no Hugging Face "
                             "counterpart (Qwen2-MoE has no selection bias)")
        return QWEN2_MOE
    if moe.num_shared_experts or moe.shared_expert_ffn_size or moe.expert_bias:
        if moe.topk == 1:
            raise ValueError("top-1 routing with shared experts or an expert bias has no Hugging Face counterpart "
                             "(ERNIE-4.5, which has both, renormalises the top-1 weight to 1); use --topk 2 or more")
        return ERNIE
    if moe.topk > 1 and moe.expert_interval == 1 and all(cfg.experts_per_layer()):
        return MIXTRAL
    return QWEN2_MOE


def _moe_layers(target: _Target, hf_config: Any) -> list[bool]:
    """Which layers of a transformers model of this class hold experts (the class's own rule)."""
    layers = range(hf_config.num_hidden_layers)
    if target is MIXTRAL:
        return [True for _ in layers]
    if target is QWEN2_MOE:
        return [i not in hf_config.mlp_only_layers and (i + 1) % hf_config.decoder_sparse_step == 0
                and hf_config.num_experts > 0 for i in layers]
    if target is ERNIE:
        return [(i + 1) % hf_config.moe_layer_interval == 0
                and hf_config.moe_layer_start_index <= i <= hf_config.moe_layer_end_index for i in layers]
    return [False for _ in layers]


def _hf_config(cfg: Config, target: _Target, eos_id: int) -> Any:
    model, moe = cfg.model, cfg.moe
    experts_per_layer = cfg.experts_per_layer()
    moe_layers = [i for i, count in enumerate(experts_per_layer) if count]
    common = dict(
        vocab_size=model.vocab_size, hidden_size=model.hidden_size, num_hidden_layers=model.num_layers,
        num_attention_heads=model.num_attention_heads, num_key_value_heads=model.num_attention_heads,
        max_position_embeddings=model.positions(), rms_norm_eps=model.norm_eps, hidden_act="silu",
        rope_parameters={"rope_type": "default", "rope_theta": model.rope_theta},
        tie_word_embeddings=model.tie_embeddings, initializer_range=model.init_method_std,
        bos_token_id=eos_id, eos_token_id=eos_id)
    if target is LLAMA:
        specific = dict(intermediate_size=model.ffn_size(), attention_bias=False, mlp_bias=False)
    else:
        num_experts, expert_ffn = max(experts_per_layer), moe.expert_ffn_size(model)
        routing = dict(num_experts_per_tok=moe.topk, router_aux_loss_coef=moe.aux_loss_coeff)
        if target is MIXTRAL:
            specific = dict(intermediate_size=expert_ffn, num_local_experts=num_experts, sliding_window=None,
                            router_jitter_noise=0.0, **routing)
        elif target is QWEN2_MOE:
            slots = range(moe.expert_interval - 1, model.num_layers, moe.expert_interval)
            specific = dict(intermediate_size=model.ffn_size(), moe_intermediate_size=expert_ffn,
                            shared_expert_intermediate_size=_shared_width(cfg) if moe.shared_expert_gate else 0,
                            num_experts=num_experts, norm_topk_prob=moe.topk > 1 and not moe.pre_softmax,
                            decoder_sparse_step=moe.expert_interval,
                            mlp_only_layers=[i for i in slots if not experts_per_layer[i]], qkv_bias=False,
                            use_sliding_window=False, **routing)
        else:
            specific = dict(intermediate_size=model.ffn_size(), moe_intermediate_size=expert_ffn,
                            moe_num_experts=num_experts, moe_k=moe.topk,
                            moe_num_shared_experts=_shared_width(cfg) // expert_ffn,
                            moe_layer_interval=moe.expert_interval,
                            moe_layer_start_index=moe_layers[0], moe_layer_end_index=moe_layers[-1],
                            use_bias=False, router_aux_loss_coef=moe.aux_loss_coeff)
    if target is ERNIE and _shared_width(cfg) % moe.expert_ffn_size(model):
        raise ValueError(f"a shared expert of width {_shared_width(cfg)} is not a whole number of ERNIE-4.5 experts "
                         f"of width {moe.expert_ffn_size(model)}; use a multiple of it")
    config_class = getattr(_transformers(), target.architecture.replace("ForCausalLM", "Config"))
    hf_config = config_class(**common, **specific)
    if _moe_layers(target, hf_config) != [bool(count) for count in experts_per_layer]:
        raise ValueError(f"MoE layers {moe_layers} of {model.num_layers} cannot be expressed in {target.architecture}")
    return hf_config


def _shared_width(cfg: Config) -> int:
    """The shared expert's FFN width (0 without one), as MoE builds it."""
    moe = cfg.moe
    if moe.shared_expert_ffn_size is not None:
        return moe.shared_expert_ffn_size
    return moe.num_shared_experts * moe.expert_ffn_size(cfg.model)


# --------------------------------------------------------------------------------------- weight mapping


def _rope_permutation(head_dim: int) -> Tensor:
    """Row order that turns moetrain's half-split RoPE pairs (i, i + d/2) into adjacent pairs (2i, 2i + 1)."""
    return torch.arange(head_dim).view(2, head_dim // 2).t().reshape(-1)


def _permute_heads(weight: Tensor, num_heads: int, order: Tensor) -> Tensor:
    rows = weight.view(num_heads, len(order), -1)
    return rows[:, order].reshape(weight.shape)


def _to_hf_state(cfg: Config, state: dict[str, Tensor], target: _Target) -> dict[str, Tensor]:
    """moetrain state dict -> the transformers model's in-memory state dict."""
    heads, hidden = cfg.model.num_attention_heads, cfg.model.hidden_size
    order = _rope_permutation(hidden // heads)
    vocab = cfg.model.vocab_size  # the padding rows (--make-vocab-size-divisible-by) are not exported
    out = {"model.embed_tokens.weight": state["tok_emb.weight"][:vocab], "model.norm.weight": state["norm.weight"],
           "lm_head.weight": state["lm_head.weight"][:vocab]}
    for i, experts in enumerate(cfg.experts_per_layer()):
        src, dst = f"blocks.{i}.", f"model.layers.{i}."
        q, k, v = state[src + "attn.qkv.weight"].chunk(3)
        if target.interleaved_rope:
            q, k = _permute_heads(q, heads, order), _permute_heads(k, heads, order)
        out |= {dst + "self_attn.q_proj.weight": q, dst + "self_attn.k_proj.weight": k,
                dst + "self_attn.v_proj.weight": v, dst + "self_attn.o_proj.weight": state[src + "attn.proj.weight"],
                dst + "input_layernorm.weight": state[src + "norm1.weight"],
                dst + "post_attention_layernorm.weight": state[src + "norm2.weight"]}
        if not experts:
            out |= _mlp_to_hf(state, src + "ffn.", dst + "mlp.")
            continue
        out |= {dst + "mlp.gate.weight": state[src + "ffn.router.wg.weight"],
                dst + "mlp.experts.gate_up_proj": state[src + "ffn.experts.w1"].transpose(1, 2),
                dst + "mlp.experts.down_proj": state[src + "ffn.experts.w2"].transpose(1, 2)}
        if target is ERNIE:
            bias = state.get(src + "ffn.router.expert_bias", torch.zeros(experts))
            out[dst + "mlp.gate.moe_statics.e_score_correction_bias"] = bias.view(1, experts)
            if _shared_width(cfg):
                out |= _mlp_to_hf(state, src + "ffn.shared_experts.", dst + "mlp.shared_experts.")
        elif target is QWEN2_MOE and cfg.moe.shared_expert_gate:
            out |= _mlp_to_hf(state, src + "ffn.shared_experts.", dst + "mlp.shared_expert.")
            out[dst + "mlp.shared_expert_gate.weight"] = state[src + "ffn.shared_expert_gate.weight"]
        elif target is QWEN2_MOE:  # the empty shared expert: zero width, so it adds exactly 0
            out |= {dst + "mlp.shared_expert.gate_proj.weight": torch.zeros(0, hidden),
                    dst + "mlp.shared_expert.up_proj.weight": torch.zeros(0, hidden),
                    dst + "mlp.shared_expert.down_proj.weight": torch.zeros(hidden, 0),
                    dst + "mlp.shared_expert_gate.weight": torch.zeros(1, hidden)}
    return out


def _mlp_to_hf(state: dict[str, Tensor], src: str, dst: str) -> dict[str, Tensor]:
    gate, up = state[src + "fc1.weight"].chunk(2)  # SwiGLU: act(gate) * up
    return {dst + "gate_proj.weight": gate, dst + "up_proj.weight": up,
            dst + "down_proj.weight": state[src + "fc2.weight"]}


def _mlp_from_hf(state: dict[str, Tensor], src: str, dst: str) -> dict[str, Tensor]:
    fc1 = torch.cat([state[src + "gate_proj.weight"], state[src + "up_proj.weight"]])
    return {dst + "fc1.weight": fc1, dst + "fc2.weight": state[src + "down_proj.weight"]}


def _from_hf_state(cfg: Config, hf_config: Any, state: dict[str, Tensor], target: _Target) -> dict[str, Tensor]:
    """The transformers model's in-memory state dict -> moetrain state dict (key/value heads expanded)."""
    heads, hidden = cfg.model.num_attention_heads, cfg.model.hidden_size
    head_dim = hidden // heads
    groups = heads // (hf_config.num_key_value_heads or heads)
    inverse = torch.argsort(_rope_permutation(head_dim))
    out = {"tok_emb.weight": state["model.embed_tokens.weight"], "norm.weight": state["model.norm.weight"],
           "lm_head.weight": state["model.embed_tokens.weight" if cfg.model.tie_embeddings else "lm_head.weight"]}
    for i, experts in enumerate(cfg.experts_per_layer()):
        src, dst = f"model.layers.{i}.", f"blocks.{i}."
        q = state[src + "self_attn.q_proj.weight"]
        k, v = (state[src + f"self_attn.{name}_proj.weight"].view(-1, head_dim, hidden)
                .repeat_interleave(groups, dim=0).reshape(hidden, hidden) for name in "kv")
        if target.interleaved_rope:
            q, k = _permute_heads(q, heads, inverse), _permute_heads(k, heads, inverse)
        out |= {dst + "attn.qkv.weight": torch.cat([q, k, v]),
                dst + "attn.proj.weight": state[src + "self_attn.o_proj.weight"],
                dst + "norm1.weight": state[src + "input_layernorm.weight"],
                dst + "norm2.weight": state[src + "post_attention_layernorm.weight"]}
        if not experts:
            out |= _mlp_from_hf(state, src + "mlp.", dst + "ffn.")
            continue
        out |= {dst + "ffn.router.wg.weight": state[src + "mlp.gate.weight"],
                dst + "ffn.experts.w1": state[src + "mlp.experts.gate_up_proj"].transpose(1, 2),
                dst + "ffn.experts.w2": state[src + "mlp.experts.down_proj"].transpose(1, 2)}
        if target is ERNIE:  # import_hf keeps it only where it is not all zero
            out[dst + "ffn.router.expert_bias"] = state[src + "mlp.gate.moe_statics.e_score_correction_bias"].view(-1)
        if target is QWEN2_MOE and cfg.moe.shared_expert_gate:  # Qwen2-MoE's, behind its sigmoid gate
            out |= _mlp_from_hf(state, src + "mlp.shared_expert.", dst + "ffn.shared_experts.")
            out[dst + "ffn.shared_expert_gate.weight"] = state[src + "mlp.shared_expert_gate.weight"]
        elif cfg.moe.num_shared_experts:  # ERNIE's, ungated
            out |= _mlp_from_hf(state, src + "mlp.shared_experts.", dst + "ffn.shared_experts.")
    return {name: tensor.contiguous() for name, tensor in out.items()}


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


def _tokenizers_backend(tokenizer: Tokenizer) -> Any:
    import tokenizers

    return tokenizers.Tokenizer.from_str(tokenizer.to_json())


# ------------------------------------------------------------------------------------------------ import


def _check_importable(hf_config: Any, target: _Target, where: str) -> None:
    """Refuse what moetrain's llama style cannot compute exactly."""
    def refuse(what: str) -> None:
        raise ValueError(f"{where}: {what}, which moetrain cannot represent; this model cannot be imported")

    hidden, heads = hf_config.hidden_size, hf_config.num_attention_heads
    if hf_config.hidden_act != "silu":
        refuse(f"hidden_act {hf_config.hidden_act!r} (moetrain's SwiGLU uses silu)")
    if (getattr(hf_config, "head_dim", None) or hidden // heads) * heads != hidden:
        refuse(f"head_dim {hf_config.head_dim} x {heads} heads != hidden_size {hidden}")
    rope = getattr(hf_config, "rope_parameters", None) or {}
    if rope.get("rope_type", "default") != "default" or getattr(hf_config, "partial_rotary_factor", 1.0) != 1.0:
        refuse(f"RoPE scaling {rope}")
    for flag in ("attention_bias", "mlp_bias", "qkv_bias", "use_bias"):
        if getattr(hf_config, flag, False):
            refuse(f"{flag} = true (moetrain's llama style has no biases)")
    k = getattr(hf_config, "num_experts_per_tok", 0)
    renormalised = {MIXTRAL: True, ERNIE: True, QWEN2_MOE: getattr(hf_config, "norm_topk_prob", False)}.get(target)
    pre_softmax = target is QWEN2_MOE and not renormalised and k > 1  # --moe-router-pre-softmax
    if renormalised is not None and renormalised != (k > 1) and not pre_softmax:
        refuse(f"top-{k} routing {'with' if renormalised else 'without'} renormalised weights (moetrain renormalises "
               "exactly when k > 1)")


def _moetrain_config(hf_config: Any, target: _Target) -> Config:
    cfg = Config()
    model, moe = cfg.model, cfg.moe
    model.style = "llama"
    model.num_layers, model.hidden_size = hf_config.num_hidden_layers, hf_config.hidden_size
    model.num_attention_heads, model.vocab_size = hf_config.num_attention_heads, hf_config.vocab_size
    model.ffn_hidden_size = hf_config.intermediate_size
    model.seq_length = hf_config.max_position_embeddings
    window = getattr(hf_config, "sliding_window", None)
    if window and window < model.seq_length:
        warnings.warn(f"the model attends within a sliding window of {window} tokens; moetrain has no sliding "
                      f"window, so the import uses --seq-length {window}, where both compute the same")
        model.seq_length = window
    model.norm_eps, model.rope_theta = hf_config.rms_norm_eps, float(hf_config.rope_parameters["rope_theta"])
    model.tie_embeddings = bool(hf_config.tie_word_embeddings)
    model.init_method_std = hf_config.initializer_range
    model.attention_dropout = float(getattr(hf_config, "attention_dropout", 0.0))
    moe_layers = _moe_layers(target, hf_config)
    if not any(moe_layers):
        moe.num_experts = [1]
        return cfg
    interval = {MIXTRAL: 1, QWEN2_MOE: getattr(hf_config, "decoder_sparse_step", 1),
                ERNIE: getattr(hf_config, "moe_layer_interval", 1)}[target]
    num_experts = hf_config.num_experts if target is not MIXTRAL else hf_config.num_local_experts
    counts = [num_experts if moe_layers[i] else 0 for i in range(interval - 1, model.num_layers, interval)]
    moe.num_experts = [num_experts] if all(counts) else counts
    moe.expert_interval, moe.topk = interval, hf_config.num_experts_per_tok
    moe.drop_tokens, moe.top2_2nd_expert_sampling = False, False
    moe.aux_loss_coeff = float(getattr(hf_config, "router_aux_loss_coef", moe.aux_loss_coeff))
    if target is not MIXTRAL:
        moe.expert_ffn_hidden_size = hf_config.moe_intermediate_size
    if target is ERNIE:
        moe.num_shared_experts = hf_config.moe_num_shared_experts
    if target is QWEN2_MOE:
        moe.pre_softmax = moe.topk > 1 and not hf_config.norm_topk_prob
        if hf_config.shared_expert_intermediate_size:
            moe.shared_expert_ffn_size, moe.shared_expert_gate = hf_config.shared_expert_intermediate_size, True
    return cfg


def import_hf(hf_dir: str, out_dir: str) -> tuple[Config, str]:
    """Convert a local transformers model directory into a moetrain checkpoint; return its config and path."""
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
        raise ValueError(f"{hf_dir} holds a {hf_config.model_type!r} model; import reads {', '.join(IMPORTABLE)}")
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
    with _quiet_empty_shared_expert():
        hf_model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32, local_files_only=True)
    state = _from_hf_state(cfg, hf_config, hf_model.state_dict(), target)
    if target is ERNIE and cfg.moe.is_moe:
        cfg.moe.expert_bias = any(bool(state[f"blocks.{i}.ffn.router.expert_bias"].any())
                                  for i, count in enumerate(cfg.experts_per_layer()) if count)
        if not cfg.moe.expert_bias:  # all zero: the bias changes nothing, leave it out
            state = {name: t for name, t in state.items() if not name.endswith("router.expert_bias")}
    return cfg, save_model_checkpoint(out_dir, cfg, state, tokenizer)
