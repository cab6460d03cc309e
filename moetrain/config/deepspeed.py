"""DeepSpeed JSON (``--deepspeed_config``) onto Config fields: which keys moetrain reads and how.

Precedence is applied by the parser: dataclass defaults < this JSON < flags given on the command line.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from moetrain.config.option import ConfigError, check
from moetrain.config.sections import NOISY_GATE_POLICIES


class JsonSetting(NamedTuple):
    value: Any
    source: str  # 'key.path = value', for messages


@dataclass(frozen=True)
class FractionOfLr:
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


@dataclass(frozen=True)
class _To:
    """Map a key's value, converted, onto one Config field."""
    dest: str
    convert: Callable[[Any], Any]

    @property
    def dests(self) -> tuple[str, ...]:
        return (self.dest,)

    def __call__(self, raw: Any) -> dict[str, Any]:
        return {self.dest: self.convert(raw)}


def _to(dest: str, convert: Callable[[Any], Any]) -> _Mapper:
    return _To(dest, convert)


@dataclass(frozen=True)
class _WhenTrue:
    """Set one Config field to `value` when the key is true (``fp16.enabled``)."""
    dest: str
    value: Any

    @property
    def dests(self) -> tuple[str, ...]:
        return (self.dest,)

    def __call__(self, raw: Any) -> dict[str, Any]:
        return {self.dest: self.value} if _json_bool(raw) else {}


def _when_true(dest: str, value: Any) -> _Mapper:
    return _WhenTrue(dest, value)


def _zero_only(reason: str) -> _Mapper:
    def mapper(raw: Any) -> dict[str, Any]:
        if _json_float(raw) != 0:
            raise _NotMappable(reason)
        return {}
    return mapper


def _sets(*dests: str) -> Callable[[_Mapper], _Mapper]:
    """Declare the Config fields a hand-written mapper sets, for the flag reference."""
    def declare(mapper: _Mapper) -> _Mapper:
        mapper.dests = dests
        return mapper
    return declare


def _optimizer_type(raw: Any) -> dict[str, Any]:
    if not isinstance(raw, str) or raw.lower() not in ("adam", "adamw"):
        raise ValueError("must be Adam or AdamW (moetrain trains with AdamW)")
    return {}


@_sets("training.adam_beta1", "training.adam_beta2")
def _betas(raw: Any) -> dict[str, Any]:
    if not isinstance(raw, list) or len(raw) != 2:
        raise ValueError("must be a list of two numbers")
    return {"training.adam_beta1": _json_float(raw[0]), "training.adam_beta2": _json_float(raw[1])}


_SCHEDULER_STYLES = {"WarmupLR": "constant", "WarmupDecayLR": "linear", "WarmupCosineLR": "cosine"}


@_sets("training.lr_decay_style")
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


def _offload_device(dest: str) -> _Mapper:
    """zero_optimization.offload_<what>.device: 'cpu' sets `dest`, 'none' clears it."""
    @_sets(dest)
    def mapper(raw: Any) -> dict[str, Any]:
        if raw not in ("cpu", "none"):
            raise ValueError("must be 'cpu' or 'none' (moetrain cannot offload to NVMe)")
        return {dest: raw == "cpu"}
    return mapper


@_sets("moe.num_experts")
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
    "zero_optimization.offload_optimizer.device": _offload_device("parallel.offload_optimizer"),
    "zero_optimization.offload_param.device": _offload_device("parallel.offload_param"),
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
        "cos_min_ratio": _to("training.min_lr", lambda raw: FractionOfLr(_json_float(raw))),
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


def read_deepspeed_config(json_path: str) -> dict[str, JsonSetting]:
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
    check(isinstance(root, dict), f"DeepSpeed config {json_path} must hold a JSON object")

    mappers = dict(_DEEPSPEED_KEYS)
    scheduler_type = _lookup(root, "scheduler.type", json_path)
    for name, mapper in _SCHEDULER_PARAMS.get(scheduler_type if isinstance(scheduler_type, str) else "", {}).items():
        mappers[f"scheduler.params.{name}"] = mapper
    enabled = {name for name in ("fp16", "bf16", "bfloat16") if _lookup(root, f"{name}.enabled", json_path) is True}
    check("fp16" not in enabled or len(enabled) == 1,
           f"{json_path} enables both fp16 and bf16; enable only one")

    settings: dict[str, JsonSetting] = {}
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
            settings[dest] = JsonSetting(value, f"{key} = {json.dumps(raw)}")
    if not_understood:
        warnings.warn(f"{json_path}: not understood, ignored: {', '.join(not_understood)}", stacklevel=3)
    return settings



def json_keys(dest: str) -> list[str]:
    """The DeepSpeed JSON keys that set Config field `dest` ("section.field") directly, for the flag reference."""
    mappers = [*_DEEPSPEED_KEYS.items()]
    mappers += [(f"scheduler.params.{name}", mapper) for params in _SCHEDULER_PARAMS.values()
                for name, mapper in params.items()]
    return list(dict.fromkeys(key for key, mapper in mappers if dest in getattr(mapper, "dests", ())))
