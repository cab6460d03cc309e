"""Every option of `moetrain train` as typed dataclasses, one per section; each field declares its flags here.

Choice lists come from the modules that implement them, so a new router score function is one edit; the LR
decay styles, which the training loop (a layer above the config) implements, are listed here and checked
there. Validation is pure (config/validation.py); sizes known only at run time (the micro-batch left to
DeepSpeed's rule, the vocabulary) are filled by ``resolve``, which returns a new Config.
"""

from __future__ import annotations

import argparse
import ast
import copy
import dataclasses
from dataclasses import dataclass, field
from typing import Any

from moetrain.config import validation
from moetrain.config.option import check, option, switch
from moetrain.data.tokenizer import TOKENIZER_KINDS, tokenizer_kind
from moetrain.moe.balance import BALANCE_TYPES
from moetrain.moe.routing_config import DROP_POLICIES, NOISY_GATE_POLICIES, ROUTER_DTYPES, SCORE_FUNCS, RoutingConfig
from moetrain.precision import PRECISIONS

LR_DECAY_STYLES = ("cosine", "linear", "constant")  # each computed by moetrain.train.lr_schedule.LRSchedule
MODEL_STYLES = ("gpt", "llama")
QK_NORMS = (None, "head", "projection")
ROPE_SCALINGS = (None, "yarn", "llama3")
MLP_TYPES = ("standard", "residual")
RECOMPUTE_GRANULARITIES = (None, "full", "selective")
RECOMPUTE_METHODS = ("uniform", "block")
TOKENIZER_TYPES = TOKENIZER_KINDS
DEVICES = ("auto", "cpu", "cuda")
DISTRIBUTED_BACKENDS = (None, "nccl", "gloo")
PIPELINE_SCHEDULES = ("1f1b", "gpipe")
ZERO_STAGES = (0, 1, 2, 3)


def _none_or_str(text: str) -> str | None:
    return None if text in ("None", "none") else text


def _layer_pattern_token(text: str) -> list[int]:
    """One token of --moe-layer-freq: an integer, or Megatron-Core's Python list expression such as
    "([0]*3+[1]*58)" or "[1,0,1,0]", read by walking its syntax tree (lists, integers, + and *), never eval."""
    def value(node: ast.AST) -> int | list[int]:
        if isinstance(node, ast.Constant) and type(node.value) is int:
            return node.value
        if isinstance(node, ast.List):
            items = [value(item) for item in node.elts]
            if all(isinstance(item, int) for item in items):
                return items
        if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Add, ast.Mult)):
            left, right = value(node.left), value(node.right)
            if isinstance(node.op, ast.Add) and isinstance(left, list) and isinstance(right, list):
                return left + right
            if isinstance(node.op, ast.Mult) and isinstance(left, list) != isinstance(right, list):
                return left * right
        raise ValueError(text)

    try:
        pattern = value(ast.parse(text.strip(), mode="eval").body)
    except (SyntaxError, ValueError):
        raise argparse.ArgumentTypeError(
            f"expects an integer or a list of 0/1 per layer like '([0]*3+[1]*58)', got {text!r}") from None
    return [pattern] if isinstance(pattern, int) else pattern


def _expert_counts_token(text: str) -> list[int]:
    """One command-line token of --num-experts: "8", "[8,", "16]" or a whole "[8, 8, 16, 16]"."""
    pieces = text.replace("[", " ").replace("]", " ").replace(",", " ").split()
    try:
        return [int(piece) for piece in pieces]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expects integers like '8', '8 8 16 16' or '[8, 8, 16, 16]', got {text!r}") from None


def _flatten_expert_counts(token_counts: list[list[int]]) -> list[int]:
    counts = [count for token in token_counts for count in token]
    if not counts:
        raise ValueError("expects at least one expert count")
    return counts


def _keep_count(text: str) -> int | None:
    """--keep-last-checkpoints: 0 keeps every checkpoint."""
    count = int(text)
    if count < 0:
        raise argparse.ArgumentTypeError(f"must be 0 (keep all) or positive, got {count}")
    return count or None


def _tokenizer_type(text: str) -> str:
    """Accept Megatron's tokenizer class names so its launch scripts run unchanged."""
    return tokenizer_kind(text)


def _data_impl(text: str) -> str:
    """Megatron's --data-impl: moetrain always memory-maps, which is what mmap and infer give there."""
    if text not in ("mmap", "infer"):
        raise argparse.ArgumentTypeError(f"moetrain reads memory-mapped data only; use mmap, not {text!r}")
    return text


# RoutingConfig fields (DeepSpeed's names) whose MoEConfig field, and so flag, is named otherwise
_ROUTING_FIELDS_RENAMED = {"k": "topk", "capacity_factor": "train_capacity_factor"}
_EXPERT_COUNTS = {"nargs": "+", "type": _expert_counts_token, "convert": _flatten_expert_counts, "metavar": "N"}
_LAYER_PATTERN = {"nargs": "+", "type": _layer_pattern_token, "convert": _flatten_expert_counts, "metavar": "P"}
_TEACHER = "checked against the teacher checkpoint"


@dataclass
class ModelConfig:
    style: str = option("gpt", "--model-style", choices=MODEL_STYLES,
                        help="gpt: learned positions, LayerNorm, GELU, biases; llama: RoPE, RMSNorm, SwiGLU, no biases")
    num_layers: int = option(4, "--num-layers", help="transformer layers")
    hidden_size: int = option(256, "--hidden-size", help="model width")
    num_attention_heads: int = option(8, "--num-attention-heads", help="attention heads")
    ffn_hidden_size: int | None = option(
        None, "--ffn-hidden-size", help="dense FFN width; unset: 4*hidden (gpt) or 8/3*hidden rounded up to 64 (llama)")
    seq_length: int = option(256, "--seq-length", help="tokens per training sequence")
    max_position_embeddings: int | None = option(
        None, "--max-position-embeddings",
        help="positions the model holds (gpt: the position-embedding table, llama: the RoPE tables), at least "
             "--seq-length; unset: --seq-length")
    vocab_size: int = 0  # the tokenizer's, set by resolve() once the run has built it
    make_vocab_size_divisible_by: int = option(
        128, "--make-vocab-size-divisible-by",
        help="pad the embedding and LM-head rows to a multiple of this (aligned GEMMs, as Megatron); the padded "
             "rows are never predicted. A resumed run keeps its checkpoint's padding")
    hidden_dropout: float = option(0.0, "--hidden-dropout", help="dropout after attention and FFN")
    attention_dropout: float = option(0.0, "--attention-dropout", help="dropout on attention probabilities")
    init_method_std: float = option(0.02, "--init-method-std", help="std of the normal weight init")
    num_query_groups: int | None = option(
        None, "--num-query-groups", help="key/value heads, each shared by a group of query heads (grouped-query "
                                         "attention), a divisor of --num-attention-heads; unset: one per query head")
    kv_channels: int | None = option(None, "--kv-channels",
                                     help="width of each attention head; unset: --hidden-size / --num-attention-heads")
    qk_norm: str | None = option(
        None, "--qk-norm", type=_none_or_str, choices=QK_NORMS,
        help="RMSNorm of queries and keys before RoPE: head (each head over its own width, shared weights: Qwen3, "
             "GLM-4.5) or projection (the whole query and key projections: OLMoE); None: off",
        switches=(switch("--qk-layernorm", "head", help="Megatron-Core's name for --qk-norm head"),))
    add_qkv_bias: bool = option(False, switches=(switch(
        "--add-qkv-bias", True, help="llama style: biases on the query, key and value projections (Qwen2, GLM-4.5)"),))
    multi_latent_attention: bool = option(False, switches=(switch(
        "--multi-latent-attention", True,
        help="Multi-head Latent Attention (DeepSeek-V2/V3): keys and values from one low-rank latent per token, "
             "RoPE on a separate --qk-pos-emb-head-dim part shared by all heads"),))
    q_lora_rank: int | None = option(None, "--q-lora-rank",
                                     help="MLA: rank of the query's low-rank projection; unset: a full projection")
    kv_lora_rank: int = option(32, "--kv-lora-rank", help="MLA: width of the key/value latent")
    qk_head_dim: int = option(128, "--qk-head-dim", help="MLA: query/key dimensions per head without RoPE")
    qk_pos_emb_head_dim: int = option(64, "--qk-pos-emb-head-dim",
                                      help="MLA: query/key dimensions per head that RoPE rotates")
    v_head_dim: int = option(128, "--v-head-dim", help="MLA: value dimensions per head")
    rotary_percent: float = option(1.0, "--rotary-percent",
                                   help="fraction of each head's dimensions RoPE rotates (the first ones; GLM: 0.5)")
    rope_theta: float = option(10000.0, "--rope-theta", help="RoPE base (llama style)")
    rope_scaling: str | None = option(
        None, "--rope-scaling", type=_none_or_str, choices=ROPE_SCALINGS,
        help="stretch RoPE beyond the length the model was trained at: yarn (DeepSeek-V3, GLM, Qwen3) or llama3 "
             "(Llama 3.1); None: plain RoPE")
    rope_scaling_factor: float = option(1.0, "--rope-scaling-factor",
                                        help="new context length / --original-max-position-embeddings")
    original_max_position_embeddings: int | None = option(
        None, "--original-max-position-embeddings",
        help="the context length before scaling; unset: --max-position-embeddings / --rope-scaling-factor")
    beta_fast: float = option(32.0, "--beta-fast",
                              help="yarn: rotations per context above which a frequency is kept")
    beta_slow: float = option(1.0, "--beta-slow",
                              help="yarn: rotations per context below which a frequency is interpolated")
    mscale: float | None = option(None, "--mscale",
                                  help="yarn: attention temperature coefficient (DeepSeek's mscale)")
    mscale_all_dim: float | None = option(None, "--mscale-all-dim",
                                          help="yarn: DeepSeek's mscale_all_dim (also scales MLA's softmax)")
    low_freq_factor: float = option(1.0, "--low-freq-factor",
                                    help="llama3: wavelengths above original length / this are interpolated")
    high_freq_factor: float = option(4.0, "--high-freq-factor",
                                     help="llama3: wavelengths below original length / this are kept")
    norm_eps: float = option(1e-5, "--norm-epsilon", "--layernorm-epsilon", help="LayerNorm / RMSNorm epsilon")
    tie_embeddings: bool = option(True, switches=(switch(
        "--untie-embeddings-and-output-weights", False,
        help="give the output layer its own weights instead of the input embedding's"),))
    recompute_granularity: str | None = option(
        None, "--recompute-granularity", type=_none_or_str, choices=RECOMPUTE_GRANULARITIES, group="training",
        help="activation recomputation: full (whole blocks) or selective (the attention core); None: off",
        switches=(switch("--checkpoint-activations", "full",
                         help="DeepSpeed's name for --recompute-granularity full (uniform, 1 layer)"),))
    recompute_method: str = option("uniform", "--recompute-method", choices=RECOMPUTE_METHODS, group="training",
                                   help="full recompute: uniform (every run of --recompute-num-layers blocks "
                                        "as one unit) or block (only the first --recompute-num-layers blocks "
                                        "of each pipeline stage, one by one)")
    recompute_num_layers: int = option(1, "--recompute-num-layers", group="training",
                                       help="blocks per recomputed unit (uniform) or blocks recomputed (block)")

    def padded_vocab_size(self) -> int:
        """Rows of the embedding and the LM head: the vocabulary rounded up to --make-vocab-size-divisible-by."""
        multiple = self.make_vocab_size_divisible_by
        return -(-self.vocab_size // multiple) * multiple

    def positions(self) -> int:
        """Length of the position tables: the longest sequence the model accepts (Megatron's
        max_position_embeddings, which may exceed the training length)."""
        return self.max_position_embeddings or self.seq_length

    def head_dim(self) -> int:
        return self.kv_channels or self.hidden_size // self.num_attention_heads

    def kv_heads(self) -> int:
        """Key/value heads: the query groups, one per query head without grouped-query attention."""
        return self.num_query_groups or self.num_attention_heads

    def original_positions(self) -> int:
        """The context length RoPE scaling stretches from."""
        return self.original_max_position_embeddings or round(self.positions() / self.rope_scaling_factor)

    def rotary_dim(self) -> int:
        """Dimensions of each head that RoPE rotates (an even number); MLA's rotary part."""
        if self.multi_latent_attention:
            return self.qk_pos_emb_head_dim
        return int(self.head_dim() * self.rotary_percent) // 2 * 2

    def ffn_size(self) -> int:
        """Dense FFN width: 4h for GPT; for llama 8h/3 (SwiGLU's 3 matrices then hold as many parameters as
        GELU's 2 at 4h), rounded up to a multiple of 64."""
        if self.ffn_hidden_size is not None:
            return self.ffn_hidden_size
        if self.style == "llama":
            return (8 * self.hidden_size // 3 + 63) // 64 * 64
        return 4 * self.hidden_size


@dataclass
class MoEConfig:
    num_experts: list[int] = option([8], "--num-experts", **_EXPERT_COUNTS,
                                    help="experts per MoE layer: one count, or one per MoE layer ('8 8 16 16' or "
                                         "'[8, 8, 16, 16]'); 0 or 1 means a dense layer")
    expert_interval: int = option(2, "--expert-interval", "--moe-layer-interval",
                                  help="MoE in every N-th layer (0-based layers N-1, 2N-1, ...)")
    moe_layer_freq: list[int] | None = option(
        None, "--moe-layer-freq", **_LAYER_PATTERN,
        help="Megatron-Core's MoE layer placement, instead of --expert-interval: an integer N (layers 0, N, 2N, ...) "
             "or one 0/1 per layer, e.g. '([0]*3+[1]*58)' for three dense layers first")
    topk: int = option(1, "--topk", "--num-experts-per-token", "--moe-top-k", "--moe-router-topk",
                      help="experts each token is routed to")
    mlp_type: str = option("standard", "--mlp-type", choices=MLP_TYPES,
                           help="residual: PR-MoE, a dense MLP mixed with the MoE output by a learned coefficient")
    train_capacity_factor: float = option(1.0, "--moe-train-capacity-factor", "--moe-expert-capacity-factor",
                                          help="expert capacity = ceil(tokens / experts * factor) in training")
    eval_capacity_factor: float = option(1.0, "--moe-eval-capacity-factor", help="capacity factor in evaluation")
    min_capacity: int = option(4, "--moe-min-capacity", help="lower bound on expert capacity")
    drop_tokens: bool = option(True, switches=(switch(
        "--disable-moe-token-dropping", False,
        help="raise capacity to the busiest expert's load so no token is dropped"),))
    use_rts: bool = option(True, switches=(switch(
        "--disable-moe-rts", False, help="keep the first tokens over capacity instead of a random selection"),))
    noisy_gate_policy: str | None = option(None, "--noisy-gate-policy", type=_none_or_str, choices=NOISY_GATE_POLICIES,
                                           help="gate noise in training")
    top2_2nd_expert_sampling: bool = option(True, switches=(switch(
        "--disable-moe-top2-2nd-expert-sampling", False,
        help="pick top-2's second expert by argmax instead of sampling with Gumbel noise"),))
    aux_loss_coeff: float = option(0.01, "--moe-loss-coeff", "--router-aux-loss-coef", "--moe-aux-loss-coeff",
                                   help="weight of the load-balancing loss")
    z_loss_coeff: float = option(0.0, "--router-z-loss-coef", "--moe-z-loss-coeff", help="weight of the router z-loss")
    score_func: str = option("softmax", "--moe-score-func", "--moe-router-score-function", choices=SCORE_FUNCS,
                             help="router scores from the gate logits")
    drop_policy: str | None = option(None, "--moe-drop-policy", "--moe-token-drop-policy", type=_none_or_str,
                                     choices=(None, *DROP_POLICIES),
                                     help="which tokens an expert over capacity keeps; None: DeepSpeed's choice for "
                                          "the top-k")
    expert_bias: bool = option(False, switches=tuple(
        switch(flag, True, help="aux-loss-free balancing: a per-expert selection bias nudged towards even load")
        for flag in ("--moe-expert-bias", "--moe-router-enable-expert-bias")))
    expert_bias_update_rate: float = option(1e-3, "--moe-expert-bias-update-rate", "--moe-router-bias-update-rate",
                                            help="step size of the expert-bias update")
    num_shared_experts: int = option(0, "--num-shared-experts", help="always-active experts beside the routed ones")
    expert_ffn_hidden_size: int | None = option(None, "--moe-ffn-hidden-size",
                                                help="expert FFN width; unset: the model's FFN width")
    load_balancing_type: list[str] | None = option(
        None, "--moe-router-load-balancing-type", nargs="+", choices=(None, *BALANCE_TYPES), metavar="TYPE",
        help="balance losses, one or several: aux_loss (all k choices counted, / k), seq_aux_loss (per sequence), "
             "global_aux_loss (counted over the step's micro-batches and data-parallel ranks), sinkhorn (top-1), "
             "none; unset: DeepSpeed's l_aux")
    load_balancing_coeffs: list[float] | None = option(
        None, "--moe-router-load-balancing-coeffs", nargs="+", type=float, metavar="C",
        help="one weight per --moe-router-load-balancing-type, multiplied by --moe-aux-loss-coeff; unset: all 1")
    num_groups: int | None = option(None, "--moe-router-num-groups",
                                    help="group-limited routing: experts split into this many groups (align them "
                                         "with expert-parallel ranks to bound the ranks a token visits)")
    group_topk: int | None = option(None, "--moe-router-group-topk",
                                    help="group-limited routing: groups each token may choose experts from")
    pre_softmax: bool = option(False, switches=(switch(
        "--moe-router-pre-softmax", True,
        help="routing weights are the softmax over all experts, not renormalised over the top-k"),))
    topk_scaling_factor: float | None = option(None, "--moe-router-topk-scaling-factor",
                                               help="multiply the routing weights (DeepSeek-V3: 2.5)")
    input_jitter_eps: float | None = option(None, "--moe-input-jitter-eps",
                                            help="in training, scale the router input by U[1-eps, 1+eps]")
    router_dtype: str = option("fp32", "--moe-router-dtype", choices=tuple(ROUTER_DTYPES),
                               help="precision of the router's GEMM, scores and losses")
    shared_expert_ffn_size: int | None = option(
        None, "--moe-shared-expert-intermediate-size",
        help="width of the shared expert; unset: --num-shared-experts x the expert FFN width")
    pad_expert_input_to_capacity: bool = option(False, switches=(switch(
        "--moe-pad-expert-input-to-capacity", True,
        help="pad every expert's input to its capacity so the expert GEMMs have static shapes (CUDA graphs); "
             "needs token dropping (a capacity)"),))
    shared_expert_gate: bool = option(False, switches=(switch(
        "--moe-shared-expert-gate", True, help="scale the shared expert's output by a learned sigmoid gate "
                                               "per token (Qwen2-MoE)"),))

    @property
    def is_moe(self) -> bool:
        """Megatron-DeepSpeed treats a layer with 0 or 1 experts as a dense MLP."""
        return any(count > 1 for count in self.num_experts)

    def experts_per_layer(self, num_layers: int) -> list[int]:
        """Expert count of every layer, 0 for dense ones.

        MoE layers are the 0-based layers interval-1, 2*interval-1, ... as in Megatron-DeepSpeed, or those
        --moe-layer-freq marks; one count applies to all of them, a list (pyramid) gives one count per MoE
        layer in order.
        """
        moe_layers = self.moe_layer_indices(num_layers)
        placement = f"--expert-interval {self.expert_interval}" if self.moe_layer_freq is None else "--moe-layer-freq"
        counts = self.num_experts * len(moe_layers) if len(self.num_experts) == 1 else self.num_experts
        check(len(counts) == len(moe_layers),
              f"--num-experts lists {len(self.num_experts)} counts but --num-layers {num_layers} with "
              f"{placement} has {len(moe_layers)} MoE layers; "
              f"give 1 count or {len(moe_layers)}, one per MoE layer in order as Megatron-DeepSpeed expects "
              f"(layers {', '.join(map(str, moe_layers[:3]))}{', ...' if len(moe_layers) > 3 else ''})")
        per_layer = [0] * num_layers
        for layer, count in zip(moe_layers, counts, strict=True):
            per_layer[layer] = count if count > 1 else 0
        return per_layer

    def moe_layer_indices(self, num_layers: int) -> list[int] | range:
        """The layers that may hold experts: by --moe-layer-freq when given, else by --expert-interval."""
        freq = self.moe_layer_freq
        if freq is None:
            validation.check_at_least("--expert-interval", self.expert_interval, 1)
            return range(self.expert_interval - 1, num_layers, self.expert_interval)
        if len(freq) == 1 and num_layers > 1:
            validation.check_at_least("--moe-layer-freq", freq[0], 1)
            return range(0, num_layers, freq[0])
        check(len(freq) == num_layers and set(freq) <= {0, 1},
              f"--moe-layer-freq lists {len(freq)} entries {sorted(set(freq))} for --num-layers {num_layers}; "
              f"give one 0 (dense) or 1 (MoE) per layer")
        return [layer for layer, moe in enumerate(freq) if moe]

    def num_moe_layers(self, num_layers: int) -> int:
        """Layers that hold experts (a pyramid entry of 0 or 1 leaves its layer dense)."""
        return sum(1 for count in self.experts_per_layer(num_layers) if count)

    def routing(self) -> RoutingConfig:
        """The routing of every MoE layer: each RoutingConfig field from the field of the same name here (which
        declares its flag), `k` from topk, `capacity_factor` from train_capacity_factor. ValueError for options
        that cannot work together."""
        return RoutingConfig(**{field.name: getattr(self, _ROUTING_FIELDS_RENAMED.get(field.name, field.name))
                                for field in dataclasses.fields(RoutingConfig)})

    def expert_ffn_size(self, model: ModelConfig) -> int:
        return self.expert_ffn_hidden_size if self.expert_ffn_hidden_size is not None else model.ffn_size()


@dataclass
class DataConfig:
    data_path: list[str] | None = option(
        None, "--data-path", nargs="+",
        help="prepared prefixes (moetrain's or Megatron's), text/JSONL/Parquet/Arrow files or saved datasets, or a "
             "blend 'W1 PREFIX1 W2 PREFIX2 ...'; unset: the built-in corpus")
    train_data_path: list[str] | None = option(
        None, "--train-data-path", nargs="+",
        help="training data used whole (paths or a weighted blend), instead of --data-path and --split")
    valid_data_path: list[str] | None = option(None, "--valid-data-path", nargs="+",
                                               help="validation data used whole, with --train-data-path")
    json_keys: str = option("text", "--json-keys",
                            help="the JSONL field or Parquet/Arrow column holding the text of raw inputs")
    data_impl: str = option("mmap", "--data-impl", type=_data_impl,
                            help="Megatron's dataset implementation: mmap or infer; moetrain always memory-maps")
    tokenizer_type: str | None = option(
        None, "--tokenizer-type", type=_tokenizer_type, choices=(None, *TOKENIZER_TYPES),
        help="bpe: trained on the corpus; gpt2 (GPT2BPETokenizer): --vocab-file/--merge-file; byte: raw bytes; "
             "json: a tokenizers JSON file as --vocab-file (e.g. a checkpoint's tokenizer.json); hf "
             "(HuggingFaceTokenizer) or sentencepiece (SentencePieceTokenizer): --tokenizer-model. Unset: gpt2 when "
             "--vocab-file and --merge-file are given, else bpe")
    tokenizer_model: str | None = option(
        None, "--tokenizer-model",
        help="a directory with tokenizer.json (HuggingFaceTokenizer) or a .model file (SentencePieceTokenizer)")
    vocab_file: str | None = option(None, "--vocab-file", help="GPT-2 vocab.json, or the tokenizers JSON")
    merge_file: str | None = option(None, "--merge-file", help="GPT-2 merges.txt")
    vocab_size: int = option(4096, "--vocab-size", help="vocabulary size of a BPE trained on the corpus")
    split: str = option("98,2,0", "--split", help="train,valid,test weights")
    cache_dir: str | None = option(None, "--data-cache-dir", help="where tokenized data is cached")


@dataclass
class TrainingConfig:
    micro_batch_size: int | None = option(  # None: derived from the global batch (DeepSpeed train_batch_size alone)
        8, "--micro-batch-size", help="sequences per forward pass on each data-parallel rank")
    global_batch_size: int | None = option(
        None, "--global-batch-size", help="sequences per optimizer step over all ranks; a multiple of micro-batch x "
                                          "data-parallel size, the quotient being gradient accumulation steps; "
                                          "unset: no accumulation")
    train_iters: int = option(400, "--train-iters", "--max-steps", help="optimizer steps")
    lr: float = option(1e-3, "--lr", help="peak learning rate")
    min_lr: float = option(1e-4, "--min-lr", help="learning rate at the end of decay")
    lr_decay_style: str = option("cosine", "--lr-decay-style", choices=LR_DECAY_STYLES,
                                 help="shape of the decay after warmup")
    lr_warmup_iters: int | None = option(
        None, "--lr-warmup-iters", help="linear warmup steps from 0; unset: an eighth of the run (of --train-iters, "
                                        "or of --lr-decay-iters if that ends sooner), so any run length fits; "
                                        "Megatron's default is --lr-warmup-iters 0")
    lr_decay_iters: int | None = option(None, "--lr-decay-iters",
                                        help="step at which the decay reaches --min-lr; unset: --train-iters")
    weight_decay: float = option(0.1, "--weight-decay", help="AdamW weight decay")
    adam_beta1: float = option(0.9, "--adam-beta1", help="AdamW beta1")
    adam_beta2: float = option(0.95, "--adam-beta2", help="AdamW beta2")
    adam_eps: float = option(1e-8, "--adam-eps", help="AdamW epsilon")
    clip_grad: float = option(1.0, "--clip-grad", help="gradient-norm clipping threshold; 0 disables")
    seed: int = option(1234, "--seed", help="random seed")
    precision: str = option("fp32", switches=(switch("--fp16", "fp16", help="fp16 autocast with loss scaling"),
                                              switch("--bf16", "bf16", help="bf16 autocast")),
                            choices=PRECISIONS, group="precision", label="precision")
    loss_scale: float = option(0.0, "--loss-scale", group="precision", help="static fp16 loss scale; 0: dynamic")
    initial_scale_power: int = option(16, "--initial-scale-power", group="precision",
                                      help="dynamic loss scale starts at 2**power")
    loss_scale_window: int = option(1000, "--loss-scale-window", group="precision",
                                    help="overflow-free steps before the scale doubles")
    hysteresis: int = option(2, "--hysteresis", group="precision", help="overflows tolerated before the scale halves")
    consecutive_hysteresis: bool = False  # DeepSpeed JSON fp16.consecutive_hysteresis only
    min_loss_scale: float = option(1.0, "--min-loss-scale", group="precision", help="floor of the dynamic loss scale")
    eval_interval: int = option(100, "--eval-interval", group="logging",
                                help="steps between evaluations; 0: only at the end")
    eval_iters: int = option(10, "--eval-iters", group="logging", help="batches per evaluation")
    log_interval: int = option(10, "--log-interval", group="logging", help="steps between metrics records")
    save: str | None = option("runs/default", "--save", group="logging", help="checkpoint and metrics directory",
                              switches=(switch("--no-save", None, help="write no checkpoints"),))
    load: str | None = option(None, "--load", group="logging", help="checkpoint directory to resume from")
    finetune: bool = option(False, group="logging", switches=(switch(
        "--finetune", True, help="--load only the checkpoint's weights (into a model whose flags may differ from "
                                 "its own, as long as the weights fit): iteration 0, fresh optimizer, data and RNG"),))
    load_optim: bool = option(True, group="logging", switches=(switch(
        "--no-load-optim", False, help="resume without the checkpoint's optimizer state (fresh AdamW moments)"),))
    load_rng: bool = option(True, group="logging", switches=(switch(
        "--no-load-rng", False, help="resume without the checkpoint's RNG states"),))
    save_interval: int = option(0, "--save-interval", group="logging",
                                help="steps between checkpoints; 0: only at the end")
    keep_last_checkpoints: int | None = option(3, "--keep-last-checkpoints", type=_keep_count, group="logging",
                                               help="checkpoints kept on disk; 0 keeps all")
    check_for_nan_in_loss_and_grad: bool = option(True, label="--check-for-nan-in-loss-and-grad",
                                                  switches=(
        switch("--check-for-nan-in-loss-and-grad", True, help="skip a step whose loss or gradient norm is not "
                                                              "finite (default)"),
        switch("--no-check-for-nan-in-loss-and-grad", False, help="apply every step, even with NaN gradients")))
    max_skipped_steps: int = option(3, "--max-skipped-steps",
                                    help="consecutive non-finite steps after which the run stops (or rewinds)")
    rewind_on_divergence: int = option(0, "--rewind-on-divergence",
                                       help="on a stop, reload the last good checkpoint and skip the next K batches; "
                                            "0: stop")
    max_rewinds: int = option(3, "--max-rewinds",
                              help="rewinds (--rewind-on-divergence) allowed per run before it stops")
    tensorboard_dir: str | None = option(None, "--tensorboard-dir", group="logging",
                                         help="also write TensorBoard events here")
    device: str = option("auto", "--device", choices=DEVICES, help="auto: cuda when available, else cpu")
    tf32: bool = option(True, group="precision", switches=(switch(
        "--no-tf32", False, help="fp32 matmuls on CUDA in full fp32 instead of TF32 (slower, ~3 more digits)"),))
    compile: bool = option(False, switches=(switch(
        "--compile", True, help="torch.compile each transformer block on its own (regional compilation, as "
                                "torchtitan): the same losses, fewer and fused kernels; the first steps compile"),))
    deterministic: bool = option(False, switches=(switch(
        "--deterministic", True, help="deterministic kernels (torch.use_deterministic_algorithms, a fixed "
                                      "cuBLAS workspace), so a GPU run and its resume repeat bit for bit; "
                                      "costs speed, and an op without a deterministic kernel stops the run"),))
    progress_bar: bool = option(True, group="logging", switches=(switch(
        "--no-progress-bar", False, help="plain log lines instead of a progress bar"),))

    def decay_iters(self) -> int:
        """The step at which the LR decay reaches --min-lr."""
        return self.lr_decay_iters or self.train_iters

    def warmup_iters(self) -> int:
        """--lr-warmup-iters, or unset an eighth of the run (50 of the default 400 steps): a default that never
        outlasts a short --train-iters or an early --lr-decay-iters."""
        if self.lr_warmup_iters is not None:
            return self.lr_warmup_iters
        return min(self.train_iters, self.decay_iters()) // 8


@dataclass
class ParallelConfig:
    tensor_parallel_size: int = option(1, "--tensor-parallel-size", "--tensor-model-parallel-size",
                                       help="tensor-parallel ranks")
    pipeline_parallel_size: int = option(1, "--pipeline-parallel-size", "--pipeline-model-parallel-size",
                                         help="pipeline stages")
    expert_parallel_size: int | None = option(
        None, "--expert-parallel-size", "--moe-expert-parallel-size",
        help="ranks the experts of a layer are spread over, a divisor of the data-parallel size; "
             "unset: the tensor-parallel size")
    num_microbatches: int | None = option(
        None, "--num-microbatches", help="micro-batches per optimizer step and rank (DeepSpeed "
                                         "gradient_accumulation_steps); unset: from --global-batch-size")
    zero_stage: int = option(0, "--zero-stage", choices=ZERO_STAGES, switches=(switch(
        "--use-torch-fsdp2", 3, help="Megatron's name for --zero-stage 3 (torch FSDP2, parameters sharded)"),),
        help="ZeRO sharding over data parallel: 1 optimizer state, 2 also gradients, 3 also parameters "
             "(torch FSDP2: each block gathered for its forward and backward, then freed)")
    reshard_after_forward: bool = option(True, switches=(switch(
        "--no-reshard-after-forward", False,
        help="ZeRO-3: keep each block's gathered parameters from its forward to its backward (no second "
             "gather; more memory, as ZeRO-2 holds them)"),))
    pipeline_schedule: str = option("1f1b", "--pipeline-schedule", choices=PIPELINE_SCHEDULES,
                                    help="pipeline-parallel schedule over the micro-batches")
    offload_optimizer: bool = False  # DeepSpeed JSON zero_optimization.offload_optimizer.device only
    offload_param: bool = False  # DeepSpeed JSON zero_optimization.offload_param.device only (ZeRO-3)
    distributed_backend: str | None = option(None, "--distributed-backend", type=_none_or_str,
                                             choices=DISTRIBUTED_BACKENDS,
                                             help="torch.distributed backend; None: nccl on cuda, else gloo")
    distributed_timeout_minutes: float = option(
        10.0, "--distributed-timeout-minutes", type=float,
        help="minutes a collective may wait for the other ranks before the job fails (NCCL's default: 10); a dead "
             "rank then fails the job, so torchrun --max-restarts can restart it from the last checkpoint")

    def parallel_sizes(self, world_size: int) -> dict[str, int]:
        """Split world_size into data/tensor/pipeline parallel sizes, and expert parallelism.

        Experts spread over the data-parallel ranks as in DeepSpeed, so an explicit EP size must divide
        dp; without one, experts are sharded over the tensor-parallel group (ep = tp).
        """
        tp, pp = self.tensor_parallel_size, self.pipeline_parallel_size
        validation.check_at_least("--tensor-parallel-size", tp, 1)
        validation.check_at_least("--pipeline-parallel-size", pp, 1)
        check(self.distributed_timeout_minutes > 0,
              f"--distributed-timeout-minutes {self.distributed_timeout_minutes} must be positive")
        check(world_size % (tp * pp) == 0,
              f"world size {world_size} is not divisible by tensor-parallel-size {tp} x pipeline-parallel-size "
              f"{pp}; launch a multiple of {tp * pp} processes or lower the parallel sizes")
        dp = world_size // (tp * pp)
        if self.expert_parallel_size is None:
            return {"dp": dp, "tp": tp, "pp": pp, "ep": tp}
        ep = self.expert_parallel_size
        validation.check_at_least("--expert-parallel-size", ep, 1)
        check(dp % ep == 0, f"--expert-parallel-size {ep} does not divide the data-parallel size {dp} "
                            f"(world {world_size} / (tp {tp} x pp {pp})); use a divisor of {dp}")
        return {"dp": dp, "tp": tp, "pp": pp, "ep": ep}


@dataclass
class DistillConfig:
    """Knowledge distillation (Megatron-DeepSpeed's Mixture-of-Students flags).

    The teacher's architecture comes from its checkpoint; the *_teacher fields, when given, are only checked
    against it. Loss = alpha_ce * LM loss + beta_ce * T^2 KL(teacher || student) + MoE losses.
    """
    enabled: bool = option(False, switches=(
        *(switch(flag, True, help="distil from the --load-teacher model: add the KD loss to the student's losses")
          for flag in ("--mos", "--kd")),
        switch("--teacher-forward", True,
               help="run the --load-teacher model forward for the KD loss: the same as --mos / --kd")))
    load_teacher: str | None = option(None, "--load-teacher",
                                      help="teacher checkpoint directory; its architecture is read from it")
    num_layers_teacher: int | None = option(None, "--num-layers-teacher", help=_TEACHER)
    hidden_size_teacher: int | None = option(None, "--hidden-size-teacher", help=_TEACHER)
    num_attention_heads_teacher: int | None = option(None, "--num-attention-heads-teacher", help=_TEACHER)
    num_experts_teacher: list[int] | None = option(None, "--num-experts-teacher", **_EXPERT_COUNTS,
                                                   help=f"{_TEACHER} (one count or one per MoE layer)")
    teacher_model_parallel_size: int | None = option(
        None, "--teacher-model-parallel-size",
        help="the teacher's tensor-parallel size: moetrain reads a teacher saved in any layout and shards it like the "
             "student, so 1 or --tensor-parallel-size")
    temperature: float = option(1.0, "--kd-temp", help="softmax temperature T")
    alpha_ce: float = option(1.0, "--kd-alpha-ce", help="weight of the LM loss")
    beta_ce: float = option(1.0, "--kd-beta-ce", help="weight of the distillation loss T^2 KL(teacher || student)")
    stop_iter: int | None = option(None, "--kd-stop-iter", help="staged KD: after this many iterations train on the "
                                                                "plain LM + MoE loss and free the teacher")
    student_init_from_teacher: bool = option(False, switches=(switch(
        "--student-init-from-teacher", True,
        help="start the student from evenly spaced teacher layers (first and last kept); tensors whose shapes "
             "differ keep their random init"),))


@dataclass
class MonitorConfig:
    """Watching and steering a long run: loss-spike skipping, expert-health alarms, routing record and
    replay, Weights & Biases, profiler traces (moetrain/train/monitor/)."""

    skip_loss_spikes: bool = option(False, switches=(switch(
        "--skip-loss-spikes", True,
        help="skip the optimizer step when the loss or the gradient norm exceeds the mean + K standard deviations "
             "of the last W applied steps (--loss-spike-window, --loss-spike-sigmas)"),))
    loss_spike_window: int = option(128, "--loss-spike-window",
                                    help="W: applied steps the rolling mean and deviation span (and the steps "
                                         "before the first check)")
    loss_spike_sigmas: float = option(6.0, "--loss-spike-sigmas", help="K: standard deviations above the mean "
                                                                       "that make a spike")
    expert_alarms: bool = option(True, switches=(switch(
        "--no-expert-alarms", False, help="no expert-health alarms (dead experts, collapse, low routing entropy) in "
                                          "metrics.jsonl and the log"),))
    expert_alarm_steps: int = option(100, "--expert-alarm-steps",
                                     help="N: steps a condition must last before its alarm fires (measured at the "
                                          "log interval)")
    collapse_factor: float = option(4.0, "--expert-collapse-factor",
                                    help="X: collapse when the busiest expert takes more than X times the uniform "
                                         "share (X / E of a layer's assignments)")
    record_routing: str | None = option(None, "--record-routing",
                                        help="write every token's chosen experts, per step and MoE layer, indexed by "
                                             "global token position, into this directory")
    replay_routing: str | None = option(None, "--replay-routing",
                                        help="route every token to the experts recorded in this directory (by "
                                             "--record-routing, under any layout); weights from the current router")
    wandb_project: str | None = option(None, "--wandb-project",
                                       help="log metrics.jsonl's records, the config and expert-load heatmaps to this "
                                            "Weights & Biases project (rank 0; pip install \"moetrain[wandb]\")")
    wandb_exp_name: str | None = option(None, "--wandb-exp-name", help="the W&B run's name")
    wandb_save_dir: str | None = option(None, "--wandb-save-dir", help="W&B's local files; default SAVE/wandb")
    wandb_entity: str | None = option(None, "--wandb-entity", help="the W&B team or user")
    profile: bool = option(False, switches=(switch(
        "--profile", True, help="torch.profiler over steps [--profile-step-start, --profile-step-end): a trace per "
                                "rank in TENSORBOARD_DIR or SAVE/profile, the top ops printed at the end"),))
    profile_step_start: int = option(10, "--profile-step-start", help="first profiled step")
    profile_step_end: int = option(12, "--profile-step-end", help="the step profiling stops before")
    profile_ranks: list[int] = option([0], "--profile-ranks", nargs="+", type=int, help="global ranks to profile")
    min_router_entropy: float = option(0.1, "--min-router-entropy",
                                       help="alarm when the mean per-token routing entropy falls below this fraction "
                                            "of its maximum log(E)")


SECTIONS: dict[str, type] = {
    "model": ModelConfig,
    "moe": MoEConfig,
    "data": DataConfig,
    "training": TrainingConfig,
    "parallel": ParallelConfig,
    "distill": DistillConfig,
    "monitor": MonitorConfig,
}


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    moe: MoEConfig = field(default_factory=MoEConfig)
    data: DataConfig = field(default_factory=DataConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    monitor: MonitorConfig = field(default_factory=MonitorConfig)

    def experts_per_layer(self) -> list[int]:
        return self.moe.experts_per_layer(self.model.num_layers)

    def accumulation_steps(self, world_size: int) -> int:
        """Micro-batches per optimizer step on each data-parallel rank (pipeline schedules run exactly these).

        Given by the global batch, or directly by --num-microbatches (DeepSpeed gradient_accumulation_steps);
        with neither, 1.
        """
        dp = self.parallel.parallel_sizes(world_size)["dp"]
        micro = self.training.micro_batch_size
        global_batch = self.training.global_batch_size
        requested = self.parallel.num_microbatches
        if global_batch is None:
            return requested or 1
        check(global_batch % (micro * dp) == 0,
              f"--global-batch-size {global_batch} is not divisible by micro-batch-size {micro} x data-parallel "
              f"size {dp}; use a multiple of {micro * dp}")
        steps = global_batch // (micro * dp)
        check(requested is None or requested == steps,
              f"--global-batch-size {global_batch} != micro-batch-size {micro} x --num-microbatches "
              f"(gradient_accumulation_steps) {requested} x data-parallel size {dp}; "
              f"drop one of them or make them agree")
        return steps

    def global_batch(self, world_size: int) -> int:
        """Sequences per optimizer step over all data-parallel ranks."""
        dp = self.parallel.parallel_sizes(world_size)["dp"]
        return self.training.micro_batch_size * dp * self.accumulation_steps(world_size)

    def validate(self, world_size: int = 1) -> None:
        """Raise ConfigError for the first inconsistent option, before any work is done; changes nothing."""
        validation.validate(self, world_size)

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, dict[str, Any]]) -> Config:
        """Inverse of to_dict; missing keys take defaults, unknown ones are an error rather than dropped."""
        known = {name: {f.name for f in dataclasses.fields(section)} for name, section in SECTIONS.items()}
        unknown = [name for name in data if name not in known]
        unknown += [f"{name}.{key}" for name, values in data.items() if name in known
                    for key in values if key not in known[name]]
        check(not unknown, f"unknown config keys {', '.join(unknown)}; was this saved by a newer moetrain?")
        data = copy.deepcopy(data)
        return cls(**{name: section(**data.get(name, {})) for name, section in SECTIONS.items()})


def config_summary(cfg: Config) -> str:
    """Every option of a validated config, one line per section, for the start of a run's log."""
    lines = [f"{name}: " + ", ".join(f"{key}={value}" for key, value in values.items())
             for name, values in cfg.to_dict().items()]
    lines.append(f"derived: ffn_size={cfg.model.ffn_size()}, expert_ffn_size={cfg.moe.expert_ffn_size(cfg.model)}, "
                 f"experts_per_layer={cfg.experts_per_layer()}, lr_warmup_iters={cfg.training.warmup_iters()}")
    return "\n".join(lines)
