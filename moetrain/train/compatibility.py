"""Whether a checkpoint may be resumed by this run: the same function of the weights, the same token ids.

Restoring compares tensor shapes only, and many changes keep every shape: another head count splits the
same projections into other heads, another top-k or score function routes the same experts otherwise,
another tokenizer of the same size permutes the ids. Each such run would train on silently wrong
weights, so a resume compares the saved config and tokenizer with the run's and refuses a difference in
one line that lists it. `--finetune` is the deliberate way to load weights into another model (Megatron
skips its checkpoint-args check under --finetune too); tied and untied output layers stay refused, as
the weights cannot say which of two heads to keep.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

from moetrain.checkpoint import read_model_config
from moetrain.config import Config, ConfigError
from moetrain.data import Tokenizer


class Compared(NamedTuple):
    """What a resume compares for one flag: the config fields it reads, and their value as the model uses it."""

    fields: tuple[str, ...]
    value: Callable[[Config], Any]


# flag -> what it sets that changes the function the weights compute (sizes that shapes alone do not pin)
ARCHITECTURE: dict[str, Compared] = {
    "--model-style": Compared(("model.style",), lambda c: c.model.style),
    "--num-layers": Compared(("model.num_layers",), lambda c: c.model.num_layers),
    "--hidden-size": Compared(("model.hidden_size",), lambda c: c.model.hidden_size),
    "--num-attention-heads": Compared(("model.num_attention_heads",), lambda c: c.model.num_attention_heads),
    "--ffn-hidden-size": Compared(("model.ffn_hidden_size",), lambda c: c.model.ffn_size()),
    "--rope-theta": Compared(("model.rope_theta",),
                             lambda c: c.model.rope_theta if c.model.style == "llama" else None),
    "--norm-epsilon": Compared(("model.norm_eps",), lambda c: c.model.norm_eps),
    "--num-query-groups": Compared(("model.num_query_groups",), lambda c: c.model.kv_heads()),
    "--kv-channels": Compared(("model.kv_channels",), lambda c: c.model.head_dim()),
    "--qk-norm": Compared(("model.qk_norm",), lambda c: c.model.qk_norm),
    "--add-qkv-bias": Compared(("model.add_qkv_bias",), lambda c: c.model.add_qkv_bias),
    "--multi-latent-attention": Compared(
        ("model.multi_latent_attention", "model.q_lora_rank", "model.kv_lora_rank", "model.qk_head_dim",
         "model.qk_pos_emb_head_dim", "model.v_head_dim"),
        lambda c: (c.model.q_lora_rank, c.model.kv_lora_rank, c.model.qk_head_dim, c.model.qk_pos_emb_head_dim,
                   c.model.v_head_dim) if c.model.multi_latent_attention else None),
    "--rotary-percent": Compared(("model.rotary_percent",),
                                 lambda c: c.model.rotary_dim() if c.model.style == "llama" else None),
    "--rope-scaling": Compared(
        ("model.rope_scaling", "model.rope_scaling_factor", "model.original_max_position_embeddings",
         "model.max_position_embeddings", "model.seq_length", "model.beta_fast", "model.beta_slow", "model.mscale",
         "model.mscale_all_dim", "model.low_freq_factor", "model.high_freq_factor"),
        lambda c: (c.model.rope_scaling, c.model.rope_scaling_factor, c.model.original_positions(),
                   c.model.beta_fast, c.model.beta_slow, c.model.mscale, c.model.mscale_all_dim,
                   c.model.low_freq_factor, c.model.high_freq_factor) if c.model.rope_scaling else None),
    "--num-experts / --expert-interval": Compared(("moe.num_experts", "moe.expert_interval", "moe.moe_layer_freq"),
                                                  lambda c: c.experts_per_layer()),
    "--topk": Compared(("moe.topk",), lambda c: c.moe.topk if c.moe.is_moe else None),
    "--mlp-type": Compared(("moe.mlp_type",), lambda c: c.moe.mlp_type),
    "--moe-score-func": Compared(("moe.score_func",), lambda c: c.moe.score_func),
    "--moe-router-pre-softmax": Compared(("moe.pre_softmax",), lambda c: c.moe.pre_softmax),
    "--moe-router-topk-scaling-factor": Compared(("moe.topk_scaling_factor",), lambda c: c.moe.topk_scaling_factor),
    "--moe-router-num-groups": Compared(("moe.num_groups",), lambda c: c.moe.num_groups),
    "--moe-router-group-topk": Compared(("moe.group_topk",), lambda c: c.moe.group_topk),
    "--num-shared-experts": Compared(("moe.num_shared_experts",), lambda c: c.moe.num_shared_experts),
    "--moe-ffn-hidden-size": Compared(("moe.expert_ffn_hidden_size",), lambda c: c.moe.expert_ffn_size(c.model)),
    "--moe-shared-expert-intermediate-size": Compared(("moe.shared_expert_ffn_size",),
                                                      lambda c: c.moe.shared_expert_ffn_size),
    "--moe-shared-expert-gate": Compared(("moe.shared_expert_gate",), lambda c: c.moe.shared_expert_gate),
}
# the model and MoE fields a resume may change, and why; every field of ModelConfig and MoEConfig is in one of
# ARCHITECTURE's `fields` or here (tests/train/test_resume_compatibility.py), so a new option cannot be missed
MAY_CHANGE: dict[str, str] = {
    "model.vocab_size": "pinned by the embedding's shape; the tokenizer is compared itself",
    "model.make_vocab_size_divisible_by": "a checkpoint keeps its own padded row count",
    "model.tie_embeddings": "compared by check_tied_alike, also under --finetune",
    **dict.fromkeys(("model.hidden_dropout", "model.attention_dropout"), "training regularisation"),
    "model.init_method_std": "initialisation only",
    **dict.fromkeys(("model.recompute_granularity", "model.recompute_method", "model.recompute_num_layers"),
                    "memory only: the same losses and gradients"),
    **dict.fromkeys(("moe.train_capacity_factor", "moe.eval_capacity_factor", "moe.min_capacity", "moe.drop_tokens",
                     "moe.drop_policy", "moe.use_rts", "moe.pad_expert_input_to_capacity"),
                    "how many tokens an expert takes: a training policy, not the experts' function"),
    **dict.fromkeys(("moe.noisy_gate_policy", "moe.top2_2nd_expert_sampling", "moe.input_jitter_eps"),
                    "noise in training only"),
    **dict.fromkeys(("moe.aux_loss_coeff", "moe.z_loss_coeff", "moe.load_balancing_type",
                     "moe.load_balancing_coeffs", "moe.expert_bias", "moe.expert_bias_update_rate"),
                    "balancing: what the loss or the bias update pushes towards"),
    "moe.router_dtype": "the router's precision",
}
TIE_FLAG = "--untie-embeddings-and-output-weights"


def check_loadable(path: str, cfg: Config, tokenizer: Tokenizer, finetune: bool) -> None:
    """Refuse to resume (or, with `finetune`, to load the weights of) the checkpoint at `path` into this run
    where it was trained otherwise (check_resumable, check_tied_alike)."""
    saved, saved_tokenizer = read_model_config(path)
    if finetune:
        check_tied_alike(saved, cfg, path)
    else:
        check_resumable(saved, saved_tokenizer, cfg, tokenizer, path)


def check_tied_alike(saved: Config, cfg: Config, path: str) -> None:
    """Tied and untied output layers are no deliberate difference --finetune could allow."""
    if saved.model.tie_embeddings != cfg.model.tie_embeddings:
        saved_how = "ties its output layer to the embedding" if saved.model.tie_embeddings else \
            f"has its own output layer ({TIE_FLAG})"
        fix = f"drop {TIE_FLAG}" if saved.model.tie_embeddings else f"pass {TIE_FLAG}"
        raise ConfigError(f"checkpoint {path} {saved_how} and this run does not; {fix}")


def check_resumable(saved: Config, saved_tokenizer: Tokenizer, cfg: Config, tokenizer: Tokenizer,
                    path: str) -> None:
    """Raise a one-line ConfigError listing every architecture flag and the tokenizer that differ between
    the checkpoint at `path` and this run."""
    check_tied_alike(saved, cfg, path)
    differences = [f"{flag} {compared.value(saved)} (checkpoint) vs {compared.value(cfg)} (this run)"
                   for flag, compared in ARCHITECTURE.items() if compared.value(saved) != compared.value(cfg)]
    if not same_token_ids(saved_tokenizer, tokenizer):
        differences.append(f"the tokenizer ({saved_tokenizer.vocab_size} tokens in the checkpoint's tokenizer.json, "
                           f"{tokenizer.vocab_size} in this run's, ids differ)")
    if differences:
        raise ConfigError(f"checkpoint {path} was trained otherwise: {'; '.join(differences)}. Resume with its flags "
                          f"and tokenizer, or pass --finetune to load only its weights into this model deliberately")


def same_token_ids(a: Tokenizer, b: Tokenizer) -> bool:
    """Whether both tokenizers give every id the same text (so the same text the same ids)."""
    if a.vocab_size != b.vocab_size or a.eos_id != b.eos_id:
        return False
    ids = list(range(a.vocab_size))
    return a.decode(ids) == b.decode(ids)
