"""Pure validation of a Config, and `resolve`: the sizes only a run knows, filled into a new Config.

Nothing here changes the config it is given: ``validate`` checks a resolved view of it, so a micro-batch
size left to DeepSpeed's rule is checked as it will be derived.
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import TYPE_CHECKING

from moetrain.config.option import ConfigError, check, check_choice, option_of
from moetrain.data import DataError
from moetrain.data.loader import parse_split
from moetrain.data.tokenizer import check_tokenizer_files, resolve_tokenizer_kind

if TYPE_CHECKING:
    from moetrain.config.sections import (
        Config,
        DataConfig,
        DistillConfig,
        ModelConfig,
        MoEConfig,
        MonitorConfig,
        TrainingConfig,
    )


def check_at_least(flag: str, value: float, minimum: float) -> None:
    check(value >= minimum, f"{flag} must be at least {minimum}, got {value}")


def check_positive(flag: str, value: float) -> None:
    check(value > 0, f"{flag} must be positive, got {value}")


def resolve(cfg: Config, world_size: int = 1, vocab_size: int | None = None) -> Config:
    """A new Config with the sizes a run derives: the micro-batch size DeepSpeed's rule gives when only the
    global batch was set, and the tokenizer's vocabulary size when given. cfg itself is left as it is; the
    sections resolve does not change are shared with it."""
    training = cfg.training
    if training.micro_batch_size is None:
        training = dataclasses.replace(training, micro_batch_size=_derived_micro_batch(cfg, world_size))
    model = cfg.model if vocab_size is None else dataclasses.replace(cfg.model, vocab_size=vocab_size)
    return dataclasses.replace(cfg, model=model, training=training)


def _derived_micro_batch(cfg: Config, world_size: int) -> int:
    """DeepSpeed's rule for train_batch_size without train_micro_batch_size_per_gpu: the global batch split
    over the data-parallel ranks and gradient_accumulation_steps (1 if unset)."""
    total = cfg.training.global_batch_size
    check(total is not None, "--micro-batch-size is unset; give it, or DeepSpeed's train_batch_size")
    dp, steps = cfg.parallel.parallel_sizes(world_size)["dp"], cfg.parallel.num_microbatches or 1
    check(steps >= 1 and total % (steps * dp) == 0,
          f"train_batch_size {total} is not divisible by gradient_accumulation_steps {steps} x data-parallel "
          f"size {dp}; set train_micro_batch_size_per_gpu or a train_batch_size that divides")
    return total // (steps * dp)


def validate(cfg: Config, world_size: int = 1) -> None:
    """Raise ConfigError for the first inconsistent option, before any work is done; cfg is not changed."""
    _check_finite(cfg)
    _validate_model(cfg.model)
    _validate_moe(cfg.moe, cfg.model)
    _validate_data(cfg.data)
    cfg = resolve(cfg, world_size)
    _validate_training(cfg.training)
    _validate_parallel(cfg, world_size)
    _validate_distill(cfg.distill, cfg.parallel.tensor_parallel_size)
    _validate_monitor(cfg.monitor)


def _check_finite(cfg: Config) -> None:
    """Every float option (alone or in a list) is a finite number: `--lr inf` or `nan` would train on NaN."""
    for section in dataclasses.fields(cfg):
        values = getattr(cfg, section.name)
        for field in dataclasses.fields(values):
            value = getattr(values, field.name)
            numbers = value if isinstance(value, (list, tuple)) else [value]
            bad = next((v for v in numbers if isinstance(v, float) and not math.isfinite(v)), None)
            if bad is not None:
                spec = option_of(field)
                flag = spec.flag_names()[0] if spec is not None and spec.flag_names() else field.name
                raise ConfigError(f"{flag} must be a finite number, got {bad}")


def _validate_model(model: ModelConfig) -> None:
    for name in ("style", "recompute_granularity", "recompute_method"):
        check_choice(model, name)
    for flag, value in (("--num-layers", model.num_layers), ("--hidden-size", model.hidden_size),
                        ("--num-attention-heads", model.num_attention_heads), ("--seq-length", model.seq_length),
                        ("--make-vocab-size-divisible-by", model.make_vocab_size_divisible_by)):
        check_at_least(flag, value, 1)
    check_at_least("--recompute-num-layers", model.recompute_num_layers, 1)
    check(model.positions() >= model.seq_length,
          f"--max-position-embeddings {model.max_position_embeddings} is shorter than --seq-length "
          f"{model.seq_length}; give at least the sequence length, or drop it")
    if model.ffn_hidden_size is not None:
        check_at_least("--ffn-hidden-size", model.ffn_hidden_size, 1)
    check(model.kv_channels is not None or model.multi_latent_attention
          or model.hidden_size % model.num_attention_heads == 0,
          f"--hidden-size {model.hidden_size} is not divisible by --num-attention-heads "
          f"{model.num_attention_heads}; pick a head count that divides it, or set --kv-channels")
    _validate_attention(model)
    for flag, value in (("--hidden-dropout", model.hidden_dropout),
                        ("--attention-dropout", model.attention_dropout)):
        check(0.0 <= value < 1.0, f"{flag} must be in [0, 1), got {value}")
    for flag, value in (("--init-method-std", model.init_method_std), ("--rope-theta", model.rope_theta),
                        ("--norm-epsilon", model.norm_eps)):
        check_positive(flag, value)


def _validate_attention(model: ModelConfig) -> None:
    """Head layout (grouped-query attention, head width) and the RoPE / QK-norm options."""
    check_choice(model, "qk_norm")
    if model.kv_channels is not None:
        check_at_least("--kv-channels", model.kv_channels, 1)
    if model.num_query_groups is not None:
        check_at_least("--num-query-groups", model.num_query_groups, 1)
        check(model.num_attention_heads % model.num_query_groups == 0,
              f"--num-query-groups {model.num_query_groups} does not divide --num-attention-heads "
              f"{model.num_attention_heads}; use a divisor of the head count")
    if model.multi_latent_attention:
        _validate_latent_attention(model)
    check_choice(model, "rope_scaling")
    if model.rope_scaling:
        check(model.style == "llama", f"--rope-scaling {model.rope_scaling} scales RoPE; use --model-style llama")
        check(model.rope_scaling_factor >= 1.0, f"--rope-scaling-factor must be at least 1, got "
                                                f"{model.rope_scaling_factor}")
        check(model.rope_scaling != "llama3" or model.high_freq_factor > model.low_freq_factor > 0,
              f"--high-freq-factor {model.high_freq_factor} must exceed --low-freq-factor {model.low_freq_factor} > 0")
    check(0.0 < model.rotary_percent <= 1.0, f"--rotary-percent must be in (0, 1], got {model.rotary_percent}")
    if model.style == "llama" and not model.multi_latent_attention:
        check(model.rotary_dim() >= 2, f"--rotary-percent {model.rotary_percent} of head dimension "
                                       f"{model.head_dim()} rotates no pair of dimensions; raise it")
        check(model.rotary_percent < 1.0 or model.head_dim() % 2 == 0,
              f"llama style needs an even head dimension for RoPE, got {model.head_dim()}; change --hidden-size, "
              f"heads or --kv-channels")
    else:
        check(model.rotary_percent == 1.0, "--rotary-percent applies to RoPE; use --model-style llama or drop it")


def _validate_latent_attention(model: ModelConfig) -> None:
    check(model.style == "llama", "--multi-latent-attention uses RoPE and RMSNorm; use --model-style llama")
    standard = (("--num-query-groups", model.num_query_groups), ("--kv-channels", model.kv_channels),
                ("--qk-norm", model.qk_norm), ("--add-qkv-bias", model.add_qkv_bias),
                ("--rotary-percent", model.rotary_percent != 1.0))
    others = [flag for flag, used in standard if used]
    check(not others, f"{others[0] if others else ''} does not apply to --multi-latent-attention (its heads are "
                      "set by --qk-head-dim, --qk-pos-emb-head-dim, --v-head-dim); drop it")
    for flag, value in (("--kv-lora-rank", model.kv_lora_rank), ("--qk-head-dim", model.qk_head_dim),
                        ("--v-head-dim", model.v_head_dim), ("--q-lora-rank", model.q_lora_rank or 1)):
        check_at_least(flag, value, 1)
    check(model.qk_pos_emb_head_dim >= 2 and model.qk_pos_emb_head_dim % 2 == 0,
          f"--qk-pos-emb-head-dim must be even and at least 2, got {model.qk_pos_emb_head_dim}")


def _validate_moe(moe: MoEConfig, model: ModelConfig) -> None:
    check(len(moe.num_experts) >= 1 and min(moe.num_experts) >= 0,
          f"--num-experts needs one or more non-negative counts, got {moe.num_experts}")
    experts_per_layer = moe.experts_per_layer(model.num_layers)
    check(not moe.is_moe or any(experts_per_layer),
          f"--expert-interval {moe.expert_interval} with --num-layers {model.num_layers} places no MoE layer; "
          f"use an interval of at most {model.num_layers}, or --num-experts 1 for a dense model")
    for name in ("mlp_type", "score_func", "drop_policy", "noisy_gate_policy"):
        check_choice(moe, name)
    check_positive("--moe-train-capacity-factor", moe.train_capacity_factor)
    check_positive("--moe-eval-capacity-factor", moe.eval_capacity_factor)
    for flag, value in (("--moe-min-capacity", moe.min_capacity), ("--moe-loss-coeff", moe.aux_loss_coeff),
                        ("--router-z-loss-coef", moe.z_loss_coeff),
                        ("--moe-expert-bias-update-rate", moe.expert_bias_update_rate),
                        ("--num-shared-experts", moe.num_shared_experts)):
        check_at_least(flag, value, 0)
    if moe.expert_ffn_hidden_size is not None:
        check_at_least("--moe-ffn-hidden-size", moe.expert_ffn_hidden_size, 1)
    _validate_routing(moe, experts_per_layer)


def _validate_routing(moe: MoEConfig, experts_per_layer: list[int]) -> None:
    """The routing (RoutingConfig's own checks, for every MoE layer) and the shared expert, as ConfigErrors."""
    check_choice(moe, "router_dtype")
    if moe.shared_expert_ffn_size is not None:
        check_at_least("--moe-shared-expert-intermediate-size", moe.shared_expert_ffn_size, 1)
    check(not moe.shared_expert_gate or moe.num_shared_experts or moe.shared_expert_ffn_size,
          "--moe-shared-expert-gate needs a shared expert; add --num-shared-experts 1 or "
          "--moe-shared-expert-intermediate-size")
    try:
        routing = moe.routing()
        for layer, count in enumerate(experts_per_layer):
            if count:
                routing.check_experts(count, layer)
    except ValueError as error:
        raise ConfigError(str(error)) from None


def _validate_data(data: DataConfig) -> None:
    check_choice(data, "tokenizer_type")
    check_at_least("--vocab-size", data.vocab_size, 1)
    try:
        parse_split(data.split)  # the loader's own reading, so validation and loading never disagree
        check_tokenizer_files(resolve_tokenizer_kind(data.tokenizer_type, data.vocab_file, data.merge_file),
                              data.vocab_file, data.merge_file, data.tokenizer_model)
    except DataError as error:
        raise ConfigError(str(error)) from None


def _validate_training(training: TrainingConfig) -> None:
    check_at_least("--micro-batch-size", training.micro_batch_size, 1)
    if training.global_batch_size is not None:
        check_at_least("--global-batch-size", training.global_batch_size, 1)
    check_at_least("--train-iters", training.train_iters, 1)
    check(0 <= training.seed < 2**32, f"--seed must be between 0 and 2**32 - 1, got {training.seed}")
    if training.save is not None:
        check(not os.path.exists(training.save) or os.path.isdir(training.save),
              f"--save {training.save} is a file, not a directory; name a directory for the checkpoints")
    check_positive("--lr", training.lr)
    check_at_least("--min-lr", training.min_lr, 0)
    check_choice(training, "lr_decay_style")
    warmup = training.warmup_iters()
    check_at_least("--lr-warmup-iters", warmup, 0)
    check(warmup <= training.train_iters,
          f"--lr-warmup-iters {warmup} exceeds --train-iters {training.train_iters}; "
          f"shorten the warmup or train longer")
    if training.lr_decay_style != "constant":
        check(training.min_lr <= training.lr,
              f"--min-lr {training.min_lr} exceeds --lr {training.lr}; lower --min-lr")
        decay_iters = training.decay_iters()
        check(decay_iters > warmup,
              f"LR decay ends at iteration {decay_iters}, not after the {warmup} warmup "
              f"iterations; raise --lr-decay-iters / --train-iters or use --lr-decay-style constant")
    check_at_least("--weight-decay", training.weight_decay, 0)
    for flag, beta in (("--adam-beta1", training.adam_beta1), ("--adam-beta2", training.adam_beta2)):
        check(0.0 <= beta < 1.0, f"{flag} must be in [0, 1), got {beta}")
    check_positive("--adam-eps", training.adam_eps)
    check_at_least("--clip-grad", training.clip_grad, 0)
    check_choice(training, "precision")
    check_at_least("--loss-scale", training.loss_scale, 0)
    check_at_least("--initial-scale-power", training.initial_scale_power, 0)
    check_at_least("--loss-scale-window", training.loss_scale_window, 1)
    check_at_least("--hysteresis", training.hysteresis, 1)
    check_positive("--min-loss-scale", training.min_loss_scale)
    for flag, value in (("--eval-interval", training.eval_interval), ("--eval-iters", training.eval_iters),
                        ("--save-interval", training.save_interval)):
        check_at_least(flag, value, 0)
    check_at_least("--log-interval", training.log_interval, 1)
    check_at_least("--max-skipped-steps", training.max_skipped_steps, 1)
    check_at_least("--rewind-on-divergence", training.rewind_on_divergence, 0)
    check_at_least("--max-rewinds", training.max_rewinds, 0)
    if training.keep_last_checkpoints is not None:
        check_at_least("--keep-last-checkpoints", training.keep_last_checkpoints, 1)
    check_choice(training, "device")


def _validate_parallel(cfg: Config, world_size: int) -> None:
    parallel = cfg.parallel
    check_choice(parallel, "zero_stage")
    check_at_least("--distributed-timeout-minutes", parallel.distributed_timeout_minutes, 1)
    check(not parallel.offload_optimizer or parallel.zero_stage >= 1,
          "optimizer offload needs ZeRO stage 1 or higher; set --zero-stage or drop offload_optimizer")
    check_choice(parallel, "distributed_backend")
    check(not parallel.offload_param or parallel.zero_stage == 3,
          "parameter offload (offload_param) needs ZeRO stage 3; set zero_optimization.stage to 3 or drop it")
    if parallel.zero_stage == 3:
        check(cfg.training.precision != "fp16", "--zero-stage 3 trains in fp32 or --bf16 (FSDP2 has no fp16 "
                                                "loss scaling here); use --bf16 or --zero-stage 2")
    check_choice(parallel, "pipeline_schedule")
    if parallel.num_microbatches is not None:
        check_at_least("--num-microbatches", parallel.num_microbatches, 1)
    sizes = parallel.parallel_sizes(world_size)
    check(cfg.model.num_attention_heads % sizes["tp"] == 0,
          f"--num-attention-heads {cfg.model.num_attention_heads} is not divisible by "
          f"--tensor-parallel-size {sizes['tp']}; use a head count that is a multiple of it")
    check(cfg.model.kv_heads() % sizes["tp"] == 0,
          f"--num-query-groups {cfg.model.kv_heads()} is not divisible by --tensor-parallel-size {sizes['tp']}; "
          f"each rank needs whole key/value heads")
    check(sizes["tp"] == 1 or cfg.model.qk_norm != "projection",
          "--qk-norm projection normalises over all heads, which tensor parallelism splits across ranks; use "
          "--tensor-parallel-size 1 or --qk-norm head")
    check(sizes["pp"] <= cfg.model.num_layers,
          f"--pipeline-parallel-size {sizes['pp']} exceeds --num-layers {cfg.model.num_layers}; "
          f"use at most one stage per layer")
    if sizes["pp"] > 1:
        steps = cfg.accumulation_steps(world_size)
        check(parallel.pipeline_schedule != "1f1b" or steps >= sizes["pp"],
              f"the 1F1B pipeline schedule needs at least as many micro-batches ({steps}) as stages "
              f"({sizes['pp']}); raise --num-microbatches / --global-batch-size or use --pipeline-schedule gpipe")
    # a layer whose expert count the EP size does not divide runs on gcd(count, ep) ranks (Pyramid-MoE)
    cfg.accumulation_steps(world_size)


def _validate_distill(distill: DistillConfig, tensor_parallel_size: int) -> None:
    if not distill.enabled:
        for flag, value in (("--load-teacher", distill.load_teacher), ("--kd-stop-iter", distill.stop_iter),
                            ("--teacher-model-parallel-size", distill.teacher_model_parallel_size),
                            ("--student-init-from-teacher", distill.student_init_from_teacher or None)):
            check(value is None, f"{flag} is given without --mos or --kd; add one of them or drop {flag}")
        return
    check(distill.load_teacher is not None, "--mos/--kd needs --load-teacher DIR, the teacher's checkpoint")
    teacher_tp = distill.teacher_model_parallel_size
    check(teacher_tp in (None, 1, tensor_parallel_size),
          f"--teacher-model-parallel-size {teacher_tp}: moetrain shards the teacher like the student, over "
          f"--tensor-parallel-size {tensor_parallel_size}; use {tensor_parallel_size} or 1, or drop the flag")
    check_positive("--kd-temp", distill.temperature)
    check_at_least("--kd-alpha-ce", distill.alpha_ce, 0)
    check_at_least("--kd-beta-ce", distill.beta_ce, 0)
    if distill.stop_iter is not None:
        check_at_least("--kd-stop-iter", distill.stop_iter, 0)
    for flag, value in (("--num-layers-teacher", distill.num_layers_teacher),
                        ("--hidden-size-teacher", distill.hidden_size_teacher),
                        ("--num-attention-heads-teacher", distill.num_attention_heads_teacher)):
        if value is not None:
            check_at_least(flag, value, 1)
    if distill.num_experts_teacher is not None:
        check(len(distill.num_experts_teacher) >= 1 and min(distill.num_experts_teacher) >= 0,
              f"--num-experts-teacher needs one or more non-negative counts, got {distill.num_experts_teacher}")


def _validate_monitor(monitor: MonitorConfig) -> None:
    check_at_least("--loss-spike-window", monitor.loss_spike_window, 2)
    check_positive("--loss-spike-sigmas", monitor.loss_spike_sigmas)
    check_at_least("--expert-alarm-steps", monitor.expert_alarm_steps, 1)
    check_positive("--expert-collapse-factor", monitor.collapse_factor)
    check(monitor.record_routing is None or monitor.record_routing != monitor.replay_routing,
          f"--record-routing and --replay-routing are both {monitor.record_routing}: record into another directory")
    check_at_least("--profile-step-start", monitor.profile_step_start, 0)
    check(monitor.profile_step_end > monitor.profile_step_start,
          f"--profile-step-end {monitor.profile_step_end} must be after --profile-step-start "
          f"{monitor.profile_step_start}")
    check(0 <= monitor.min_router_entropy <= 1,
          f"--min-router-entropy is a fraction of the maximum entropy, in [0, 1]; got {monitor.min_router_entropy}")
