"""Training components: optimizer, LR schedule, mixed precision, checkpoints, metrics (and the trainer loop)."""

from moetrain.train.checkpoint import (
    Checkpoint,
    CheckpointError,
    capture_rng_state,
    list_checkpoints,
    load_checkpoint,
    restore_rng_state,
    save_checkpoint,
)
from moetrain.train.lr_schedule import LRSchedule
from moetrain.train.metrics import (
    MetricsLogger,
    format_eval_line,
    format_train_line,
    read_metrics,
    routing_summary,
)
from moetrain.train.optimizer import build_optimizer
from moetrain.train.precision import LossScaler, autocast

__all__ = [
    "Checkpoint",
    "CheckpointError",
    "LRSchedule",
    "LossScaler",
    "MetricsLogger",
    "autocast",
    "build_optimizer",
    "capture_rng_state",
    "format_eval_line",
    "format_train_line",
    "list_checkpoints",
    "load_checkpoint",
    "read_metrics",
    "restore_rng_state",
    "routing_summary",
    "save_checkpoint",
]
