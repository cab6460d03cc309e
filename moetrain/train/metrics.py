"""Training metrics: metrics.jsonl (schema in docs/DESIGN.md), optional TensorBoard, console lines."""

from __future__ import annotations

import json
import math
import numbers
import os
import warnings
from typing import Any

METRICS_FILE = "metrics.jsonl"
RECORD_TYPES = ("train", "eval", "rewind")
LAYER_SCALARS = ("drop_fraction", "max_over_min", "experts_used", "router_entropy", "dead_experts", "collapsed",
                 "low_entropy")


def _to_json(value: Any, where: str) -> Any:
    """JSON-ready copy of ``value``; inf / NaN become null because JSON has no such numbers."""
    if value is None or isinstance(value, (str, bool)):
        return value
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(key): _to_json(item, f"{where}[{key!r}]") for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_to_json(item, f"{where}[{index}]") for index, item in enumerate(value)]
    raise TypeError(f"metrics {where} is a {type(value).__name__}; log plain numbers (call .item() on tensors)")


def _open_summary_writer(tensorboard_dir: str):
    """A TensorBoard SummaryWriter, or None with one warning when tensorboard is not installed."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        warnings.warn("TensorBoard logging is off because tensorboard is not installed; "
                      "pip install tensorboard to enable it (metrics.jsonl is still written)")
        return None
    return SummaryWriter(log_dir=tensorboard_dir)


def _ends_mid_line(path: str) -> bool:
    """Whether a crash mid-write left ``path`` with an unterminated last line."""
    if not os.path.isfile(path) or os.path.getsize(path) == 0:
        return False
    with open(path, "rb") as f:
        f.seek(-1, os.SEEK_END)
        return f.read(1) != b"\n"


def _drop_records_after(path: str, step: int) -> None:
    """Remove the records of steps after `step` (logged by a run that crashed past its last checkpoint, which
    the resumed run logs again), rewriting the file atomically; lines that are no record stay."""
    if not os.path.isfile(path):
        return
    with open(path, encoding="utf-8") as f:
        lines = f.readlines()

    def after(line: str) -> bool:
        try:
            record = json.loads(line)
        except ValueError:
            return False
        return isinstance(record, dict) and isinstance(record.get("step"), int) and record["step"] > step
    kept = [line for line in lines if not after(line)]
    if len(kept) == len(lines):
        return
    tmp_path = path + ".tmp"
    with open(tmp_path, "w", encoding="utf-8") as f:
        f.writelines(kept)
    os.replace(tmp_path, path)


class MetricsLogger:
    """Append records to ``save_dir/metrics.jsonl`` (flushed per record) and mirror scalars to TensorBoard.

    ``save_dir=None`` disables the file (e.g. on non-zero ranks). TensorBoard tags are
    ``{type}/{key}`` (an ``eval_`` prefix is dropped: ``eval/loss``) plus
    ``{type}/moe_layer_{i}/{stat}`` for each stat of LAYER_SCALARS a layer has (alarms as 0 / 1).
    """

    def __init__(self, save_dir: str | None, tensorboard_dir: str | None = None, resumed_at: int | None = None):
        """`resumed_at`: the step a resumed run continues from; records past it are dropped first."""
        self.path = None
        self._file = None
        if save_dir is not None:
            os.makedirs(save_dir, exist_ok=True)
            self.path = os.path.join(save_dir, METRICS_FILE)
            if resumed_at is not None:
                _drop_records_after(self.path, resumed_at)
            needs_newline = _ends_mid_line(self.path)
            self._file = open(self.path, "a", encoding="utf-8")
            if needs_newline:
                self._file.write("\n")
        self._writer = _open_summary_writer(tensorboard_dir) if tensorboard_dir is not None else None
        self.sinks: list = []  # more destinations of every JSON-ready record: log(record), close() (W&B)

    def log(self, record: dict[str, Any]) -> None:
        """Write one record; it needs "type" ("train" or "eval") and an integer "step"."""
        if record.get("type") not in RECORD_TYPES or not isinstance(record.get("step"), numbers.Integral):
            raise ValueError(f"metrics record needs type in {RECORD_TYPES} and an integer step; "
                             f"got type={record.get('type')!r}, step={record.get('step')!r}")
        ready = _to_json(record, "record")
        line = json.dumps(ready, allow_nan=False)
        for sink in self.sinks:
            sink.log(ready)
        if self._file is not None:
            try:
                self._file.write(line + "\n")
                self._file.flush()
            except OSError as error:  # a full disk: name the file (a write's error does not)
                raise OSError(error.errno, error.strerror, self.path) from None
        if self._writer is not None:
            self._write_scalars(record)

    def _write_scalars(self, record: dict[str, Any]) -> None:
        kind, step = record["type"], int(record["step"])
        for key, value in record.items():
            if key in ("type", "step") or isinstance(value, bool) or not isinstance(value, numbers.Real):
                continue
            name = key.removeprefix(f"{kind}_")
            self._writer.add_scalar(f"{kind}/{name}", float(value), step)
        for layer in record.get("moe_layers") or []:
            for stat in LAYER_SCALARS:
                if isinstance(layer.get(stat), numbers.Real):
                    self._writer.add_scalar(f"{kind}/moe_layer_{layer['layer']}/{stat}", float(layer[stat]), step)

    def close(self) -> None:
        for sink in self.sinks:
            sink.close()
        self.sinks = []
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._writer is not None:
            self._writer.close()
            self._writer = None


def read_metrics(path: str) -> list[dict[str, Any]]:
    """All records of a metrics.jsonl, in file order; unparsable lines (a crash mid-write) are skipped."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"metrics file {path!r} not found; point at the save directory of a training run")
    records, bad_lines = [], []
    with open(path, encoding="utf-8") as f:
        for line_number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                bad_lines.append(line_number)
    if bad_lines:
        warnings.warn(f"{path}: skipped {len(bad_lines)} unparsable line(s), first at line {bad_lines[0]}")
    return records


def routing_summary(moe_layers: list[dict[str, Any]]) -> dict[str, float]:
    """Across MoE layers: worst max/min load, mean drop fraction, mean fraction of experts used.

    Empty for a dense model. A null max_over_min (inf in JSON: some expert got no tokens) counts as inf.
    """
    if not moe_layers:
        return {}
    worst = max(math.inf if layer["max_over_min"] is None else layer["max_over_min"] for layer in moe_layers)
    return {
        "max_over_min": worst,
        "drop_fraction": sum(layer["drop_fraction"] for layer in moe_layers) / len(moe_layers),
        "experts_used": sum(layer["experts_used"] for layer in moe_layers) / len(moe_layers),
    }


def _fmt(value: float | None, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def format_train_line(record: dict[str, Any]) -> str:
    """``Step 100 | Loss: 3.2415 | Aux Loss: 0.0234 | LR: 3.00e-04 | 12,345 tok/s | load max/min 1.8 | ...``;
    with load-balancing types ``Aux Loss: 0.0234 (aux_loss 0.0200, seq_aux_loss 0.0136) | Z Loss: 1.2000``."""
    parts = [
        f"Step {record['step']}",
        f"Loss: {_fmt(record['loss'], '.4f')}",
        f"Aux Loss: {_fmt(record['aux_loss'], '.4f')}",
    ]
    balance = [(key.removeprefix("balance/"), value) for key, value in record.items() if key.startswith("balance/")]
    if balance:  # Megatron's load-balancing types, each on its own, and the z-loss
        parts[-1] += " (" + ", ".join(f"{name} {_fmt(value, '.4f')}" for name, value in balance) + ")"
        parts.append(f"Z Loss: {_fmt(record.get('z_loss'), '.4f')}")
    if record.get("kd_loss") is not None:  # distillation runs, until --kd-stop-iter
        parts.append(f"KD Loss: {record['kd_loss']:.4f}")
    parts.append(f"LR: {_fmt(record['lr'], '.2e')}")
    if record.get("tokens_per_s") is not None:
        parts.append(f"{record['tokens_per_s']:,.0f} tok/s")
    summary = routing_summary(record.get("moe_layers") or [])
    if summary:
        parts += [
            f"load max/min {summary['max_over_min']:.1f}",
            f"drop {100 * summary['drop_fraction']:.1f}%",
            f"experts used {100 * summary['experts_used']:.0f}%",
        ]
    return " | ".join(parts)


def format_eval_line(record: dict[str, Any]) -> str:
    """``Step 100 | Eval Loss: 3.1234 | Eval PPL: 22.80 | drop 0.4%`` (drop omitted for a dense model)."""
    parts = [
        f"Step {record['step']}",
        f"Eval Loss: {_fmt(record['eval_loss'], '.4f')}",
        f"Eval PPL: {_fmt(record['eval_ppl'], '.2f')}",
    ]
    if record.get("eval_drop_fraction") is not None:
        parts.append(f"drop {100 * record['eval_drop_fraction']:.1f}%")
    return " | ".join(parts)
