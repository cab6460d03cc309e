"""Megatron-DeepSpeed MoE checkpoints -> moetrain checkpoints.

A DeepSpeed MoE checkpoint directory (`SAVE/global_stepN/`, or `SAVE` with its `latest` file) holds
`mp_rank_00_model_states.pt`, whose "module" is the model's state dict without the experts (gates and
dense weights stay), and one `layer_{L}_expert_{E}_mp_rank_00_model_states.pt` per MoE layer L (counted
in model order) and global expert E (`expert_{E}_mp_rank_00_...` in DeepSpeed before 0.6, one file for
all layers). Keys follow Megatron-DeepSpeed's GPT model:

    language_model.embedding.word_embeddings.weight / .position_embeddings.weight (GPT style)
    language_model.encoder.layers.{i}.input_layernorm / self_attention.query_key_value / self_attention.dense /
        post_attention_layernorm / mlp.dense_h_to_4h / mlp.dense_4h_to_h   (older: transformer., attention.)
    ... .mlp.deepspeed_moe.gate.wg.weight, .mlp.deepspeed_moe.experts.deepspeed_experts.{E}.dense_h_to_4h ...,
        .mlp.mlp.* and .mlp.coefficient.* (residual MoE)
    language_model.encoder.final_layernorm, language_model.output_layer.weight (untied output)

query_key_value is laid out per key/value head as [q heads of the group, k, v] (Megatron's layout;
with one query per group that is [q, k, v] per head); moetrain stores [all q; all k; all v], and grouped
keys/values are expanded to one per query head. The expert layers and the residual MLP of DeepSpeed MoE
drop their output bias (DeepSpeed's Experts keep only the first element of the expert's (output, bias)
result), so moetrain's are set to zero: the imported model computes what DeepSpeed computed.

The layer layout (GPT or llama style, MoE every `expert_interval` layers, pyramid expert counts, residual
MoE, tied or untied output) is read from the weights; what weights cannot tell (attention heads, top-k,
capacity factors, token dropping, ...) comes from the Megatron `args` stored in the checkpoint, and
model/MoE flags override both.

The main file is a pickle: Megatron stores its `args` Namespace and RNG states (numpy arrays) in it.
It is loaded with torch.load(weights_only=True), with argparse.Namespace allowed; anything beyond that
needs a full unpickle, which can run code from the file, so it happens only with `trust_checkpoint=True`
(`--trust-checkpoint`).
"""

from __future__ import annotations

import argparse
import glob
import os
import pickle
import re
import warnings
from typing import Any

import torch
from torch import Tensor

from moetrain.checkpoint.storage import CheckpointError, pickled_global
from moetrain.config import Config, field_flags
from moetrain.config.parser import FieldFlags
from moetrain.data import Tokenizer
from moetrain.interop.checkpoint import check_new_checkpoint_dir, save_model_checkpoint, vocab_padding
from moetrain.moe import from_deepspeed_state_dict

MAIN_FILE = "mp_rank_00_model_states.pt"
EXPERT_FILE_RE = re.compile(r"^(layer_(\d+)_)?expert_(\d+)_mp_rank_00_model_states\.pt$")
_EMBEDDING = "language_model.embedding."
_OUTPUT = "language_model.output_layer.weight"
_EXPERTS = "deepspeed_moe.experts.deepspeed_experts."

# The fields read from the args Megatron stores, for what the weights do not show; under the names its
# argparse gave them, which are our flags' (`_megatron_arg_names`).
_FROM_MEGATRON_ARGS = (
    "model.num_attention_heads", "model.seq_length", "model.max_position_embeddings", "model.norm_eps",
    "model.rope_theta", "model.init_method_std", "model.hidden_dropout", "model.attention_dropout", "moe.topk",
    "moe.expert_interval", "moe.train_capacity_factor", "moe.eval_capacity_factor", "moe.min_capacity",
    "moe.drop_tokens", "moe.aux_loss_coeff", "moe.top2_2nd_expert_sampling",
)


def _megatron_arg_names(flags: FieldFlags) -> list[str]:
    """The names Megatron's args may hold a field under, from its flags: --layernorm-epsilon is
    layernorm_epsilon; a switch that turns the field off, --disable-moe-token-dropping, stores its sense as
    moe_token_dropping."""
    names = list(flags.option.names)
    names += [switch.name.replace("--disable-", "--", 1) for switch in flags.option.switches if switch.value is False]
    return [name.removeprefix("--").replace("-", "_") for name in names]


def _megatron_settings(args: dict[str, Any]) -> dict[str, Any]:
    """"section.field" -> value for each of _FROM_MEGATRON_ARGS that Megatron's `args` hold (under the first of
    the field's names they have)."""
    settings = {}
    for flags in field_flags(("model", "moe")):
        if flags.dest in _FROM_MEGATRON_ARGS:
            values = [args[name] for name in _megatron_arg_names(flags) if args.get(name) is not None]
            if values:
                settings[flags.dest] = values[0]
    return settings


def _resolve_dir(ds_dir: str) -> str:
    """The directory holding mp_rank_00_model_states.pt: ds_dir itself, or the tag its `latest` names."""
    if not os.path.isdir(ds_dir):
        raise FileNotFoundError(f"DeepSpeed checkpoint directory {ds_dir!r} does not exist; check --from-deepspeed")
    if os.path.isfile(os.path.join(ds_dir, MAIN_FILE)):
        return ds_dir
    latest = os.path.join(ds_dir, "latest")
    if os.path.isfile(latest):
        with open(latest) as f:
            tag_dir = os.path.join(ds_dir, f.read().strip())
        if os.path.isfile(os.path.join(tag_dir, MAIN_FILE)):
            return tag_dir
        raise FileNotFoundError(f"{latest} names {tag_dir}, which has no {MAIN_FILE}")
    if glob.glob(os.path.join(ds_dir, "*model_states.pt")) or glob.glob(os.path.join(ds_dir, "layer_*-model_*")):
        raise ValueError(f"{ds_dir} has DeepSpeed files but no {MAIN_FILE}: pipeline-parallel or ZeRO-3 layouts are "
                         "not supported; save with pipeline parallelism 1 and ZeRO stage < 3")
    raise FileNotFoundError(f"{ds_dir} has no {MAIN_FILE} and no 'latest' file; pass a DeepSpeed checkpoint "
                            "directory (the --save directory or its global_stepN)")


def _load(path: str, trust_checkpoint: bool) -> Any:
    """torch.load with weights_only (plus argparse.Namespace); a full unpickle only when trusted."""
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        refused = pickled_global(error)
        if refused is None:
            raise CheckpointError(f"{path} is corrupt (not a valid pickle)") from None
        if not trust_checkpoint:
            raise CheckpointError(
                f"{path} holds pickled Python objects besides tensors and plain data ({refused}), e.g. Megatron's RNG "
                "states; unpickling them can run code stored in the file. If you trust its source, pass "
                "--trust-checkpoint") from None
    except (RuntimeError, EOFError, OSError) as error:
        raise CheckpointError(f"{path} is corrupt or truncated ({error})") from None
    return torch.load(path, map_location="cpu", weights_only=False)


def _read_state(ckpt_dir: str, trust_checkpoint: bool) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Dense weights, gates and every expert file merged into one state dict, plus the Megatron args."""
    if glob.glob(os.path.join(ckpt_dir, "mp_rank_0[1-9]_model_states.pt")):
        raise ValueError(f"{ckpt_dir} is split over several tensor-parallel ranks (mp_rank_01, ...); merge them "
                         "to one rank (tensor parallelism 1) before importing")
    main = _load(os.path.join(ckpt_dir, MAIN_FILE), trust_checkpoint)
    if not isinstance(main, dict) or not isinstance(main.get("module"), dict):
        raise ValueError(f"{os.path.join(ckpt_dir, MAIN_FILE)} has no 'module' state dict; it is not a DeepSpeed "
                         "engine checkpoint (pipeline-parallel checkpoints keep their layers elsewhere)")
    state = {_canonical(name): tensor for name, tensor in main["module"].items()}
    for name in sorted(os.listdir(ckpt_dir)):
        if EXPERT_FILE_RE.match(name):
            expert_state = _load(os.path.join(ckpt_dir, name), trust_checkpoint)
            state.update({_canonical(key): tensor for key, tensor in expert_state.items()})
    args = main.get("args")
    return state, vars(args) if isinstance(args, argparse.Namespace) else {}


def _canonical(name: str) -> str:
    """Older Megatron-DeepSpeed names (transformer., attention.) -> current ones (encoder., self_attention.)."""
    name = name.removeprefix("module.")
    name = name.replace("language_model.transformer.", "language_model.encoder.")
    return re.sub(r"(layers\.\d+\.)attention\.", r"\1self_attention.", name)


def _layer_prefix(i: int) -> str:
    return f"language_model.encoder.layers.{i}."


# ---------------------------------------------------------------------------------------- the layout


def _infer_config(state: dict[str, Tensor], args: dict[str, Any], overrides: dict[str, Any], ckpt_dir: str) -> Config:
    """Layer layout from the weights, the rest from Megatron's args, flags over both."""
    cfg = Config()
    settings = _megatron_settings(args) | overrides
    for dest, value in settings.items():
        section, field = dest.split(".")
        setattr(getattr(cfg, section), field, value)
    if args.get("apply_residual_connection_post_layernorm"):
        raise ValueError("the model was trained with --apply-residual-connection-post-layernorm, which moetrain's "
                         "pre-norm blocks do not compute")
    if args.get("rotary_percent", 1.0) != 1.0:
        raise ValueError(f"partial rotary embeddings (--rotary-percent {args['rotary_percent']}) have no moetrain "
                         "counterpart")

    layers = sorted({int(found.group(1)) for key in state
                     if (found := re.match(r"language_model\.encoder\.layers\.(\d+)\.", key))})
    if not layers or layers != list(range(len(layers))):
        raise ValueError(f"{ckpt_dir}: no Megatron transformer layers (language_model.encoder.layers.N.*) in the "
                         "checkpoint; is it a Megatron-DeepSpeed GPT checkpoint?")
    embedding = _Weights(state, False, ckpt_dir).get(_EMBEDDING + "word_embeddings.weight")
    hidden = embedding.shape[1]
    gpt_style = _EMBEDDING + "position_embeddings.weight" in state
    layer_norm = _layer_prefix(0) + "input_layernorm.bias" in state
    dense_layer = next((i for i in layers if _layer_prefix(i) + "mlp.dense_4h_to_h.weight" in state), None)
    mlp_outputs = [key for key in state if key.endswith("dense_4h_to_h.weight")]
    if not mlp_outputs:
        raise FileNotFoundError(f"{ckpt_dir}: no MLP weights (dense_4h_to_h); are the expert files missing?")
    expert_output = next((key for key in mlp_outputs if _EXPERTS in key), None)
    sample = expert_output or mlp_outputs[0]
    swiglu = state[sample.replace("dense_4h_to_h", "dense_h_to_4h")].shape[0] == 2 * state[sample].shape[1]
    found = f"position embeddings {'yes' if gpt_style else 'no'}, {'LayerNorm' if layer_norm else 'RMSNorm'}, " \
            f"{'SwiGLU' if swiglu else 'GELU'}"
    if (gpt_style, layer_norm, swiglu) not in ((True, True, False), (False, False, True)):
        raise ValueError(f"{ckpt_dir}: the model has {found}; moetrain has GPT style (learned positions, LayerNorm, "
                         "GELU) or llama style (RoPE, RMSNorm, SwiGLU), not this mix")
    if gpt_style and (args.get("bias_gelu_fusion", True) or args.get("openai_gelu")):
        warnings.warn("Megatron's fused bias-GeLU (its default) and --openai-gelu compute the tanh approximation of "
                      "GELU; moetrain's GELU is exact (erf), so outputs differ slightly (~1e-3 per activation)")

    model = cfg.model
    model.style = "gpt" if gpt_style else "llama"
    model.num_layers, model.hidden_size, model.vocab_size = len(layers), hidden, embedding.shape[0]
    model.tie_embeddings = _OUTPUT not in state
    if gpt_style:
        model.max_position_embeddings = state[_EMBEDDING + "position_embeddings.weight"].shape[0]
    known_length = {"model.seq_length", "model.max_position_embeddings"} & settings.keys()
    if not gpt_style and not known_length:
        raise ValueError("the checkpoint's args do not give the sequence length; pass --seq-length")
    if "model.seq_length" not in settings:
        model.seq_length = model.positions()
    if "model.num_attention_heads" not in settings:
        raise ValueError("the checkpoint's args do not give the number of attention heads; pass --num-attention-heads")
    if dense_layer is not None:
        model.ffn_hidden_size = state[_layer_prefix(dense_layer) + "mlp.dense_4h_to_h.weight"].shape[1]
    _infer_moe_layout(cfg, state, len(layers), settings.get("moe.expert_interval"), expert_output, ckpt_dir)
    return cfg


def _infer_moe_layout(cfg: Config, state: dict[str, Tensor], num_layers: int, interval: int | None,
                      expert_output: str | None, ckpt_dir: str) -> None:
    """Expert counts per MoE layer (from the gates), their interval, expert width and residual MoE."""
    moe = cfg.moe
    gate = "mlp.deepspeed_moe.gate.wg.weight"
    gates = {i: state[_layer_prefix(i) + gate].shape[0] for i in range(num_layers) if _layer_prefix(i) + gate in state}
    if not gates:
        moe.num_experts = [1]
        return
    interval = interval or min(gates) + 1
    slots = range(interval - 1, num_layers, interval)
    if not set(gates) <= set(slots):
        raise ValueError(f"MoE layers {sorted(gates)} are not every {interval}-th layer; pass the right "
                         "--expert-interval")
    counts = [gates.get(i, 1) for i in slots]
    moe.num_experts = [counts[0]] if len(set(counts)) == 1 else counts
    moe.expert_interval = interval
    if expert_output is not None:  # else the conversion reports the missing expert files
        moe.expert_ffn_hidden_size = state[expert_output].shape[1]
    residual = {_layer_prefix(i) + "mlp.coefficient.weight" in state for i in gates}
    if len(residual) > 1:
        raise ValueError(f"{ckpt_dir}: only some MoE layers have a residual MLP (mlp.coefficient); moetrain's "
                         "--mlp-type applies to all")
    moe.mlp_type = "residual" if residual.pop() else "standard"


def _check_overrides(cfg: Config, overrides: dict[str, Any]) -> None:
    """A flag that contradicts what the weights show is an error, not silently overruled."""
    for dest, value in overrides.items():
        section, field = dest.split(".")
        actual = getattr(getattr(cfg, section), field)
        if actual != value:
            raise ValueError(f"{dest} = {value} contradicts the checkpoint's weights, which give {actual}; "
                             "drop the flag")


# ----------------------------------------------------------------------------------------- the weights


def _qkv(weight: Tensor, heads: int, hidden: int) -> Tensor:
    """Megatron [kv heads, (q per group, k, v), head_dim, ...] -> moetrain [q; k; v], keys/values expanded."""
    head_dim = hidden // heads
    kv_heads = (weight.shape[0] // head_dim - heads) // 2
    if kv_heads < 1 or (heads + 2 * kv_heads) * head_dim != weight.shape[0] or heads % kv_heads:
        raise ValueError(f"query_key_value has {weight.shape[0]} rows, which does not fit {heads} heads of "
                         f"{head_dim}; check --num-attention-heads")
    groups = heads // kv_heads
    blocks = weight.reshape(kv_heads, groups + 2, head_dim, *weight.shape[1:])
    q = blocks[:, :groups].reshape(heads * head_dim, *weight.shape[1:])
    k, v = (blocks[:, groups + j].repeat_interleave(groups, dim=0).reshape(hidden, *weight.shape[1:])
            for j in (0, 1))
    return torch.cat([q, k, v])


class _Weights:
    """Lookups in a (Megatron-named) state dict, with moetrain's bias rule."""

    def __init__(self, state: dict[str, Tensor], gpt_style: bool, where: str, moe_layer_id: int | None = None) -> None:
        self.state, self.gpt_style, self.where, self.moe_layer_id = state, gpt_style, where, moe_layer_id

    def get(self, key: str) -> Tensor:
        if key not in self.state:
            expert = re.match(r"experts\.experts\.(\d+)\.", key)
            fix = f"{MAIN_FILE} is incomplete"
            if expert:
                name = f"layer_{self.moe_layer_id}_expert_{expert.group(1)}_mp_rank_00_model_states.pt"
                fix = f"the file of expert {expert.group(1)} ({name}) is missing"
            raise FileNotFoundError(f"{self.where}: no {key}; {fix}")
        return self.state[key]

    def bias(self, key: str, size: int) -> Tensor | None:
        """GPT style has biases (zeros where Megatron ran without them); llama style must have none."""
        value = self.state.get(key)
        if self.gpt_style:
            return value if value is not None else torch.zeros(size)
        if value is not None and value.any():
            raise ValueError(f"{self.where}: {key} is a non-zero bias; moetrain's llama style has no biases")
        return None


def _mlp(w: _Weights, src: str, dst: str, *, output_bias: bool = True) -> dict[str, Tensor]:
    """A Megatron ParallelMLP (dense_h_to_4h, dense_4h_to_h) -> moetrain MLP (fc1, fc2).

    output_bias=False: the bias of dense_4h_to_h is not applied (DeepSpeed's experts and residual MLP) -> zero.
    """
    fc1, fc2 = w.get(src + "dense_h_to_4h.weight"), w.get(src + "dense_4h_to_h.weight")
    out = {dst + "fc1.weight": fc1, dst + "fc2.weight": fc2}
    b1 = w.bias(src + "dense_h_to_4h.bias", fc1.shape[0])
    b2 = w.bias(src + "dense_4h_to_h.bias", fc2.shape[0]) if output_bias else torch.zeros(fc2.shape[0])
    if w.gpt_style:
        out |= {dst + "fc1.bias": b1, dst + "fc2.bias": b2}
    return out


def _moe_layer(w: _Weights, experts: int, dst: str) -> dict[str, Tensor]:
    """One DeepSpeed MoE layer (names from from_deepspeed_state_dict) -> moetrain's grouped experts."""
    per_expert = [_mlp(w, f"experts.experts.{e}.", "", output_bias=False) for e in range(experts)]
    out = {dst + "router.wg.weight": w.get("router.wg.weight"),
           dst + "experts.w1": torch.stack([p["fc1.weight"].t() for p in per_expert]),
           dst + "experts.w2": torch.stack([p["fc2.weight"].t() for p in per_expert])}
    if w.gpt_style:
        out[dst + "experts.b1"] = torch.stack([p["fc1.bias"] for p in per_expert])
        out[dst + "experts.b2"] = torch.stack([p["fc2.bias"] for p in per_expert])
    if "coefficient.weight" in w.state:  # residual MoE: a dense MLP beside the experts, mixed by a coefficient
        out |= _mlp(w, "mlp.", dst + "mlp.", output_bias=False)
        out |= {dst + f"coefficient.{kind}": w.get(f"coefficient.{kind}") for kind in ("weight", "bias")}
    return out


def _convert(cfg: Config, state: dict[str, Tensor], ckpt_dir: str) -> dict[str, Tensor]:
    """Megatron-DeepSpeed names and layouts -> moetrain's state dict."""
    heads, hidden = cfg.model.num_attention_heads, cfg.model.hidden_size
    w = _Weights(state, cfg.model.style == "gpt", ckpt_dir)
    out = {"tok_emb.weight": w.get(_EMBEDDING + "word_embeddings.weight"),
           "norm.weight": w.get("language_model.encoder.final_layernorm.weight"),
           "lm_head.weight": state.get(_OUTPUT, state[_EMBEDDING + "word_embeddings.weight"])}
    if w.gpt_style:
        out["pos_emb.weight"] = w.get(_EMBEDDING + "position_embeddings.weight")
        out["norm.bias"] = w.get("language_model.encoder.final_layernorm.bias")
    moe_layer_id = 0
    for i, experts in enumerate(cfg.experts_per_layer()):
        src, dst = _layer_prefix(i), f"blocks.{i}."
        out |= {dst + "attn.qkv.weight": _qkv(w.get(src + "self_attention.query_key_value.weight"), heads, hidden),
                dst + "attn.proj.weight": w.get(src + "self_attention.dense.weight"),
                dst + "norm1.weight": w.get(src + "input_layernorm.weight"),
                dst + "norm2.weight": w.get(src + "post_attention_layernorm.weight")}
        qkv_bias = w.bias(src + "self_attention.query_key_value.bias", 3 * hidden)
        if w.gpt_style:
            out |= {dst + "attn.qkv.bias": _qkv(qkv_bias, heads, hidden),
                    dst + "attn.proj.bias": w.bias(src + "self_attention.dense.bias", hidden),
                    dst + "norm1.bias": w.get(src + "input_layernorm.bias"),
                    dst + "norm2.bias": w.get(src + "post_attention_layernorm.bias")}
        else:
            w.bias(src + "self_attention.dense.bias", hidden)
        if experts:
            layer = _Weights(from_deepspeed_state_dict(state, prefix=src + "mlp."), w.gpt_style,
                             f"{ckpt_dir} layer {i}", moe_layer_id)
            out |= _moe_layer(layer, experts, dst + "ffn.")
            moe_layer_id += 1
        else:
            out |= _mlp(w, src + "mlp.", dst + "ffn.")
    return out


def import_deepspeed(ds_dir: str, out_dir: str, tokenizer: Tokenizer, *, trust_checkpoint: bool = False,
                     overrides: dict[str, Any] | None = None) -> tuple[Config, str]:
    """Convert a Megatron-DeepSpeed MoE checkpoint directory into a moetrain checkpoint.

    `overrides` maps "section.field" (e.g. "moe.topk") to values that win over the checkpoint's args.
    Returns the config and the checkpoint path.
    """
    check_new_checkpoint_dir(out_dir)
    ckpt_dir = _resolve_dir(ds_dir)
    state, args = _read_state(ckpt_dir, trust_checkpoint)
    cfg = _infer_config(state, args, overrides or {}, ckpt_dir)
    _check_overrides(cfg, overrides or {})
    if tokenizer.vocab_size > cfg.model.vocab_size:
        raise ValueError(f"the tokenizer has {tokenizer.vocab_size} tokens but the model's embedding only "
                         f"{cfg.model.vocab_size}; pass the tokenizer the model was trained with")
    # Megatron padded the embedding already: its rows stay, those past the tokenizer's are never predicted
    rows, cfg.model.vocab_size = cfg.model.vocab_size, tokenizer.vocab_size
    cfg.model.make_vocab_size_divisible_by = vocab_padding(tokenizer.vocab_size, rows)
    return cfg, save_model_checkpoint(out_dir, cfg, _convert(cfg, state, ckpt_dir), tokenizer)
