"""Weights & Biases logging (--wandb-project, --wandb-exp-name, --wandb-save-dir, --wandb-entity; Megatron's
flags), rank 0 only, off the step's critical path.

Every metrics.jsonl record becomes one W&B history row under the same names, prefixed by its type
(`train/loss`, `train/moe_layers`, `eval/eval_loss`, `rewind/diverged_at`; each type's `{type}/step` is its
x-axis), so the run's history reads back as metrics.jsonl. Charts also get each MoE layer's scalars as
`train/moe_layer_{i}/{stat}` (TensorBoard's tags), and each evaluation an image of the expert-load heatmap so
far (`eval/expert_load`). The config is logged once, at init.

The trainer only puts records on a queue: a worker thread starts the run (wandb.init takes seconds), logs,
draws the heatmaps and finishes the run at close, so a slow network or disk never delays a step. A failure
in the worker is printed once and turns W&B logging off; training goes on.
"""

from __future__ import annotations

import os
import queue
import threading
from typing import Any

from moetrain.config import Config
from moetrain.train.metrics import LAYER_SCALARS


def wandb_row(record: dict[str, Any]) -> dict[str, Any]:
    """The history row of one JSON-ready metrics record: its fields under `{type}/`, then the per-layer charts."""
    kind = record["type"]
    row = {f"{kind}/{key}": value for key, value in record.items() if key != "type"}
    for layer in record.get("moe_layers") or []:
        for stat in LAYER_SCALARS:
            if layer.get(stat) is not None:
                row[f"{kind}/moe_layer_{layer['layer']}/{stat}"] = float(layer[stat])
    return row


class WandbLogger:
    """A metrics sink (MetricsLogger.sinks) writing to a W&B run from a worker thread."""

    def __init__(self, cfg: Config) -> None:
        try:
            import wandb  # noqa: F401  (fail here, at start, when the extra is not installed)
        except ImportError as error:
            raise ValueError('--wandb-project needs wandb: pip install "moetrain[wandb]"') from error
        mc = cfg.monitor
        save_dir = mc.wandb_save_dir or os.path.join(cfg.training.save or ".", "wandb")
        os.makedirs(save_dir, exist_ok=True)
        self.init_args = dict(project=mc.wandb_project, name=mc.wandb_exp_name, entity=mc.wandb_entity,
                              dir=save_dir, config=cfg.to_dict())
        self.train_records: list[dict[str, Any]] = []  # for the heatmaps (the worker's alone)
        self.queue: queue.Queue = queue.Queue()
        self.worker = threading.Thread(target=self._work, name="wandb", daemon=True)
        self.worker.start()

    def log(self, record: dict[str, Any]) -> None:
        """Queue one JSON-ready record (returns at once)."""
        self.queue.put(record)

    def close(self) -> None:
        """Log what is queued, finish the run, wait for the worker."""
        self.queue.put(None)
        self.worker.join()

    def _work(self) -> None:
        import wandb

        run = None
        try:
            run = wandb.init(**self.init_args)
            for kind in ("train", "eval", "rewind"):
                run.define_metric(f"{kind}/step")
                run.define_metric(f"{kind}/*", step_metric=f"{kind}/step")
            while (record := self.queue.get()) is not None:
                row = wandb_row(record)
                if record["type"] == "train":
                    self.train_records.append(record)
                elif record["type"] == "eval" and self.train_records:
                    row["eval/expert_load"] = self._heatmap(wandb, record["step"])
                run.log(row)
        except Exception as error:  # noqa: BLE001  (W&B must never stop training)
            print(f"warning: W&B logging stopped: {type(error).__name__}: {error}")
            while self.queue.get() is not None:  # drain, so close() returns
                pass
        finally:
            if run is not None:
                run.finish()

    def _heatmap(self, wandb, step: int):
        """The expert-load heatmap of the train records so far, as a wandb.Image (its PNG kept beside W&B's
        files: W&B reads it when it uploads)."""
        from moetrain.plot import expert_load_png  # matplotlib loads only in a run that logs to W&B

        path = os.path.join(self.init_args["dir"], f"expert_load_{step:08d}.png")
        expert_load_png(self.train_records, path)
        return wandb.Image(path)


def wandb_sinks(cfg: Config, rank: int) -> list[WandbLogger]:
    """A WandbLogger on rank 0 when --wandb-project is given, else none."""
    return [WandbLogger(cfg)] if cfg.monitor.wandb_project and rank == 0 else []
