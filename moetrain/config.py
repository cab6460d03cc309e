"""Every option of `moetrain train` as typed dataclasses, filled from Megatron-style flags and DeepSpeed JSON.

Precedence: dataclass defaults < the DeepSpeed JSON (``--deepspeed_config``) < flags given on the command
line. Flags have no argparse default, so the parsed namespace holds exactly the flags that were given;
each flag's ``dest`` is the ``"section.field"`` it sets.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

from moetrain.data import DataError
from moetrain.data.loader import parse_split
from moetrain.data.tokenizer import TOKENIZER_KINDS, check_tokenizer_files, resolve_tokenizer_kind, tokenizer_kind

MODEL_STYLES = ("gpt", "llama")
MLP_TYPES = ("standard", "residual")
SCORE_FUNCS = ("softmax", "sigmoid")
DROP_POLICIES = (None, "position", "probs", "random", "unordered")
NOISY_GATE_POLICIES = (None, "Jitter", "RSample")
TOKENIZER_TYPES = TOKENIZER_KINDS
LR_DECAY_STYLES = ("cosine", "linear", "constant")
PRECISIONS = ("fp32", "fp16", "bf16")
DEVICES = ("auto", "cpu", "cuda")
DISTRIBUTED_BACKENDS = (None, "nccl", "gloo")
PIPELINE_SCHEDULES = ("1f1b", "gpipe")
ZERO_STAGES = (0, 1, 2, 3)


class ConfigError(ValueError):
    """An inconsistent or unusable option; the message is one line that names the fix."""


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def _check_at_least(flag: str, value: float, minimum: float) -> None:
    _check(value >= minimum, f"{flag} must be at least {minimum}, got {value}")


def _check_positive(flag: str, value: float) -> None:
    _check(value > 0, f"{flag} must be positive, got {value}")


def _check_choice(flag: str, value: Any, choices: tuple[Any, ...]) -> None:
    _check(value in choices, f"{flag} {value!r} is not one of {', '.join(map(str, choices))}")


@dataclass
class ModelConfig:
    style: str = "gpt"
    num_layers: int = 4
    hidden_size: int = 256
    num_attention_heads: int = 8
    ffn_hidden_size: int | None = None
    seq_length: int = 256
    vocab_size: int = 0
    hidden_dropout: float = 0.0
    attention_dropout: float = 0.0
    init_method_std: float = 0.02
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = True

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
    num_experts: list[int] = field(default_factory=lambda: [8])
    expert_interval: int = 2
    topk: int = 1
    mlp_type: str = "standard"
    train_capacity_factor: float = 1.0
    eval_capacity_factor: float = 1.0
    min_capacity: int = 4
    drop_tokens: bool = True
    use_rts: bool = True
    noisy_gate_policy: str | None = None
    top2_2nd_expert_sampling: bool = True
    aux_loss_coeff: float = 0.01
    z_loss_coeff: float = 0.0
    score_func: str = "softmax"
    drop_policy: str | None = None
    expert_bias: bool = False
    expert_bias_update_rate: float = 1e-3
    num_shared_experts: int = 0
    expert_ffn_hidden_size: int | None = None

    @property
    def is_moe(self) -> bool:
        """Megatron-DeepSpeed treats a layer with 0 or 1 experts as a dense MLP."""
        return any(count > 1 for count in self.num_experts)

    def experts_per_layer(self, num_layers: int) -> list[int]:
        """Expert count of every layer, 0 for dense ones.

        MoE layers are the 0-based layers interval-1, 2*interval-1, ... as in Megatron-DeepSpeed; one
        count applies to all of them, a list (pyramid) gives one count per MoE layer in order.
        """
        _check_at_least("--expert-interval", self.expert_interval, 1)
        moe_layers = range(self.expert_interval - 1, num_layers, self.expert_interval)
        counts = self.num_experts * len(moe_layers) if len(self.num_experts) == 1 else self.num_experts
        _check(len(counts) == len(moe_layers),
               f"--num-experts lists {len(self.num_experts)} counts but --num-layers {num_layers} with "
               f"--expert-interval {self.expert_interval} has {len(moe_layers)} MoE layers; "
               f"give 1 count or {len(moe_layers)}")
        per_layer = [0] * num_layers
        for layer, count in zip(moe_layers, counts, strict=True):
            per_layer[layer] = count if count > 1 else 0
        return per_layer

    def num_moe_layers(self, num_layers: int) -> int:
        """Layers that hold experts (a pyramid entry of 0 or 1 leaves its layer dense)."""
        return sum(1 for count in self.experts_per_layer(num_layers) if count)

    def expert_ffn_size(self, model: ModelConfig) -> int:
        return self.expert_ffn_hidden_size if self.expert_ffn_hidden_size is not None else model.ffn_size()


@dataclass
class DataConfig:
    data_path: list[str] | None = None
    tokenizer_type: str | None = None  # None: gpt2 with --vocab-file and --merge-file, else bpe (as Megatron)
    vocab_file: str | None = None
    merge_file: str | None = None
    vocab_size: int = 4096
    split: str = "98,2,0"
    cache_dir: str | None = None
    tokenizer_model: str | None = None
    train_data_path: list[str] | None = None
    valid_data_path: list[str] | None = None
    json_keys: str = "text"


@dataclass
class TrainingConfig:
    micro_batch_size: int | None = 8  # None: derived from the global batch (DeepSpeed train_batch_size alone)
    global_batch_size: int | None = None
    train_iters: int = 400
    lr: float = 1e-3
    min_lr: float = 1e-4
    lr_decay_style: str = "cosine"
    lr_warmup_iters: int = 50
    lr_decay_iters: int | None = None
    weight_decay: float = 0.1
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    clip_grad: float = 1.0
    seed: int = 1234
    precision: str = "fp32"
    loss_scale: float = 0.0
    initial_scale_power: int = 16
    loss_scale_window: int = 1000
    hysteresis: int = 2
    consecutive_hysteresis: bool = False
    min_loss_scale: float = 1.0
    eval_interval: int = 100
    eval_iters: int = 10
    log_interval: int = 10
    save: str | None = "runs/default"
    load: str | None = None
    save_interval: int = 0
    keep_last_checkpoints: int | None = 3
    tensorboard_dir: str | None = None
    device: str = "auto"
    progress_bar: bool = True


@dataclass
class ParallelConfig:
    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    expert_parallel_size: int | None = None
    num_microbatches: int | None = None
    zero_stage: int = 0
    pipeline_schedule: str = "1f1b"
    offload_optimizer: bool = False
    distributed_backend: str | None = None

    def parallel_sizes(self, world_size: int) -> dict[str, int]:
        """Split world_size into data/tensor/pipeline parallel sizes, and expert parallelism.

        Experts spread over the data-parallel ranks as in DeepSpeed, so an explicit EP size must divide
        dp; without one, experts are sharded over the tensor-parallel group (ep = tp).
        """
        tp, pp = self.tensor_parallel_size, self.pipeline_parallel_size
        _check_at_least("--tensor-parallel-size", tp, 1)
        _check_at_least("--pipeline-parallel-size", pp, 1)
        _check(world_size % (tp * pp) == 0,
               f"world size {world_size} is not divisible by tensor-parallel-size {tp} x pipeline-parallel-size "
               f"{pp}; launch a multiple of {tp * pp} processes or lower the parallel sizes")
        dp = world_size // (tp * pp)
        if self.expert_parallel_size is None:
            return {"dp": dp, "tp": tp, "pp": pp, "ep": tp}
        ep = self.expert_parallel_size
        _check_at_least("--expert-parallel-size", ep, 1)
        _check(dp % ep == 0, f"--expert-parallel-size {ep} does not divide the data-parallel size {dp} "
                             f"(world {world_size} / (tp {tp} x pp {pp})); use a divisor of {dp}")
        return {"dp": dp, "tp": tp, "pp": pp, "ep": ep}


@dataclass
class DistillConfig:
    """Knowledge distillation (Megatron-DeepSpeed's Mixture-of-Students flags).

    The teacher's architecture comes from its checkpoint; the *_teacher fields, when given, are only checked
    against it. Loss = alpha_ce * LM loss + beta_ce * T^2 KL(teacher || student) + MoE losses.
    """
    enabled: bool = False
    load_teacher: str | None = None
    num_layers_teacher: int | None = None
    hidden_size_teacher: int | None = None
    num_attention_heads_teacher: int | None = None
    num_experts_teacher: list[int] | None = None
    temperature: float = 1.0
    alpha_ce: float = 1.0
    beta_ce: float = 1.0
    stop_iter: int | None = None
    student_init_from_teacher: bool = False


_SECTIONS: dict[str, type] = {
    "model": ModelConfig,
    "moe": MoEConfig,
    "data": DataConfig,
    "training": TrainingConfig,
    "parallel": ParallelConfig,
    "distill": DistillConfig,
}


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    moe: MoEConfig = field(default_factory=MoEConfig)
    data: DataConfig = field(default_factory=DataConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)

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
        _check(global_batch % (micro * dp) == 0,
               f"--global-batch-size {global_batch} is not divisible by micro-batch-size {micro} x data-parallel "
               f"size {dp}; use a multiple of {micro * dp}")
        steps = global_batch // (micro * dp)
        _check(requested is None or requested == steps,
               f"--global-batch-size {global_batch} != micro-batch-size {micro} x --num-microbatches "
               f"(gradient_accumulation_steps) {requested} x data-parallel size {dp}; "
               f"drop one of them or make them agree")
        return steps

    def global_batch(self, world_size: int) -> int:
        """Sequences per optimizer step over all data-parallel ranks."""
        dp = self.parallel.parallel_sizes(world_size)["dp"]
        return self.training.micro_batch_size * dp * self.accumulation_steps(world_size)

    def validate(self, world_size: int = 1) -> None:
        """Raise ConfigError for the first inconsistent option, before any work is done; a micro-batch size left
        to be derived is settled here, where the data-parallel size is known."""
        _validate_model(self.model)
        _validate_moe(self.moe, self.model)
        _validate_data(self.data)
        self._derive_micro_batch(world_size)
        _validate_training(self.training)
        self._validate_parallel(world_size)
        _validate_distill(self.distill)

    def _derive_micro_batch(self, world_size: int) -> None:
        """DeepSpeed's rule for train_batch_size without train_micro_batch_size_per_gpu: the global batch split
        over the data-parallel ranks and gradient_accumulation_steps (1 if unset)."""
        training = self.training
        if training.micro_batch_size is not None:
            return
        total = training.global_batch_size
        _check(total is not None, "--micro-batch-size is unset; give it, or DeepSpeed's train_batch_size")
        dp, steps = self.parallel.parallel_sizes(world_size)["dp"], self.parallel.num_microbatches or 1
        _check(steps >= 1 and total % (steps * dp) == 0,
               f"train_batch_size {total} is not divisible by gradient_accumulation_steps {steps} x data-parallel "
               f"size {dp}; set train_micro_batch_size_per_gpu or a train_batch_size that divides")
        training.micro_batch_size = total // (steps * dp)

    def _validate_parallel(self, world_size: int) -> None:
        parallel = self.parallel
        _check_choice("--zero-stage", parallel.zero_stage, ZERO_STAGES)
        _check(not parallel.offload_optimizer or parallel.zero_stage >= 1,
               "optimizer offload needs ZeRO stage 1 or higher; set --zero-stage or drop offload_optimizer")
        _check_choice("--distributed-backend", parallel.distributed_backend, DISTRIBUTED_BACKENDS)
        _check(parallel.zero_stage < 3, "ZeRO stage 3 (sharded parameters) is not implemented; use --zero-stage 1 "
                                        "or 2 (optimizer state, and gradients, sharded)")
        _check_choice("--pipeline-schedule", parallel.pipeline_schedule, PIPELINE_SCHEDULES)
        if parallel.num_microbatches is not None:
            _check_at_least("--num-microbatches", parallel.num_microbatches, 1)
        sizes = parallel.parallel_sizes(world_size)
        _check(self.model.num_attention_heads % sizes["tp"] == 0,
               f"--num-attention-heads {self.model.num_attention_heads} is not divisible by "
               f"--tensor-parallel-size {sizes['tp']}; use a head count that is a multiple of it")
        _check(sizes["pp"] <= self.model.num_layers,
               f"--pipeline-parallel-size {sizes['pp']} exceeds --num-layers {self.model.num_layers}; "
               f"use at most one stage per layer")
        _check(not (self.distill.enabled and sizes["pp"] > 1),
               "distillation (--mos / --kd) does not run under pipeline parallelism (the student's logits live on "
               "the last stage only); use data, expert or tensor parallelism for it")
        if sizes["pp"] > 1:
            steps = self.accumulation_steps(world_size)
            _check(parallel.pipeline_schedule != "1f1b" or steps >= sizes["pp"],
                   f"the 1F1B pipeline schedule needs at least as many micro-batches ({steps}) as stages "
                   f"({sizes['pp']}); raise --num-microbatches / --global-batch-size or use --pipeline-schedule gpipe")
        # a layer whose expert count the EP size does not divide runs on gcd(count, ep) ranks (Pyramid-MoE)
        self.accumulation_steps(world_size)

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, dict[str, Any]]) -> Config:
        """Inverse of to_dict; missing keys take defaults, unknown ones are an error rather than dropped."""
        known = {name: {f.name for f in dataclasses.fields(section)} for name, section in _SECTIONS.items()}
        unknown = [name for name in data if name not in known]
        unknown += [f"{name}.{key}" for name, values in data.items() if name in known
                    for key in values if key not in known[name]]
        _check(not unknown, f"unknown config keys {', '.join(unknown)}; was this saved by a newer moetrain?")
        data = copy.deepcopy(data)
        return cls(**{name: section(**data.get(name, {})) for name, section in _SECTIONS.items()})


def _validate_model(model: ModelConfig) -> None:
    _check_choice("--model-style", model.style, MODEL_STYLES)
    for flag, value in (("--num-layers", model.num_layers), ("--hidden-size", model.hidden_size),
                        ("--num-attention-heads", model.num_attention_heads), ("--seq-length", model.seq_length)):
        _check_at_least(flag, value, 1)
    if model.ffn_hidden_size is not None:
        _check_at_least("--ffn-hidden-size", model.ffn_hidden_size, 1)
    _check(model.hidden_size % model.num_attention_heads == 0,
           f"--hidden-size {model.hidden_size} is not divisible by --num-attention-heads "
           f"{model.num_attention_heads}; pick a head count that divides it")
    head_dim = model.hidden_size // model.num_attention_heads
    _check(model.style != "llama" or head_dim % 2 == 0,
           f"llama style needs an even head dimension for RoPE, got {head_dim}; change --hidden-size or heads")
    for flag, value in (("--hidden-dropout", model.hidden_dropout),
                        ("--attention-dropout", model.attention_dropout)):
        _check(0.0 <= value < 1.0, f"{flag} must be in [0, 1), got {value}")
    for flag, value in (("--init-method-std", model.init_method_std), ("--rope-theta", model.rope_theta),
                        ("--norm-epsilon", model.norm_eps)):
        _check_positive(flag, value)


def _validate_moe(moe: MoEConfig, model: ModelConfig) -> None:
    _check(len(moe.num_experts) >= 1 and min(moe.num_experts) >= 0,
           f"--num-experts needs one or more non-negative counts, got {moe.num_experts}")
    experts_per_layer = moe.experts_per_layer(model.num_layers)
    _check(not moe.is_moe or any(experts_per_layer),
           f"--expert-interval {moe.expert_interval} with --num-layers {model.num_layers} places no MoE layer; "
           f"use an interval of at most {model.num_layers}, or --num-experts 1 for a dense model")
    _check_at_least("--topk", moe.topk, 1)
    for layer, count in enumerate(experts_per_layer):
        _check(count == 0 or moe.topk <= count,
               f"--topk {moe.topk} exceeds the {count} experts of layer {layer}; lower --topk or add experts")
    _check_choice("--mlp-type", moe.mlp_type, MLP_TYPES)
    _check_choice("--moe-score-func", moe.score_func, SCORE_FUNCS)
    _check_choice("--moe-drop-policy", moe.drop_policy, DROP_POLICIES)
    _check_choice("--noisy-gate-policy", moe.noisy_gate_policy, NOISY_GATE_POLICIES)
    _check_positive("--moe-train-capacity-factor", moe.train_capacity_factor)
    _check_positive("--moe-eval-capacity-factor", moe.eval_capacity_factor)
    for flag, value in (("--moe-min-capacity", moe.min_capacity), ("--moe-loss-coeff", moe.aux_loss_coeff),
                        ("--router-z-loss-coef", moe.z_loss_coeff),
                        ("--moe-expert-bias-update-rate", moe.expert_bias_update_rate),
                        ("--num-shared-experts", moe.num_shared_experts)):
        _check_at_least(flag, value, 0)
    if moe.expert_ffn_hidden_size is not None:
        _check_at_least("--moe-ffn-hidden-size", moe.expert_ffn_hidden_size, 1)


def _validate_data(data: DataConfig) -> None:
    _check_choice("--tokenizer-type", data.tokenizer_type, (None, *TOKENIZER_TYPES))
    _check_at_least("--vocab-size", data.vocab_size, 1)
    try:
        parse_split(data.split)  # the loader's own reading, so validation and loading never disagree
        check_tokenizer_files(resolve_tokenizer_kind(data.tokenizer_type, data.vocab_file, data.merge_file),
                              data.vocab_file, data.merge_file, data.tokenizer_model)
    except DataError as error:
        raise ConfigError(str(error)) from None


def _validate_training(training: TrainingConfig) -> None:
    _check_at_least("--micro-batch-size", training.micro_batch_size, 1)
    if training.global_batch_size is not None:
        _check_at_least("--global-batch-size", training.global_batch_size, 1)
    _check_at_least("--train-iters", training.train_iters, 1)
    _check_positive("--lr", training.lr)
    _check_at_least("--min-lr", training.min_lr, 0)
    _check_choice("--lr-decay-style", training.lr_decay_style, LR_DECAY_STYLES)
    _check_at_least("--lr-warmup-iters", training.lr_warmup_iters, 0)
    _check(training.lr_warmup_iters <= training.train_iters,
           f"--lr-warmup-iters {training.lr_warmup_iters} exceeds --train-iters {training.train_iters}; "
           f"shorten the warmup or train longer")
    if training.lr_decay_style != "constant":
        _check(training.min_lr <= training.lr,
               f"--min-lr {training.min_lr} exceeds --lr {training.lr}; lower --min-lr")
        decay_iters = training.lr_decay_iters or training.train_iters
        _check(decay_iters > training.lr_warmup_iters,
               f"LR decay ends at iteration {decay_iters}, not after the {training.lr_warmup_iters} warmup "
               f"iterations; raise --lr-decay-iters / --train-iters or use --lr-decay-style constant")
    _check_at_least("--weight-decay", training.weight_decay, 0)
    for flag, beta in (("--adam-beta1", training.adam_beta1), ("--adam-beta2", training.adam_beta2)):
        _check(0.0 <= beta < 1.0, f"{flag} must be in [0, 1), got {beta}")
    _check_positive("--adam-eps", training.adam_eps)
    _check_at_least("--clip-grad", training.clip_grad, 0)
    _check_choice("precision", training.precision, PRECISIONS)
    _check_at_least("--loss-scale", training.loss_scale, 0)
    _check_at_least("--initial-scale-power", training.initial_scale_power, 0)
    _check_at_least("--loss-scale-window", training.loss_scale_window, 1)
    _check_at_least("--hysteresis", training.hysteresis, 1)
    _check_positive("--min-loss-scale", training.min_loss_scale)
    for flag, value in (("--eval-interval", training.eval_interval), ("--eval-iters", training.eval_iters),
                        ("--save-interval", training.save_interval)):
        _check_at_least(flag, value, 0)
    _check_at_least("--log-interval", training.log_interval, 1)
    if training.keep_last_checkpoints is not None:
        _check_at_least("--keep-last-checkpoints", training.keep_last_checkpoints, 1)
    _check_choice("--device", training.device, DEVICES)


def _validate_distill(distill: DistillConfig) -> None:
    if not distill.enabled:
        for flag, value in (("--load-teacher", distill.load_teacher), ("--kd-stop-iter", distill.stop_iter),
                            ("--student-init-from-teacher", distill.student_init_from_teacher or None)):
            _check(value is None, f"{flag} is given without --mos or --kd; add one of them or drop {flag}")
        return
    _check(distill.load_teacher is not None, "--mos/--kd needs --load-teacher DIR, the teacher's checkpoint")
    _check_positive("--kd-temp", distill.temperature)
    _check_at_least("--kd-alpha-ce", distill.alpha_ce, 0)
    _check_at_least("--kd-beta-ce", distill.beta_ce, 0)
    if distill.stop_iter is not None:
        _check_at_least("--kd-stop-iter", distill.stop_iter, 0)
    for flag, value in (("--num-layers-teacher", distill.num_layers_teacher),
                        ("--hidden-size-teacher", distill.hidden_size_teacher),
                        ("--num-attention-heads-teacher", distill.num_attention_heads_teacher)):
        if value is not None:
            _check_at_least(flag, value, 1)
    if distill.num_experts_teacher is not None:
        _check(len(distill.num_experts_teacher) >= 1 and min(distill.num_experts_teacher) >= 0,
               f"--num-experts-teacher needs one or more non-negative counts, got {distill.num_experts_teacher}")


# ----------------------------------------------------------------------------------------------------------
# Command line

_GIVEN_FLAGS = "_moetrain_given_flags"


class _GivenFlag(NamedTuple):
    flag: str
    shown: str  # the flag with its value, for messages


class _FieldAction(argparse.Action):
    """Store a flag's value at its "section.field" dest and remember which flag set it.

    Two different spellings of one field with different values (``--seq-length 1024
    --max-position-embeddings 2048``, ``--fp16 --bf16``) are an error instead of last-one-wins.
    """

    def __init__(self, option_strings: list[str], dest: str,
                 convert: Callable[[Any], Any] | None = None, **kwargs: Any):
        super().__init__(option_strings, dest, **kwargs)
        self.convert = convert

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                 values: Any, option_string: str | None = None) -> None:
        value = self.const if self.nargs == 0 else values
        if self.convert is not None:
            try:
                value = self.convert(value)
            except ValueError as error:
                raise argparse.ArgumentError(self, str(error)) from None
        flag = option_string or self.dest
        shown = flag if self.nargs == 0 else f"{flag} {' '.join(map(str, value)) if isinstance(value, list) else value}"
        given: dict[str, _GivenFlag] = getattr(namespace, _GIVEN_FLAGS, {})
        previous = given.get(self.dest)
        if previous is not None and previous.flag != flag and getattr(namespace, self.dest) != value:
            raise ConfigError(f"{previous.shown} and {shown} both set {self.dest}; pass only one")
        setattr(namespace, self.dest, value)
        given[self.dest] = _GivenFlag(flag, shown)
        setattr(namespace, _GIVEN_FLAGS, given)


def _field_default(dest: str) -> Any:
    section, name = dest.split(".")
    spec = next(f for f in dataclasses.fields(_SECTIONS[section]) if f.name == name)
    return spec.default_factory() if spec.default is dataclasses.MISSING else spec.default


def _add_field_flag(group: argparse._ArgumentGroup, *flags: str, dest: str, help: str, **kwargs: Any) -> None:
    """Add a flag for Config field ``dest`` ("section.field"); it appears in the namespace only when given."""
    if kwargs.get("nargs") != 0:
        default = _field_default(dest)
        if default is not None:
            help = f"{help} (default: {default})"
        if "choices" not in kwargs:
            kwargs.setdefault("metavar", dest.split(".")[1].upper())
    group.add_argument(*flags, dest=dest, action=_FieldAction, default=argparse.SUPPRESS, help=help, **kwargs)


def _add_switch(group: argparse._ArgumentGroup, flag: str, *, dest: str, value: Any, help: str) -> None:
    _add_field_flag(group, flag, dest=dest, nargs=0, const=value, help=help)


def _none_or_str(text: str) -> str | None:
    return None if text in ("None", "none") else text


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


def add_model_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("model")
    _add_field_flag(group, "--model-style", dest="model.style", choices=MODEL_STYLES,
                    help="gpt: learned positions, LayerNorm, GELU, biases; llama: RoPE, RMSNorm, SwiGLU, no biases")
    _add_field_flag(group, "--num-layers", dest="model.num_layers", type=int, help="transformer layers")
    _add_field_flag(group, "--hidden-size", dest="model.hidden_size", type=int, help="model width")
    _add_field_flag(group, "--num-attention-heads", dest="model.num_attention_heads", type=int,
                    help="attention heads")
    _add_field_flag(group, "--ffn-hidden-size", dest="model.ffn_hidden_size", type=int,
                    help="dense FFN width; unset: 4*hidden (gpt) or 8/3*hidden rounded up to 64 (llama)")
    _add_field_flag(group, "--seq-length", "--max-position-embeddings", dest="model.seq_length", type=int,
                    help="tokens per sequence, also the position-embedding table size")
    _add_field_flag(group, "--hidden-dropout", dest="model.hidden_dropout", type=float,
                    help="dropout after attention and FFN")
    _add_field_flag(group, "--attention-dropout", dest="model.attention_dropout", type=float,
                    help="dropout on attention probabilities")
    _add_field_flag(group, "--init-method-std", dest="model.init_method_std", type=float,
                    help="std of the normal weight init")
    _add_field_flag(group, "--rope-theta", dest="model.rope_theta", type=float, help="RoPE base (llama style)")
    _add_field_flag(group, "--norm-epsilon", "--layernorm-epsilon", dest="model.norm_eps", type=float,
                    help="LayerNorm / RMSNorm epsilon")
    _add_switch(group, "--untie-embeddings-and-output-weights", dest="model.tie_embeddings", value=False,
                help="give the output layer its own weights instead of the input embedding's")


def add_moe_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("mixture of experts")
    _add_field_flag(group, "--num-experts", dest="moe.num_experts", nargs="+", type=_expert_counts_token,
                    convert=_flatten_expert_counts, metavar="N",
                    help="experts per MoE layer: one count, or one per MoE layer ('8 8 16 16' or "
                         "'[8, 8, 16, 16]'); 0 or 1 means a dense layer")
    _add_field_flag(group, "--expert-interval", "--moe-layer-interval", dest="moe.expert_interval", type=int,
                    help="MoE in every N-th layer (0-based layers N-1, 2N-1, ...)")
    _add_field_flag(group, "--topk", "--num-experts-per-token", "--moe-top-k", dest="moe.topk", type=int,
                    help="experts each token is routed to")
    _add_field_flag(group, "--mlp-type", dest="moe.mlp_type", choices=MLP_TYPES,
                    help="residual: PR-MoE, a dense MLP mixed with the MoE output by a learned coefficient")
    _add_field_flag(group, "--moe-train-capacity-factor", dest="moe.train_capacity_factor", type=float,
                    help="expert capacity = ceil(tokens / experts * factor) in training")
    _add_field_flag(group, "--moe-eval-capacity-factor", dest="moe.eval_capacity_factor", type=float,
                    help="capacity factor in evaluation")
    _add_field_flag(group, "--moe-min-capacity", dest="moe.min_capacity", type=int,
                    help="lower bound on expert capacity")
    _add_switch(group, "--disable-moe-token-dropping", dest="moe.drop_tokens", value=False,
                help="raise capacity to the busiest expert's load so no token is dropped")
    _add_switch(group, "--disable-moe-rts", dest="moe.use_rts", value=False,
                help="keep the first tokens over capacity instead of a random selection")
    _add_field_flag(group, "--noisy-gate-policy", dest="moe.noisy_gate_policy", type=_none_or_str,
                    choices=NOISY_GATE_POLICIES, help="gate noise in training")
    _add_switch(group, "--disable-moe-top2-2nd-expert-sampling", dest="moe.top2_2nd_expert_sampling", value=False,
                help="pick top-2's second expert by argmax instead of sampling with Gumbel noise")
    _add_field_flag(group, "--moe-loss-coeff", "--router-aux-loss-coef", dest="moe.aux_loss_coeff", type=float,
                    help="weight of the load-balancing loss")
    _add_field_flag(group, "--router-z-loss-coef", "--moe-z-loss-coeff", dest="moe.z_loss_coeff", type=float,
                    help="weight of the router z-loss")
    _add_field_flag(group, "--moe-score-func", dest="moe.score_func", choices=SCORE_FUNCS,
                    help="router scores from the gate logits")
    _add_field_flag(group, "--moe-drop-policy", dest="moe.drop_policy", type=_none_or_str, choices=DROP_POLICIES,
                    help="which tokens an expert over capacity keeps; None: DeepSpeed's choice for the top-k")
    _add_switch(group, "--moe-expert-bias", dest="moe.expert_bias", value=True,
                help="aux-loss-free balancing: a per-expert selection bias nudged towards even load")
    _add_field_flag(group, "--moe-expert-bias-update-rate", dest="moe.expert_bias_update_rate", type=float,
                    help="step size of the expert-bias update")
    _add_field_flag(group, "--num-shared-experts", dest="moe.num_shared_experts", type=int,
                    help="always-active experts beside the routed ones")
    _add_field_flag(group, "--moe-ffn-hidden-size", dest="moe.expert_ffn_hidden_size", type=int,
                    help="expert FFN width; unset: the model's FFN width")


def add_data_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("data")
    _add_field_flag(group, "--data-path", dest="data.data_path", nargs="+",
                    help="prepared prefixes (moetrain's or Megatron's), text/JSONL/Parquet/Arrow files or saved "
                         "datasets, or a blend 'W1 PREFIX1 W2 PREFIX2 ...'; unset: the built-in corpus")
    _add_field_flag(group, "--train-data-path", dest="data.train_data_path", nargs="+",
                    help="training data used whole (paths or a weighted blend), instead of --data-path and --split")
    _add_field_flag(group, "--valid-data-path", dest="data.valid_data_path", nargs="+",
                    help="validation data used whole, with --train-data-path")
    _add_field_flag(group, "--json-keys", dest="data.json_keys",
                    help="the JSONL field or Parquet/Arrow column holding the text of raw inputs")
    group.add_argument("--data-impl", type=_data_impl, dest="data_impl", metavar="mmap",
                       help="accepted for Megatron launch scripts; data is always memory-mapped")
    _add_field_flag(group, "--tokenizer-type", dest="data.tokenizer_type", type=_tokenizer_type,
                    choices=TOKENIZER_TYPES,
                    help="bpe: trained on the corpus; gpt2 (GPT2BPETokenizer): --vocab-file/--merge-file; byte: raw "
                         "bytes; json: a tokenizers JSON file as --vocab-file (e.g. a checkpoint's tokenizer.json); "
                         "hf (HuggingFaceTokenizer) or sentencepiece (SentencePieceTokenizer): --tokenizer-model. "
                         "Unset: gpt2 when --vocab-file and --merge-file are given, else bpe")
    _add_field_flag(group, "--tokenizer-model", dest="data.tokenizer_model",
                    help="a directory with tokenizer.json (HuggingFaceTokenizer) or a .model file "
                         "(SentencePieceTokenizer)")
    _add_field_flag(group, "--vocab-file", dest="data.vocab_file", help="GPT-2 vocab.json, or the tokenizers JSON")
    _add_field_flag(group, "--merge-file", dest="data.merge_file", help="GPT-2 merges.txt")
    _add_field_flag(group, "--vocab-size", dest="data.vocab_size", type=int,
                    help="vocabulary size of a BPE trained on the corpus")
    _add_field_flag(group, "--split", dest="data.split", help="train,valid,test weights")
    _add_field_flag(group, "--data-cache-dir", dest="data.cache_dir", help="where tokenized data is cached")


def add_training_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("training")
    _add_field_flag(group, "--micro-batch-size", dest="training.micro_batch_size", type=int,
                    help="sequences per forward pass on each data-parallel rank")
    _add_field_flag(group, "--global-batch-size", dest="training.global_batch_size", type=int,
                    help="sequences per optimizer step over all ranks; a multiple of micro-batch x data-parallel "
                         "size, the quotient being gradient accumulation steps; unset: no accumulation")
    _add_field_flag(group, "--train-iters", "--max-steps", dest="training.train_iters", type=int,
                    help="optimizer steps")
    _add_field_flag(group, "--lr", dest="training.lr", type=float, help="peak learning rate")
    _add_field_flag(group, "--min-lr", dest="training.min_lr", type=float, help="learning rate at the end of decay")
    _add_field_flag(group, "--lr-decay-style", dest="training.lr_decay_style", choices=LR_DECAY_STYLES,
                    help="shape of the decay after warmup")
    _add_field_flag(group, "--lr-warmup-iters", dest="training.lr_warmup_iters", type=int,
                    help="linear warmup steps from 0")
    _add_field_flag(group, "--lr-decay-iters", dest="training.lr_decay_iters", type=int,
                    help="step at which the decay reaches --min-lr; unset: --train-iters")
    _add_field_flag(group, "--weight-decay", dest="training.weight_decay", type=float, help="AdamW weight decay")
    _add_field_flag(group, "--adam-beta1", dest="training.adam_beta1", type=float, help="AdamW beta1")
    _add_field_flag(group, "--adam-beta2", dest="training.adam_beta2", type=float, help="AdamW beta2")
    _add_field_flag(group, "--adam-eps", dest="training.adam_eps", type=float, help="AdamW epsilon")
    _add_field_flag(group, "--clip-grad", dest="training.clip_grad", type=float,
                    help="gradient-norm clipping threshold; 0 disables")
    _add_field_flag(group, "--seed", dest="training.seed", type=int, help="random seed")
    _add_field_flag(group, "--device", dest="training.device", choices=DEVICES,
                    help="auto: cuda when available, else cpu")


def add_precision_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("mixed precision (DeepSpeed fp16 semantics)")
    _add_switch(group, "--fp16", dest="training.precision", value="fp16",
                help="fp16 autocast with loss scaling")
    _add_switch(group, "--bf16", dest="training.precision", value="bf16", help="bf16 autocast")
    _add_field_flag(group, "--loss-scale", dest="training.loss_scale", type=float,
                    help="static fp16 loss scale; 0: dynamic")
    _add_field_flag(group, "--initial-scale-power", dest="training.initial_scale_power", type=int,
                    help="dynamic loss scale starts at 2**power")
    _add_field_flag(group, "--loss-scale-window", dest="training.loss_scale_window", type=int,
                    help="overflow-free steps before the scale doubles")
    _add_field_flag(group, "--hysteresis", dest="training.hysteresis", type=int,
                    help="overflows tolerated before the scale halves")
    _add_field_flag(group, "--min-loss-scale", dest="training.min_loss_scale", type=float,
                    help="floor of the dynamic loss scale")


def add_logging_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("evaluation, logging and checkpoints")
    _add_field_flag(group, "--eval-interval", dest="training.eval_interval", type=int,
                    help="steps between evaluations; 0: only at the end")
    _add_field_flag(group, "--eval-iters", dest="training.eval_iters", type=int, help="batches per evaluation")
    _add_field_flag(group, "--log-interval", dest="training.log_interval", type=int,
                    help="steps between metrics records")
    _add_field_flag(group, "--save", dest="training.save", help="checkpoint and metrics directory")
    _add_switch(group, "--no-save", dest="training.save", value=None, help="write no checkpoints")
    _add_field_flag(group, "--load", dest="training.load", help="checkpoint directory to resume from")
    _add_field_flag(group, "--save-interval", dest="training.save_interval", type=int,
                    help="steps between checkpoints; 0: only at the end")
    _add_field_flag(group, "--keep-last-checkpoints", dest="training.keep_last_checkpoints", type=_keep_count,
                    help="checkpoints kept on disk; 0 keeps all")
    _add_field_flag(group, "--tensorboard-dir", dest="training.tensorboard_dir",
                    help="also write TensorBoard events here")
    _add_switch(group, "--no-progress-bar", dest="training.progress_bar", value=False,
                help="plain log lines instead of a progress bar")


def add_parallel_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("parallelism")
    _add_field_flag(group, "--tensor-parallel-size", "--tensor-model-parallel-size",
                    dest="parallel.tensor_parallel_size", type=int, help="tensor-parallel ranks")
    _add_field_flag(group, "--pipeline-parallel-size", "--pipeline-model-parallel-size",
                    dest="parallel.pipeline_parallel_size", type=int, help="pipeline stages")
    _add_field_flag(group, "--expert-parallel-size", "--moe-expert-parallel-size",
                    dest="parallel.expert_parallel_size", type=int,
                    help="ranks the experts of a layer are spread over, a divisor of the data-parallel size; "
                         "unset: the tensor-parallel size")
    _add_field_flag(group, "--num-microbatches", dest="parallel.num_microbatches", type=int,
                    help="micro-batches per optimizer step and rank (DeepSpeed gradient_accumulation_steps); "
                         "unset: from --global-batch-size")
    _add_field_flag(group, "--zero-stage", dest="parallel.zero_stage", type=int, choices=ZERO_STAGES,
                    help="ZeRO sharding: 1 optimizer state, 2 also gradients (3 is not implemented)")
    _add_field_flag(group, "--pipeline-schedule", dest="parallel.pipeline_schedule", choices=PIPELINE_SCHEDULES,
                    help="pipeline-parallel schedule over the micro-batches")
    _add_field_flag(group, "--distributed-backend", dest="parallel.distributed_backend", type=_none_or_str,
                    choices=DISTRIBUTED_BACKENDS, help="torch.distributed backend; None: nccl on cuda, else gloo")


def add_deepspeed_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("DeepSpeed compatibility")
    group.add_argument("--deepspeed_config", "--deepspeed-config", dest="deepspeed_config", metavar="PATH",
                       help="DeepSpeed JSON config; its settings apply unless a flag above overrides them")
    group.add_argument("--deepspeed", action="store_true", dest="deepspeed_flag",
                       help="accepted so Megatron-DeepSpeed launch scripts run unchanged; moetrain always "
                            "uses its own engine")


def add_distill_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("knowledge distillation (Mixture-of-Students)")
    for flag in ("--mos", "--kd"):
        _add_switch(group, flag, dest="distill.enabled", value=True,
                    help="distil from the --load-teacher model: add the KD loss to the student's losses")
    _add_field_flag(group, "--load-teacher", dest="distill.load_teacher",
                    help="teacher checkpoint directory; its architecture is read from it")
    _add_field_flag(group, "--num-layers-teacher", dest="distill.num_layers_teacher", type=int,
                    help="checked against the teacher checkpoint")
    _add_field_flag(group, "--hidden-size-teacher", dest="distill.hidden_size_teacher", type=int,
                    help="checked against the teacher checkpoint")
    _add_field_flag(group, "--num-attention-heads-teacher", dest="distill.num_attention_heads_teacher", type=int,
                    help="checked against the teacher checkpoint")
    _add_field_flag(group, "--num-experts-teacher", dest="distill.num_experts_teacher", nargs="+",
                    type=_expert_counts_token, convert=_flatten_expert_counts, metavar="N",
                    help="checked against the teacher checkpoint (one count or one per MoE layer)")
    _add_field_flag(group, "--kd-temp", dest="distill.temperature", type=float, help="softmax temperature T")
    _add_field_flag(group, "--kd-alpha-ce", dest="distill.alpha_ce", type=float, help="weight of the LM loss")
    _add_field_flag(group, "--kd-beta-ce", dest="distill.beta_ce", type=float,
                    help="weight of the distillation loss T^2 KL(teacher || student)")
    _add_field_flag(group, "--kd-stop-iter", dest="distill.stop_iter", type=int,
                    help="staged KD: after this many iterations train on the plain LM + MoE loss and free the "
                         "teacher")
    _add_switch(group, "--student-init-from-teacher", dest="distill.student_init_from_teacher", value=True,
                help="start the student from evenly spaced teacher layers (first and last kept); tensors whose "
                     "shapes differ keep their random init")


TRAIN_ARG_GROUPS: tuple[Callable[[argparse.ArgumentParser], None], ...] = (
    add_model_args, add_moe_args, add_data_args, add_training_args, add_precision_args, add_logging_args,
    add_parallel_args, add_deepspeed_args, add_distill_args,
)


def add_train_args(parser: argparse.ArgumentParser) -> None:
    """Add every `moetrain train` flag group, e.g. to a subcommand parser."""
    for add_group in TRAIN_ARG_GROUPS:
        add_group(parser)


def build_train_parser(prog: str = "moetrain train") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, allow_abbrev=False,
                                     description="Pre-train a Mixture-of-Experts GPT language model.")
    add_train_args(parser)
    return parser


def parse_train_args(argv: list[str] | None = None) -> Config:
    """Flags (and the DeepSpeed JSON they name) -> Config; call Config.validate once the world size is known."""
    return config_from_namespace(build_train_parser().parse_args(argv))


def config_from_namespace(namespace: argparse.Namespace) -> Config:
    """Merge defaults < DeepSpeed JSON < explicitly given flags, warning once per flag that overrides the JSON."""
    given: dict[str, _GivenFlag] = getattr(namespace, _GIVEN_FLAGS, {})
    explicit = {dest: getattr(namespace, dest) for dest in given}
    json_path = getattr(namespace, "deepspeed_config", None)
    from_json = _read_deepspeed_config(json_path) if json_path else {}

    min_lr = from_json.get("training.min_lr")
    if min_lr is not None and isinstance(min_lr.value, _FractionOfLr):
        lr = explicit.get("training.lr", from_json["training.lr"].value if "training.lr" in from_json
                          else TrainingConfig.lr)
        from_json["training.min_lr"] = min_lr._replace(value=min_lr.value.ratio * lr)

    for dest, value in explicit.items():
        setting = from_json.get(dest)
        if setting is not None and setting.value != value:
            warnings.warn(f"{given[dest].shown} overrides {setting.source} in {json_path}", stacklevel=2)

    merged = {dest: setting.value for dest, setting in from_json.items()} | explicit
    if "training.global_batch_size" in from_json:
        merged.setdefault("training.micro_batch_size", None)  # derived in Config.validate, as DeepSpeed does
    nested: dict[str, dict[str, Any]] = {}
    for dest, value in merged.items():
        section, name = dest.split(".")
        nested.setdefault(section, {})[name] = value
    return Config.from_dict(nested)


# ----------------------------------------------------------------------------------------------------------
# DeepSpeed JSON

class _JsonSetting(NamedTuple):
    value: Any
    source: str  # 'key.path = value', for messages


@dataclass(frozen=True)
class _FractionOfLr:
    """A min LR given relative to the peak LR, resolved once flags have settled the peak."""
    ratio: float


class _NotMappable(Exception):
    """A known key whose value moetrain cannot reproduce; reported with the unknown keys."""


_Mapper = Callable[[Any], dict[str, Any]]


def _json_int(raw: Any) -> int:
    if isinstance(raw, bool) or not isinstance(raw, int):
        raise ValueError("must be an integer")
    return raw


def _json_float(raw: Any) -> float:
    if isinstance(raw, bool) or not isinstance(raw, (int, float)):
        raise ValueError("must be a number")
    return float(raw)


def _json_bool(raw: Any) -> bool:
    if not isinstance(raw, bool):
        raise ValueError("must be true or false")
    return raw


def _json_expert_counts(raw: Any) -> list[int]:
    counts = raw if isinstance(raw, list) else [raw]
    if not counts or any(isinstance(count, bool) or not isinstance(count, int) for count in counts):
        raise ValueError("must be an integer or a list of integers")
    return counts


def _json_noisy_gate_policy(raw: Any) -> str | None:
    policy = None if raw in (None, "None") else raw
    if policy not in NOISY_GATE_POLICIES:
        raise ValueError("must be null, 'None', 'Jitter' or 'RSample'")
    return policy


def _to(dest: str, convert: Callable[[Any], Any]) -> _Mapper:
    return lambda raw: {dest: convert(raw)}


def _when_true(dest: str, value: Any) -> _Mapper:
    return lambda raw: {dest: value} if _json_bool(raw) else {}


def _zero_only(reason: str) -> _Mapper:
    def mapper(raw: Any) -> dict[str, Any]:
        if _json_float(raw) != 0:
            raise _NotMappable(reason)
        return {}
    return mapper


def _optimizer_type(raw: Any) -> dict[str, Any]:
    if not isinstance(raw, str) or raw.lower() not in ("adam", "adamw"):
        raise ValueError("must be Adam or AdamW (moetrain trains with AdamW)")
    return {}


def _betas(raw: Any) -> dict[str, Any]:
    if not isinstance(raw, list) or len(raw) != 2:
        raise ValueError("must be a list of two numbers")
    return {"training.adam_beta1": _json_float(raw[0]), "training.adam_beta2": _json_float(raw[1])}


_SCHEDULER_STYLES = {"WarmupLR": "constant", "WarmupDecayLR": "linear", "WarmupCosineLR": "cosine"}


def _scheduler_type(raw: Any) -> dict[str, Any]:
    if raw not in _SCHEDULER_STYLES:
        raise ValueError(f"must be one of {', '.join(_SCHEDULER_STYLES)}")
    return {"training.lr_decay_style": _SCHEDULER_STYLES[raw]}


def _warmup_type(raw: Any) -> dict[str, Any]:
    if raw == "log":
        raise _NotMappable("moetrain warms up linearly")
    if raw != "linear":
        raise ValueError("must be 'log' or 'linear'")
    return {}


def _offload_device(raw: Any) -> dict[str, Any]:
    if raw not in ("cpu", "none"):
        raise ValueError("must be 'cpu' or 'none' (moetrain cannot offload to NVMe)")
    return {"parallel.offload_optimizer": raw == "cpu"}


def _moe_enabled(raw: Any) -> dict[str, Any]:
    return {} if _json_bool(raw) else {"moe.num_experts": [1]}


# Applied in this order, so a later key wins: the scheduler's peak LR over the optimizer's (as in DeepSpeed),
# moe.enabled = false over moe.num_experts.
_DEEPSPEED_KEYS: dict[str, _Mapper] = {
    "train_batch_size": _to("training.global_batch_size", _json_int),
    "train_micro_batch_size_per_gpu": _to("training.micro_batch_size", _json_int),
    "gradient_accumulation_steps": _to("parallel.num_microbatches", _json_int),
    "gradient_clipping": _to("training.clip_grad", _json_float),
    "steps_per_print": _to("training.log_interval", _json_int),
    "fp16.enabled": _when_true("training.precision", "fp16"),
    "fp16.loss_scale": _to("training.loss_scale", _json_float),
    "fp16.initial_scale_power": _to("training.initial_scale_power", _json_int),
    "fp16.loss_scale_window": _to("training.loss_scale_window", _json_int),
    "fp16.hysteresis": _to("training.hysteresis", _json_int),
    "fp16.consecutive_hysteresis": _to("training.consecutive_hysteresis", _json_bool),
    "fp16.min_loss_scale": _to("training.min_loss_scale", _json_float),
    "bf16.enabled": _when_true("training.precision", "bf16"),
    "bfloat16.enabled": _when_true("training.precision", "bf16"),
    "optimizer.type": _optimizer_type,
    "optimizer.params.lr": _to("training.lr", _json_float),
    "optimizer.params.betas": _betas,
    "optimizer.params.eps": _to("training.adam_eps", _json_float),
    "optimizer.params.weight_decay": _to("training.weight_decay", _json_float),
    "scheduler.type": _scheduler_type,
    "zero_optimization.stage": _to("parallel.zero_stage", _json_int),
    "zero_optimization.offload_optimizer.device": _offload_device,
    "moe.num_experts": _to("moe.num_experts", _json_expert_counts),
    "moe.enabled": _moe_enabled,
    "moe.expert_parallel_size": _to("parallel.expert_parallel_size", _json_int),
    "moe.ep_size": _to("parallel.expert_parallel_size", _json_int),
    "moe.moe_loss_coeff": _to("moe.aux_loss_coeff", _json_float),
    "moe.train_capacity_factor": _to("moe.train_capacity_factor", _json_float),
    "moe.eval_capacity_factor": _to("moe.eval_capacity_factor", _json_float),
    "moe.min_capacity": _to("moe.min_capacity", _json_int),
    "moe.drop_tokens": _to("moe.drop_tokens", _json_bool),
    "moe.top_k": _to("moe.topk", _json_int),
    "moe.use_rts": _to("moe.use_rts", _json_bool),
    "moe.noisy_gate_policy": _to("moe.noisy_gate_policy", _json_noisy_gate_policy),
}

_WARMUP_PARAMS: dict[str, _Mapper] = {
    "warmup_num_steps": _to("training.lr_warmup_iters", _json_int),
    "warmup_type": _warmup_type,
}
_SCHEDULER_PARAMS: dict[str, dict[str, _Mapper]] = {
    "WarmupLR": {
        **_WARMUP_PARAMS,
        "warmup_max_lr": _to("training.lr", _json_float),
        "warmup_min_lr": _zero_only("moetrain's warmup starts from 0"),
    },
    "WarmupDecayLR": {
        **_WARMUP_PARAMS,
        "warmup_max_lr": _to("training.lr", _json_float),
        "warmup_min_lr": _to("training.min_lr", _json_float),
        "total_num_steps": _to("training.lr_decay_iters", _json_int),
    },
    "WarmupCosineLR": {
        **_WARMUP_PARAMS,
        "total_num_steps": _to("training.lr_decay_iters", _json_int),
        "warmup_min_ratio": _zero_only("moetrain's warmup starts from 0"),
        "cos_min_ratio": _to("training.min_lr", lambda raw: _FractionOfLr(_json_float(raw))),
    },
}

_MISSING = object()


def _lookup(root: dict[str, Any], key: str, json_path: str) -> Any:
    node: Any = root
    parts = key.split(".")
    for depth, part in enumerate(parts):
        if not isinstance(node, dict):
            raise ConfigError(f"{json_path}: {'.'.join(parts[:depth])} must be a JSON object")
        if part not in node:
            return _MISSING
        node = node[part]
    return node


def _unknown_keys(node: dict[str, Any], prefix: str, known: set[str]) -> list[str]:
    """Dotted paths in node that no mapper reads; a wholly unknown section is reported once, not per key."""
    unknown = []
    for key, value in node.items():
        path = prefix + key
        if path in known:
            continue
        if isinstance(value, dict) and any(name.startswith(path + ".") for name in known):
            unknown += _unknown_keys(value, path + ".", known)
        else:
            unknown.append(path)
    return unknown


def _read_deepspeed_config(json_path: str) -> dict[str, _JsonSetting]:
    """Map a DeepSpeed JSON onto Config fields; warn once about every key it cannot honour.

    A value of "auto" (Hugging Face style) keeps moetrain's own setting.
    """
    try:
        text = Path(json_path).read_text()
    except OSError as error:
        raise ConfigError(f"cannot read DeepSpeed config {json_path}: {error.strerror}; "
                          f"check --deepspeed_config") from None
    try:
        root = json.loads(text)
    except json.JSONDecodeError as error:
        raise ConfigError(f"DeepSpeed config {json_path} is not valid JSON ({error.msg} at line {error.lineno} "
                          f"column {error.colno}); fix the file") from None
    _check(isinstance(root, dict), f"DeepSpeed config {json_path} must hold a JSON object")

    mappers = dict(_DEEPSPEED_KEYS)
    scheduler_type = _lookup(root, "scheduler.type", json_path)
    for name, mapper in _SCHEDULER_PARAMS.get(scheduler_type if isinstance(scheduler_type, str) else "", {}).items():
        mappers[f"scheduler.params.{name}"] = mapper
    enabled = {name for name in ("fp16", "bf16", "bfloat16") if _lookup(root, f"{name}.enabled", json_path) is True}
    _check("fp16" not in enabled or len(enabled) == 1,
           f"{json_path} enables both fp16 and bf16; enable only one")

    settings: dict[str, _JsonSetting] = {}
    not_understood = _unknown_keys(root, "", set(mappers))
    for key, mapper in mappers.items():
        raw = _lookup(root, key, json_path)
        if raw is _MISSING or raw == "auto":
            continue
        try:
            values = mapper(raw)
        except _NotMappable as reason:
            not_understood.append(f"{key} ({reason})")
            continue
        except ValueError as error:
            raise ConfigError(f"{json_path}: {key} {error}, got {json.dumps(raw)}") from None
        for dest, value in values.items():
            settings[dest] = _JsonSetting(value, f"{key} = {json.dumps(raw)}")
    if not_understood:
        warnings.warn(f"{json_path}: not understood, ignored: {', '.join(not_understood)}", stacklevel=3)
    return settings


def config_summary(cfg: Config) -> str:
    """Every option of a validated config, one line per section, for the start of a run's log."""
    lines = [f"{name}: " + ", ".join(f"{key}={value}" for key, value in values.items())
             for name, values in cfg.to_dict().items()]
    lines.append(f"derived: ffn_size={cfg.model.ffn_size()}, expert_ffn_size={cfg.moe.expert_ffn_size(cfg.model)}, "
                 f"experts_per_layer={cfg.experts_per_layer()}")
    return "\n".join(lines)
