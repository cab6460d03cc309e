"""moetrain.config: flags, aliases, DeepSpeed JSON mapping and precedence, validation, serialisation."""

from __future__ import annotations

import copy
import dataclasses
import json
import warnings
from pathlib import Path
from typing import Any

import pytest

from moetrain import config
from moetrain.config import (
    Config,
    ConfigError,
    ModelConfig,
    MoEConfig,
    ParallelConfig,
    build_train_parser,
    config_summary,
    field_flags,
    parse_train_args,
    resolve,
)


def write_json(tmp_path: Path, content: Any, name: str = "ds_config.json") -> str:
    path = tmp_path / name
    path.write_text(json.dumps(content))
    return str(path)


def parse_quietly(argv: list[str]) -> tuple[Config, list[str]]:
    """Parse and return the config with every warning message raised on the way."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cfg = parse_train_args(argv)
    return cfg, [str(warning.message) for warning in caught]


def test_no_flags_gives_the_dataclass_defaults() -> None:
    cfg = parse_train_args([])
    assert cfg == Config()
    assert cfg.moe.num_experts == [8] and cfg.moe.expert_interval == 2 and cfg.moe.topk == 1
    assert cfg.training.save == "runs/default" and cfg.training.precision == "fp32"
    assert cfg.parallel.expert_parallel_size is None
    cfg.validate()
    assert cfg.experts_per_layer() == [0, 8, 0, 8]
    assert cfg.moe.num_moe_layers(cfg.model.num_layers) == 2
    assert cfg.model.ffn_size() == 4 * 256 == cfg.moe.expert_ffn_size(cfg.model)


def test_default_configs_do_not_share_lists() -> None:
    first, second = MoEConfig(), MoEConfig()
    first.num_experts.append(4)
    assert second.num_experts == [8]


def test_llama_ffn_size_is_eight_thirds_rounded_up_to_64() -> None:
    assert ModelConfig(style="llama", hidden_size=256).ffn_size() == 704  # 8 * 256 / 3 = 682.7
    assert ModelConfig(style="llama", hidden_size=4096).ffn_size() == 10944
    assert ModelConfig(style="llama", hidden_size=256, ffn_hidden_size=300).ffn_size() == 300
    model = ModelConfig(hidden_size=128)
    assert MoEConfig(expert_ffn_hidden_size=96).expert_ffn_size(model) == 96
    assert MoEConfig().expert_ffn_size(model) == 512


@pytest.mark.parametrize("argv, dest, expected", [
    (["--model-style", "llama"], "model.style", "llama"),
    (["--num-layers", "6"], "model.num_layers", 6),
    (["--hidden-size", "64"], "model.hidden_size", 64),
    (["--num-attention-heads", "4"], "model.num_attention_heads", 4),
    (["--ffn-hidden-size", "100"], "model.ffn_hidden_size", 100),
    (["--seq-length", "128"], "model.seq_length", 128),
    (["--max-position-embeddings", "128"], "model.max_position_embeddings", 128),
    (["--hidden-dropout", "0.1"], "model.hidden_dropout", 0.1),
    (["--attention-dropout", "0.2"], "model.attention_dropout", 0.2),
    (["--init-method-std", "0.01"], "model.init_method_std", 0.01),
    (["--rope-theta", "500000"], "model.rope_theta", 500000.0),
    (["--norm-epsilon", "1e-6"], "model.norm_eps", 1e-6),
    (["--layernorm-epsilon", "1e-6"], "model.norm_eps", 1e-6),
    (["--untie-embeddings-and-output-weights"], "model.tie_embeddings", False),
    (["--expert-interval", "1"], "moe.expert_interval", 1),
    (["--moe-layer-interval", "1"], "moe.expert_interval", 1),
    (["--topk", "2"], "moe.topk", 2),
    (["--num-experts-per-token", "2"], "moe.topk", 2),
    (["--moe-top-k", "2"], "moe.topk", 2),
    (["--mlp-type", "residual"], "moe.mlp_type", "residual"),
    (["--moe-train-capacity-factor", "1.25"], "moe.train_capacity_factor", 1.25),
    (["--moe-eval-capacity-factor", "2"], "moe.eval_capacity_factor", 2.0),
    (["--moe-min-capacity", "0"], "moe.min_capacity", 0),
    (["--disable-moe-token-dropping"], "moe.drop_tokens", False),
    (["--disable-moe-rts"], "moe.use_rts", False),
    (["--noisy-gate-policy", "RSample"], "moe.noisy_gate_policy", "RSample"),
    (["--noisy-gate-policy", "None"], "moe.noisy_gate_policy", None),
    (["--disable-moe-top2-2nd-expert-sampling"], "moe.top2_2nd_expert_sampling", False),
    (["--moe-loss-coeff", "0.1"], "moe.aux_loss_coeff", 0.1),
    (["--router-aux-loss-coef", "0.1"], "moe.aux_loss_coeff", 0.1),
    (["--router-z-loss-coef", "0.001"], "moe.z_loss_coeff", 0.001),
    (["--moe-z-loss-coeff", "0.001"], "moe.z_loss_coeff", 0.001),
    (["--moe-score-func", "sigmoid"], "moe.score_func", "sigmoid"),
    (["--moe-drop-policy", "probs"], "moe.drop_policy", "probs"),
    (["--moe-expert-bias"], "moe.expert_bias", True),
    (["--moe-expert-bias-update-rate", "0.01"], "moe.expert_bias_update_rate", 0.01),
    (["--num-shared-experts", "2"], "moe.num_shared_experts", 2),
    (["--moe-ffn-hidden-size", "128"], "moe.expert_ffn_hidden_size", 128),
    (["--data-path", "a.txt", "b.txt"], "data.data_path", ["a.txt", "b.txt"]),
    (["--tokenizer-type", "byte"], "data.tokenizer_type", "byte"),
    (["--tokenizer-type", "GPT2BPETokenizer"], "data.tokenizer_type", "gpt2"),
    (["--vocab-file", "v.json"], "data.vocab_file", "v.json"),
    (["--merge-file", "m.txt"], "data.merge_file", "m.txt"),
    (["--vocab-size", "8000"], "data.vocab_size", 8000),
    (["--split", "90,5,5"], "data.split", "90,5,5"),
    (["--data-cache-dir", "cache"], "data.cache_dir", "cache"),
    (["--micro-batch-size", "4"], "training.micro_batch_size", 4),
    (["--global-batch-size", "64"], "training.global_batch_size", 64),
    (["--train-iters", "7"], "training.train_iters", 7),
    (["--max-steps", "7"], "training.train_iters", 7),
    (["--lr", "3e-4"], "training.lr", 3e-4),
    (["--min-lr", "3e-5"], "training.min_lr", 3e-5),
    (["--lr-decay-style", "linear"], "training.lr_decay_style", "linear"),
    (["--lr-warmup-iters", "5"], "training.lr_warmup_iters", 5),
    (["--lr-decay-iters", "400"], "training.lr_decay_iters", 400),
    (["--weight-decay", "0.0"], "training.weight_decay", 0.0),
    (["--adam-beta1", "0.8"], "training.adam_beta1", 0.8),
    (["--adam-beta2", "0.99"], "training.adam_beta2", 0.99),
    (["--adam-eps", "1e-6"], "training.adam_eps", 1e-6),
    (["--clip-grad", "0"], "training.clip_grad", 0.0),
    (["--seed", "7"], "training.seed", 7),
    (["--fp16"], "training.precision", "fp16"),
    (["--bf16"], "training.precision", "bf16"),
    (["--loss-scale", "128"], "training.loss_scale", 128.0),
    (["--initial-scale-power", "12"], "training.initial_scale_power", 12),
    (["--loss-scale-window", "500"], "training.loss_scale_window", 500),
    (["--hysteresis", "3"], "training.hysteresis", 3),
    (["--min-loss-scale", "0.5"], "training.min_loss_scale", 0.5),
    (["--eval-interval", "0"], "training.eval_interval", 0),
    (["--eval-iters", "3"], "training.eval_iters", 3),
    (["--log-interval", "1"], "training.log_interval", 1),
    (["--save", "out"], "training.save", "out"),
    (["--no-save"], "training.save", None),
    (["--load", "ckpt"], "training.load", "ckpt"),
    (["--save-interval", "50"], "training.save_interval", 50),
    (["--keep-last-checkpoints", "5"], "training.keep_last_checkpoints", 5),
    (["--keep-last-checkpoints", "0"], "training.keep_last_checkpoints", None),
    (["--tensorboard-dir", "tb"], "training.tensorboard_dir", "tb"),
    (["--device", "cpu"], "training.device", "cpu"),
    (["--no-progress-bar"], "training.progress_bar", False),
    (["--tensor-parallel-size", "2"], "parallel.tensor_parallel_size", 2),
    (["--tensor-model-parallel-size", "2"], "parallel.tensor_parallel_size", 2),
    (["--pipeline-parallel-size", "2"], "parallel.pipeline_parallel_size", 2),
    (["--pipeline-model-parallel-size", "2"], "parallel.pipeline_parallel_size", 2),
    (["--expert-parallel-size", "4"], "parallel.expert_parallel_size", 4),
    (["--moe-expert-parallel-size", "4"], "parallel.expert_parallel_size", 4),
    (["--num-microbatches", "4"], "parallel.num_microbatches", 4),
    (["--zero-stage", "1"], "parallel.zero_stage", 1),
    (["--distributed-backend", "gloo"], "parallel.distributed_backend", "gloo"),
])
def test_each_flag_and_alias_sets_its_field(argv: list[str], dest: str, expected: Any) -> None:
    section, name = dest.split(".")
    cfg = parse_train_args(argv)
    assert getattr(getattr(cfg, section), name) == expected
    untouched = Config()
    setattr(getattr(untouched, section), name, expected)
    assert cfg == untouched, "a flag must set its own field and nothing else"


def test_every_config_field_except_runtime_ones_has_a_flag() -> None:
    parser = build_train_parser()
    dests = {action.dest for action in parser._actions}
    fields = {f"{section.name}.{f.name}" for section in dataclasses.fields(Config)
              for f in dataclasses.fields(getattr(Config(), section.name))}
    json_only = {"model.vocab_size", "training.consecutive_hysteresis", "parallel.offload_optimizer",
                 "parallel.offload_param"}
    assert fields - json_only <= dests


@pytest.mark.parametrize("argv", [
    ["--num-experts", "8", "8", "16", "16"],
    ["--num-experts", "[8, 8, 16, 16]"],
    ["--num-experts", "[8,", "8,", "16,", "16]"],
    ["--num-experts", "8,8,16,16"],
])
def test_pyramid_expert_counts_in_every_spelling(argv: list[str]) -> None:
    cfg = parse_train_args([*argv, "--num-layers", "8"])
    assert cfg.moe.num_experts == [8, 8, 16, 16]
    assert cfg.experts_per_layer() == [0, 8, 0, 8, 0, 16, 0, 16]
    cfg.validate()


def test_single_expert_count_applies_to_every_moe_layer() -> None:
    cfg = parse_train_args(["--num-experts", "4", "--num-layers", "6", "--expert-interval", "3"])
    assert cfg.experts_per_layer() == [0, 0, 4, 0, 0, 4]
    cfg = parse_train_args(["--num-experts", "4", "--num-layers", "3", "--expert-interval", "1"])
    assert cfg.experts_per_layer() == [4, 4, 4]


@pytest.mark.parametrize("count", ["0", "1"])
def test_zero_or_one_expert_means_a_dense_model(count: str) -> None:
    cfg = parse_train_args(["--num-experts", count])
    assert not cfg.moe.is_moe
    assert cfg.experts_per_layer() == [0, 0, 0, 0]
    assert cfg.moe.num_moe_layers(cfg.model.num_layers) == 0
    cfg.validate()


def test_a_pyramid_entry_of_one_leaves_that_layer_dense() -> None:
    cfg = parse_train_args(["--num-experts", "8", "1"])
    assert cfg.moe.is_moe
    assert cfg.experts_per_layer() == [0, 8, 0, 0]
    assert cfg.moe.num_moe_layers(4) == 1


def test_unparsable_expert_count_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        parse_train_args(["--num-experts", "eight"])
    assert "--num-experts" in capsys.readouterr().err


def test_abbreviated_flags_are_rejected() -> None:
    with pytest.raises(SystemExit):
        parse_train_args(["--num-lay", "2"])


def test_fp16_and_bf16_together_are_an_error() -> None:
    with pytest.raises(ConfigError, match="--fp16 and --bf16 both set training.precision"):
        parse_train_args(["--fp16", "--bf16"])


def test_two_spellings_of_one_field_must_agree() -> None:
    with pytest.raises(ConfigError, match="--max-steps 9 and --train-iters 10 both set training.train_iters"):
        parse_train_args(["--max-steps", "9", "--train-iters", "10"])
    assert parse_train_args(["--max-steps", "9", "--train-iters", "9"]).training.train_iters == 9
    assert parse_train_args(["--lr", "1", "--lr", "2"]).training.lr == 2.0  # a repeated flag: last wins


FULL_DEEPSPEED_CONFIG = {
    "train_batch_size": 64,
    "train_micro_batch_size_per_gpu": 4,
    "gradient_accumulation_steps": 8,
    "gradient_clipping": 0.5,
    "steps_per_print": 25,
    "fp16": {"enabled": True, "loss_scale": 0, "initial_scale_power": 12, "loss_scale_window": 200,
             "hysteresis": 4, "consecutive_hysteresis": True, "min_loss_scale": 0.25},
    "bf16": {"enabled": False},
    "optimizer": {"type": "AdamW", "params": {"lr": 6e-4, "betas": [0.85, 0.98], "eps": 1e-7,
                                               "weight_decay": 0.05}},
    "scheduler": {"type": "WarmupDecayLR", "params": {"warmup_min_lr": 1e-5, "warmup_max_lr": 5e-4,
                                                       "warmup_num_steps": 20, "total_num_steps": 300,
                                                       "warmup_type": "linear"}},
    "zero_optimization": {"stage": 1, "offload_optimizer": {"device": "cpu"}},
    "moe": {"enabled": True, "num_experts": [4, 8], "ep_size": 2, "moe_loss_coeff": 0.02,
            "train_capacity_factor": 1.5, "eval_capacity_factor": 2.0, "min_capacity": 2, "drop_tokens": False,
            "top_k": 2, "use_rts": False, "noisy_gate_policy": "Jitter"},
}


def test_deepspeed_json_maps_every_supported_key(tmp_path: Path) -> None:
    path = write_json(tmp_path, FULL_DEEPSPEED_CONFIG)
    cfg, messages = parse_quietly(["--deepspeed_config", path])
    assert messages == []
    t, p, m = cfg.training, cfg.parallel, cfg.moe
    assert (t.global_batch_size, t.micro_batch_size, p.num_microbatches) == (64, 4, 8)
    assert t.clip_grad == 0.5 and t.log_interval == 25
    assert t.precision == "fp16"
    assert (t.loss_scale, t.initial_scale_power, t.loss_scale_window, t.hysteresis, t.min_loss_scale) == (
        0.0, 12, 200, 4, 0.25)
    assert t.consecutive_hysteresis is True
    assert (t.adam_beta1, t.adam_beta2, t.adam_eps, t.weight_decay) == (0.85, 0.98, 1e-7, 0.05)
    assert t.lr == 5e-4, "the scheduler's warmup_max_lr is the peak, as in DeepSpeed"
    assert (t.min_lr, t.lr_warmup_iters, t.lr_decay_iters, t.lr_decay_style) == (1e-5, 20, 300, "linear")
    assert (p.zero_stage, p.offload_optimizer, p.expert_parallel_size) == (1, True, 2)
    assert m.num_experts == [4, 8] and m.topk == 2 and m.aux_loss_coeff == 0.02
    assert (m.train_capacity_factor, m.eval_capacity_factor, m.min_capacity) == (1.5, 2.0, 2)
    assert (m.drop_tokens, m.use_rts, m.noisy_gate_policy) == (False, False, "Jitter")
    assert cfg.model == ModelConfig() and cfg.data == Config().data
    cfg.validate(world_size=2)
    assert cfg.accumulation_steps(world_size=2) == 8 and cfg.global_batch(world_size=2) == 64


def test_dash_spelling_of_deepspeed_config_and_bf16(tmp_path: Path) -> None:
    path = write_json(tmp_path, {"bf16": {"enabled": True}, "moe": {"expert_parallel_size": 4}})
    cfg = parse_train_args(["--deepspeed-config", path])
    assert cfg.training.precision == "bf16" and cfg.parallel.expert_parallel_size == 4


@pytest.mark.parametrize("scheduler, expected", [
    ({"type": "WarmupLR", "params": {"warmup_min_lr": 0, "warmup_max_lr": 2e-3, "warmup_num_steps": 10}},
     {"lr_decay_style": "constant", "lr": 2e-3, "lr_warmup_iters": 10}),
    ({"type": "WarmupCosineLR", "params": {"total_num_steps": 400, "warmup_num_steps": 30,
                                            "warmup_min_ratio": 0, "cos_min_ratio": 0.1}},
     {"lr_decay_style": "cosine", "lr_decay_iters": 400, "lr_warmup_iters": 30, "min_lr": pytest.approx(3e-4)}),
])
def test_deepspeed_schedulers(tmp_path: Path, scheduler: dict[str, Any], expected: dict[str, Any]) -> None:
    path = write_json(tmp_path, {"optimizer": {"type": "Adam", "params": {"lr": 3e-3}}, "scheduler": scheduler})
    training = parse_train_args(["--deepspeed_config", path]).training
    assert {name: getattr(training, name) for name in expected} == expected


def test_cosine_min_ratio_follows_an_lr_given_on_the_command_line(tmp_path: Path) -> None:
    path = write_json(tmp_path, {"optimizer": {"type": "AdamW", "params": {"lr": 1e-3}},
                                 "scheduler": {"type": "WarmupCosineLR", "params": {"cos_min_ratio": 0.5}}})
    cfg, _ = parse_quietly(["--deepspeed_config", path, "--lr", "4e-3"])
    assert cfg.training.lr == 4e-3 and cfg.training.min_lr == pytest.approx(2e-3)


def test_explicit_flag_beats_json_with_one_warning_naming_both(tmp_path: Path) -> None:
    path = write_json(tmp_path, {"optimizer": {"type": "AdamW", "params": {"lr": 0.001}},
                                 "train_micro_batch_size_per_gpu": 4, "fp16": {"enabled": True}})
    cfg, messages = parse_quietly(["--deepspeed_config", path, "--lr", "0.002", "--micro-batch-size", "4",
                                   "--bf16"])
    assert cfg.training.lr == 0.002 and cfg.training.micro_batch_size == 4 and cfg.training.precision == "bf16"
    assert messages == [f"--lr 0.002 overrides optimizer.params.lr = 0.001 in {path}",
                        f"--bf16 overrides fp16.enabled = true in {path}"]


def test_json_beats_defaults_without_warnings(tmp_path: Path) -> None:
    path = write_json(tmp_path, {"steps_per_print": 3})
    cfg, messages = parse_quietly(["--deepspeed_config", path, "--seed", "5"])
    assert cfg.training.log_interval == 3 and cfg.training.seed == 5 and messages == []


def test_unknown_and_unmappable_keys_are_listed_in_one_warning(tmp_path: Path) -> None:
    path = write_json(tmp_path, {
        "wall_clock_breakdown": False,
        "flops_profiler": {"enabled": False, "profile_step": 1},
        "zero_optimization": {"stage": 0, "overlap_comm": True, "offload_optimizer": {"device": "none",
                                                                                    "pin_memory": True}},
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "amsgrad": False}},
        "scheduler": {"type": "WarmupLR", "params": {"warmup_num_steps": 5, "warmup_type": "log"}},
        "moe": {"num_experts": 4, "expert_capacity": 3},
    })
    cfg, messages = parse_quietly(["--deepspeed_config", path])
    assert len(messages) == 1
    message = messages[0]
    assert message.startswith(f"{path}: not understood, ignored: ")
    for key in ("wall_clock_breakdown", "flops_profiler", "zero_optimization.overlap_comm",
                "zero_optimization.offload_optimizer.pin_memory", "optimizer.params.amsgrad",
                "moe.expert_capacity", "scheduler.params.warmup_type (moetrain warms up linearly)"):
        assert key in message
    assert "flops_profiler.enabled" not in message, "an unknown section is reported once, not per key"
    assert "zero_optimization.stage" not in message and "moe.num_experts" not in message
    assert cfg.moe.num_experts == [4] and cfg.training.lr_warmup_iters == 5


def test_deepspeed_stage_3_maps_to_fsdp2_and_lists_the_stage_3_keys_it_ignores(tmp_path: Path) -> None:
    path = write_json(tmp_path, {"zero_optimization": {
        "stage": 3, "offload_param": {"device": "cpu", "pin_memory": True}, "offload_optimizer": {"device": "cpu"},
        "stage3_prefetch_bucket_size": 5e7, "stage3_param_persistence_threshold": 1e5}})
    cfg, messages = parse_quietly(["--deepspeed_config", path])
    p = cfg.parallel
    assert (p.zero_stage, p.offload_param, p.offload_optimizer) == (3, True, True)
    assert len(messages) == 1
    for key in ("zero_optimization.stage3_prefetch_bucket_size", "zero_optimization.stage3_param_persistence_threshold",
                "zero_optimization.offload_param.pin_memory"):
        assert key in messages[0]
    assert "offload_param.device" not in messages[0]
    assert parse_quietly(["--use-torch-fsdp2"])[0].parallel.zero_stage == 3  # Megatron's spelling


def test_auto_values_keep_moetrain_settings(tmp_path: Path) -> None:
    path = write_json(tmp_path, {"train_micro_batch_size_per_gpu": "auto", "gradient_clipping": "auto"})
    cfg, messages = parse_quietly(["--deepspeed_config", path])
    assert cfg == Config() and messages == []


def test_moe_disabled_in_json_gives_a_dense_model(tmp_path: Path) -> None:
    path = write_json(tmp_path, {"moe": {"enabled": False, "num_experts": 8}})
    assert not parse_train_args(["--deepspeed_config", path]).moe.is_moe


def test_inconsistent_batch_triple_is_an_error(tmp_path: Path) -> None:
    path = write_json(tmp_path, {"train_batch_size": 32, "train_micro_batch_size_per_gpu": 4,
                                 "gradient_accumulation_steps": 4})
    cfg = parse_train_args(["--deepspeed_config", path])
    cfg.validate(world_size=2)  # 4 x 4 x 2 = 32
    with pytest.raises(ConfigError, match=r"--global-batch-size 32 != micro-batch-size 4 x --num-microbatches"):
        cfg.validate(world_size=1)


@pytest.mark.parametrize("batch, world_size, micro, steps", [
    ({"train_batch_size": 12}, 1, 12, 1),
    ({"train_batch_size": 12}, 2, 6, 1),
    ({"train_batch_size": 32, "gradient_accumulation_steps": 4}, 1, 8, 4),
    ({"train_batch_size": 32, "gradient_accumulation_steps": 4}, 2, 4, 4),
    ({"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 3}, 2, 4, 3),
])
def test_missing_batch_value_is_derived_as_deepspeed_does(tmp_path: Path, batch: dict, world_size: int,
                                                          micro: int, steps: int) -> None:
    cfg = parse_train_args(["--deepspeed_config", write_json(tmp_path, batch)])
    cfg.validate(world_size)
    cfg = resolve(cfg, world_size)
    assert (cfg.training.micro_batch_size, cfg.accumulation_steps(world_size)) == (micro, steps)
    assert cfg.global_batch(world_size) == micro * steps * world_size


def test_underivable_micro_batch_is_an_error_and_an_explicit_one_wins(tmp_path: Path) -> None:
    path = write_json(tmp_path, {"train_batch_size": 30, "gradient_accumulation_steps": 4})
    with pytest.raises(ConfigError, match="^train_batch_size 30 is not divisible by gradient_accumulation_steps 4 "
                                          "x data-parallel size 1; set train_micro_batch_size_per_gpu"):
        parse_train_args(["--deepspeed_config", path]).validate()
    path = write_json(tmp_path, {"train_batch_size": 32, "gradient_accumulation_steps": 4})
    cfg = parse_train_args(["--deepspeed_config", path, "--micro-batch-size", "8"])
    cfg.validate()
    assert cfg.training.micro_batch_size == 8


def test_missing_json_file_names_the_file(tmp_path: Path) -> None:
    missing = str(tmp_path / "nope.json")
    with pytest.raises(ConfigError, match="nope.json"):
        parse_train_args(["--deepspeed_config", missing])


def test_malformed_json_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "broken.json"
    path.write_text('{"train_batch_size": 8,')
    with pytest.raises(ConfigError, match="broken.json is not valid JSON"):
        parse_train_args(["--deepspeed_config", str(path)])


@pytest.mark.parametrize("content, match", [
    ([1, 2], "must hold a JSON object"),
    ({"train_batch_size": "big"}, "train_batch_size must be an integer"),
    ({"gradient_clipping": True}, "gradient_clipping must be a number"),
    ({"moe": {"drop_tokens": 1}}, "moe.drop_tokens must be true or false"),
    ({"moe": {"num_experts": [8, "x"]}}, "moe.num_experts must be an integer or a list"),
    ({"moe": {"noisy_gate_policy": "Gumbel"}}, "moe.noisy_gate_policy must be"),
    ({"optimizer": {"type": "Lamb"}}, "optimizer.type must be Adam or AdamW"),
    ({"optimizer": {"params": {"betas": [0.9]}}}, "optimizer.params.betas must be a list of two numbers"),
    ({"scheduler": {"type": "OneCycle"}}, "scheduler.type must be one of WarmupLR"),
    ({"zero_optimization": {"offload_optimizer": {"device": "nvme"}}}, "cannot offload to NVMe"),
    ({"fp16": True}, "fp16 must be a JSON object"),
    ({"fp16": {"enabled": True}, "bf16": {"enabled": True}}, "enables both fp16 and bf16"),
])
def test_bad_json_values_are_errors_naming_the_key(tmp_path: Path, content: Any, match: str) -> None:
    path = write_json(tmp_path, content)
    with pytest.raises(ConfigError, match=match):
        parse_train_args(["--deepspeed_config", path])


def with_changes(**changes: Any) -> Config:
    """A default config with "section__field" keyword changes applied."""
    cfg = Config()
    for key, value in changes.items():
        section, name = key.split("__")
        setattr(getattr(cfg, section), name, value)
    return cfg


@pytest.mark.parametrize("changes, world_size, match", [
    ({"training__global_batch_size": 30}, 1,
     r"^--global-batch-size 30 is not divisible by micro-batch-size 8 x data-parallel size 1; use a multiple of 8$"),
    ({"training__global_batch_size": 32, "parallel__tensor_parallel_size": 1}, 3,
     "not divisible by micro-batch-size 8 x data-parallel size 3; use a multiple of 24"),
    ({"moe__topk": 3, "moe__num_experts": [2]}, 1, "--topk 3 exceeds the 2 experts of layer 1"),
    ({"moe__topk": 0}, 1, "--topk must be at least 1"),
    ({"moe__num_experts": [8, 8, 8]}, 1,
     "--num-experts lists 3 counts but --num-layers 4 with --expert-interval 2 has 2 MoE layers; give 1 count or 2"),
    ({"moe__num_experts": []}, 1, "--num-experts needs one or more non-negative counts"),
    ({"moe__num_experts": [-8]}, 1, "--num-experts needs one or more non-negative counts"),
    ({"moe__expert_interval": 0}, 1, "--expert-interval must be at least 1"),
    ({"moe__expert_interval": 5}, 1, "--expert-interval 5 with --num-layers 4 places no MoE layer"),
    ({"model__num_attention_heads": 6}, 1, "--hidden-size 256 is not divisible by --num-attention-heads 6"),
    ({"model__style": "llama", "model__hidden_size": 24, "model__num_attention_heads": 8}, 1,
     "llama style needs an even head dimension"),
    ({"moe__train_capacity_factor": 0.0}, 1, "--moe-train-capacity-factor must be positive"),
    ({"moe__eval_capacity_factor": -1.0}, 1, "--moe-eval-capacity-factor must be positive"),
    ({"training__precision": "fp8"}, 1, "precision 'fp8' is not one of fp32, fp16, bf16"),
    ({"model__style": "bert"}, 1, "--model-style 'bert' is not one of gpt, llama"),
    ({"moe__mlp_type": "dense"}, 1, "--mlp-type 'dense' is not one of standard, residual"),
    ({"moe__score_func": "relu"}, 1, "--moe-score-func 'relu' is not one of softmax, sigmoid"),
    ({"moe__drop_policy": "first"}, 1, "--moe-drop-policy 'first' is not one of"),
    ({"moe__noisy_gate_policy": "Gumbel"}, 1, "--noisy-gate-policy 'Gumbel' is not one of None, Jitter, RSample"),
    ({"training__lr_warmup_iters": 600}, 1, "--lr-warmup-iters 600 exceeds --train-iters 400"),
    ({"training__lr_warmup_iters": 400}, 1, "LR decay ends at iteration 400, not after the 400 warmup"),
    ({"training__min_lr": 0.01}, 1, "--min-lr 0.01 exceeds --lr 0.001"),
    ({"parallel__tensor_parallel_size": 2, "parallel__pipeline_parallel_size": 2}, 6,
     "world size 6 is not divisible by tensor-parallel-size 2 x pipeline-parallel-size 2"),
    ({"parallel__expert_parallel_size": 4}, 2, "--expert-parallel-size 4 does not divide the data-parallel size 2"),
    ({"parallel__tensor_parallel_size": 3}, 3, "--num-attention-heads 8 is not divisible by --tensor-parallel-size 3"),
    ({"parallel__pipeline_parallel_size": 8}, 8, "--pipeline-parallel-size 8 exceeds --num-layers 4"),
    ({"parallel__offload_optimizer": True}, 1, "optimizer offload needs ZeRO stage 1"),
    ({"parallel__zero_stage": 4}, 1, "--zero-stage 4 is not one of 0, 1, 2, 3"),
    ({"parallel__offload_param": True, "parallel__zero_stage": 2}, 1, "needs ZeRO stage 3; set zero_optimization"),
    ({"parallel__zero_stage": 3, "training__precision": "fp16"}, 2, "--zero-stage 3 trains in fp32 or --bf16"),
    ({"training__global_batch_size": 32, "parallel__num_microbatches": 2}, 1,
     "--global-batch-size 32 != micro-batch-size 8 x --num-microbatches"),
    ({"data__split": "90;10"}, 1, "--split '90;10' must be up to three"),
    ({"data__tokenizer_type": "bpe", "data__vocab_file": "vocab.json", "data__merge_file": "merges.txt"}, 1,
     "--vocab-file/--merge-file are not read by --tokenizer-type bpe; add --tokenizer-type gpt2"),
    ({"data__tokenizer_type": "json", "data__vocab_file": "t.json", "data__merge_file": "merges.txt"}, 1,
     "--merge-file is not read by --tokenizer-type json"),
    ({"model__hidden_dropout": 1.0}, 1, r"--hidden-dropout must be in \[0, 1\)"),
    ({"training__keep_last_checkpoints": 0}, 1, "--keep-last-checkpoints must be at least 1"),
    ({"training__device": "tpu"}, 1, "--device 'tpu' is not one of auto, cpu, cuda"),
])
def test_validation_errors(changes: dict[str, Any], world_size: int, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        with_changes(**changes).validate(world_size)


def test_parallel_sizes_spread_experts_over_data_parallel_ranks() -> None:
    assert ParallelConfig(tensor_parallel_size=2, pipeline_parallel_size=2).parallel_sizes(8) == {
        "dp": 2, "tp": 2, "pp": 2, "ep": 2}
    assert ParallelConfig(expert_parallel_size=4).parallel_sizes(8) == {"dp": 8, "tp": 1, "pp": 1, "ep": 4}
    cfg = with_changes(parallel__expert_parallel_size=4)
    cfg.validate(world_size=8)


def test_accumulation_steps_from_global_batch_or_microbatches() -> None:
    assert with_changes(training__global_batch_size=64).accumulation_steps(world_size=2) == 4
    assert with_changes(parallel__num_microbatches=3).accumulation_steps(world_size=2) == 3
    assert with_changes(parallel__num_microbatches=3).global_batch(world_size=2) == 8 * 2 * 3
    assert Config().global_batch(world_size=4) == 32 and Config().accumulation_steps(world_size=4) == 1


def test_to_dict_from_dict_round_trip_through_json() -> None:
    cfg = parse_train_args(["--model-style", "llama", "--num-experts", "4", "8", "--num-layers", "4",
                            "--data-path", "x", "--bf16", "--no-save", "--expert-parallel-size", "2"])
    cfg.model.vocab_size = 1000
    restored = Config.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert restored == cfg
    restored.moe.num_experts.append(16)
    assert cfg.moe.num_experts == [4, 8], "from_dict must not alias the caller's lists"


def test_from_dict_fills_missing_keys_and_rejects_unknown_ones() -> None:
    assert Config.from_dict({"model": {"num_layers": 2}}) == with_changes(model__num_layers=2)
    with pytest.raises(ConfigError, match="unknown config keys extras, model.num_loops"):
        Config.from_dict({"model": {"num_loops": 2}, "extras": {}})


def test_config_summary_lists_every_section_and_the_layer_layout() -> None:
    summary = config_summary(Config())
    for section in ("model:", "moe:", "data:", "training:", "parallel:"):
        assert section in summary
    assert "experts_per_layer=[0, 8, 0, 8]" in summary and "ffn_size=1024" in summary


def test_validate_changes_nothing_and_resolve_returns_a_new_config(tmp_path: Path) -> None:
    cfg = parse_train_args(["--deepspeed_config", write_json(tmp_path, {"train_batch_size": 12})])
    before = copy.deepcopy(cfg)
    cfg.validate(world_size=2)
    assert cfg == before and cfg.training.micro_batch_size is None
    resolved = resolve(cfg, world_size=2, vocab_size=300)
    assert cfg == before  # resolve leaves its input alone
    assert (resolved.training.micro_batch_size, resolved.model.vocab_size) == (6, 300)
    assert resolved.moe == cfg.moe and resolved.moe is cfg.moe  # untouched sections are shared, not copied
    explicit = Config()
    assert resolve(explicit) == explicit  # nothing to derive: the same values


def test_choice_lists_come_from_the_modules_that_implement_them() -> None:
    from moetrain import precision
    from moetrain.data import tokenizer
    from moetrain.moe import routing_config as routing
    from moetrain.train import lr_schedule

    assert config.SCORE_FUNCS is routing.SCORE_FUNCS and config.NOISY_GATE_POLICIES is routing.NOISY_GATE_POLICIES
    assert config.DROP_POLICIES is routing.DROP_POLICIES and config.PRECISIONS is precision.PRECISIONS
    assert config.LR_DECAY_STYLES is lr_schedule.LR_DECAY_STYLES and config.TOKENIZER_TYPES is tokenizer.TOKENIZER_KINDS


def test_every_routing_field_has_a_flag_and_the_same_default() -> None:
    """MoEConfig.routing() reads each RoutingConfig field from the MoEConfig field that declares its flag, so a
    routing option added to one and not the other, or with another default, fails here."""
    from moetrain.moe import RoutingConfig

    assert MoEConfig().routing() == RoutingConfig()
    flagged = {flags.dest.split(".")[1] for flags in field_flags(("moe",))}
    renamed = {"k": "topk", "capacity_factor": "train_capacity_factor"}
    assert {renamed.get(f.name, f.name) for f in dataclasses.fields(RoutingConfig)} <= flagged
    changed = parse_train_args(["--moe-router-topk", "2", "--moe-expert-capacity-factor", "1.5",
                                "--moe-router-load-balancing-type", "aux_loss", "--moe-router-dtype", "fp64"])
    assert changed.moe.routing() == RoutingConfig(k=2, capacity_factor=1.5, load_balancing_type="aux_loss",
                                                  router_dtype="fp64")


def test_each_flag_is_declared_once_and_every_default_is_a_valid_choice() -> None:
    names = [name for flags in field_flags() for name in flags.option.flag_names()]
    assert len(names) == len(set(names))
    parser_flags = {flag for action in build_train_parser()._actions for flag in action.option_strings}
    assert parser_flags == {*names, "-h", "--help", "--deepspeed_config", "--deepspeed-config", "--deepspeed",
                            "--local_rank", "--local-rank"}
    for flags in field_flags():
        if flags.option.choices is not None:
            default = getattr(getattr(Config(), flags.dest.split(".")[0]), flags.field.name)
            assert default in flags.option.choices, flags.dest


def test_to_flags_round_trips_through_the_parser() -> None:
    cfg = with_changes(model__style="llama", model__num_layers=6, model__ffn_hidden_size=700,
                       model__tie_embeddings=False, model__norm_eps=1e-6, moe__num_experts=[4, 8, 16],
                       moe__topk=2, moe__drop_tokens=False, moe__noisy_gate_policy="RSample",
                       moe__drop_policy="probs", moe__expert_bias=True, data__data_path=["a.txt", "b.txt"],
                       data__tokenizer_type="byte", training__precision="bf16", training__save=None,
                       training__lr=3e-4, training__progress_bar=False, parallel__zero_stage=2,
                       parallel__distributed_backend="gloo", distill__enabled=True, distill__load_teacher="t",
                       distill__num_experts_teacher=[2, 2])
    flags = config.to_flags(cfg)
    assert "--no-save" in flags and "--bf16" in flags and "--untie-embeddings-and-output-weights" in flags
    assert parse_train_args(flags) == cfg
    assert config.to_flags(Config()) == []
    assert config.to_flags(cfg, ("moe",))[:4] == ["--num-experts", "4", "8", "16"]


def test_json_mappers_set_only_the_fields_the_reference_lists(tmp_path: Path) -> None:
    """A DeepSpeed key sets exactly the fields json_keys() attributes to it in docs/flags.md."""
    from moetrain.config.deepspeed import json_keys

    ds = {"optimizer": {"type": "AdamW", "params": {"betas": [0.8, 0.9]}}, "scheduler": {"type": "WarmupLR"},
          "zero_optimization": {"stage": 1, "offload_optimizer": {"device": "cpu"}}, "moe": {"enabled": False},
          "bf16": {"enabled": True}, "fp16": {"consecutive_hysteresis": True}}
    cfg = parse_train_args(["--deepspeed_config", write_json(tmp_path, ds)])
    changed = {f"{section}.{name}" for section, values in cfg.to_dict().items()
               for name, value in values.items() if value != Config().to_dict()[section][name]}
    assert changed == {"training.adam_beta1", "training.adam_beta2", "training.lr_decay_style",
                       "parallel.zero_stage", "parallel.offload_optimizer", "moe.num_experts",
                       "training.precision", "training.consecutive_hysteresis"}
    for dest in changed:
        assert json_keys(dest), dest
    assert json_keys("training.adam_beta2") == ["optimizer.params.betas"]
    assert json_keys("moe.num_experts") == ["moe.num_experts", "moe.enabled"]


def test_warmup_default_fits_any_run_length() -> None:
    """Unset, the warmup is an eighth of the run: the default 400 steps keep 50, short runs fit."""
    assert parse_train_args([]).training.warmup_iters() == 50
    for argv, warmup in ((["--train-iters", "10"], 1), (["--train-iters", "5"], 0),
                         (["--train-iters", "400", "--lr-decay-iters", "40"], 5),
                         (["--train-iters", "3", "--lr-decay-iters", "500000"], 0),
                         (["--train-iters", "10", "--lr-warmup-iters", "0"], 0)):
        cfg = parse_train_args(argv)
        cfg.validate()
        assert cfg.training.warmup_iters() == warmup, argv


def test_max_position_embeddings_is_its_own_setting() -> None:
    cfg = parse_train_args(["--seq-length", "32", "--max-position-embeddings", "64"])
    assert (cfg.model.seq_length, cfg.model.positions()) == (32, 64)
    assert parse_train_args(["--seq-length", "32"]).model.positions() == 32  # unset: the sequence length
    assert Config.from_dict({"model": {"seq_length": 16}}).model.positions() == 16  # a config saved before the field
    with pytest.raises(ConfigError, match="--max-position-embeddings 16 is shorter than --seq-length 32"):
        parse_train_args(["--seq-length", "32", "--max-position-embeddings", "16"]).validate()


def test_teacher_flags_of_the_mos_recipe() -> None:
    cfg = parse_train_args(["--mos", "--load-teacher", "t", "--teacher-forward", "--teacher-model-parallel-size", "1"])
    assert cfg.distill.enabled and cfg.distill.teacher_model_parallel_size == 1
    assert parse_train_args(["--teacher-forward", "--load-teacher", "t"]).distill.enabled
    parse_train_args(["--mos", "--load-teacher", "t", "--teacher-model-parallel-size", "2",
                      "--tensor-parallel-size", "2"]).validate(2)
    with pytest.raises(ConfigError, match="--teacher-model-parallel-size 4: moetrain shards the teacher like the "
                                          "student, over --tensor-parallel-size 2; use 2 or 1"):
        parse_train_args(["--mos", "--load-teacher", "t", "--teacher-model-parallel-size", "4",
                          "--tensor-parallel-size", "2"]).validate(2)
    with pytest.raises(ConfigError, match="--teacher-model-parallel-size is given without --mos or --kd"):
        parse_train_args(["--teacher-model-parallel-size", "1"]).validate()


def test_deepspeed_launcher_local_rank_is_accepted() -> None:
    for flag in ("--local_rank=3", "--local-rank=3"):
        assert parse_train_args([flag, "--num-layers", "2"]).model.num_layers == 2


def test_a_five_step_deepspeed_json_run_needs_no_warmup_flag(tmp_path) -> None:
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"train_batch_size": 8, "gradient_accumulation_steps": 1}))
    cfg = parse_train_args(["--deepspeed_config", str(path), "--train-iters", "5"])
    cfg.validate()
    assert cfg.training.warmup_iters() == 0


@pytest.mark.parametrize("argv,message", [
    (["--lr", "inf"], "--lr must be a finite number, got inf"),
    (["--moe-aux-loss-coeff", "nan"], "--moe-loss-coeff must be a finite number, got nan"),
    (["--seed", "-1"], "--seed must be between 0 and 2**32 - 1, got -1"),
], ids=["lr-inf", "coeff-nan", "seed"])
def test_nonsense_numbers_are_refused_naming_the_flag(argv, message):
    with pytest.raises(ConfigError) as error:
        parse_train_args(argv).validate()
    assert str(error.value) == message


def test_save_naming_a_file_is_refused_naming_it(tmp_path):
    (tmp_path / "afile").write_text("")
    with pytest.raises(ConfigError, match=f"^--save {tmp_path / 'afile'} is a file, not a directory"):
        parse_train_args(["--save", str(tmp_path / "afile")]).validate()
