"""Training components: optimizer, LR schedule, fp16 loss scaling, metrics, distillation, and the trainer loop
(checkpoints: moetrain.checkpoint; autocast: moetrain.precision)."""

from moetrain.train.loss_scaler import LossScaler
from moetrain.train.lr_schedule import LRSchedule
from moetrain.train.metrics import (
    MetricsLogger,
    format_eval_line,
    format_train_line,
    read_metrics,
    routing_summary,
)
from moetrain.train.optimizer import build_optimizer

__all__ = [
    "LRSchedule",
    "LossScaler",
    "MetricsLogger",
    "build_optimizer",
    "format_eval_line",
    "format_train_line",
    "read_metrics",
    "routing_summary",
]
