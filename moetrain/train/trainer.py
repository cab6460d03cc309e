"""The training loop: one screen per step, components from their own modules.

Loss = LM loss + moe_loss_coeff * sum(l_aux) + z_loss_coeff * sum(z-loss), each logged on its own.
Checkpoints carry everything a resumed run needs to continue bit for bit: model, optimizer, loss
scaler, RNG states, data position and iteration (the LR schedule is a function of the iteration).
"""

from __future__ import annotations

import contextlib
import math
import os
import random
import time
from dataclasses import dataclass

import numpy as np
import torch
from tqdm import tqdm

from moetrain.config import Config, ConfigError
from moetrain.data import load_training_data
from moetrain.model import GPT
from moetrain.plot import plot_metrics
from moetrain.train.checkpoint import capture_rng_state, load_checkpoint, restore_rng_state, save_checkpoint
from moetrain.train.lr_schedule import LRSchedule
from moetrain.train.metrics import MetricsLogger, format_eval_line, format_train_line
from moetrain.train.optimizer import build_optimizer
from moetrain.train.precision import LossScaler, autocast


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("--device cuda was given but no CUDA device is available; use --device cpu")
    return torch.device(name)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@dataclass
class TrainResult:
    iteration: int
    final_eval_loss: float | None
    save_dir: str | None
    losses: list[float]  # total loss of every optimizer step this run took (skipped steps: nan)


class Trainer:
    """Owns the model, optimizer and data of one run; `fit()` trains to `train_iters`."""

    def __init__(self, cfg: Config, *, quiet: bool = False) -> None:
        cfg.validate()
        self.cfg, self.quiet = cfg, quiet
        tc = cfg.training
        self.device = resolve_device(tc.device)
        seed_everything(tc.seed)
        self.tokenizer, self.train_data, self.valid_data = load_training_data(
            cfg.data.data_path, tokenizer_type=cfg.data.tokenizer_type, vocab_file=cfg.data.vocab_file,
            merge_file=cfg.data.merge_file, vocab_size=cfg.data.vocab_size,
            seq_length=cfg.model.seq_length, split=cfg.data.split, seed=tc.seed,
            cache_dir=cfg.data.cache_dir)
        cfg.model.vocab_size = self.tokenizer.vocab_size
        self.model = GPT(cfg.model, cfg.moe).to(self.device)
        self.optimizer = build_optimizer(self.model, lr=tc.lr, weight_decay=tc.weight_decay,
                                         betas=(tc.adam_beta1, tc.adam_beta2), eps=tc.adam_eps)
        self.schedule = LRSchedule(tc.lr, tc.min_lr, tc.lr_warmup_iters,
                                   tc.lr_decay_iters or tc.train_iters, tc.lr_decay_style)
        self.scaler = LossScaler.from_config(
            tc.loss_scale, tc.initial_scale_power, tc.loss_scale_window, tc.hysteresis,
            tc.min_loss_scale, tc.consecutive_hysteresis) if tc.precision == "fp16" else None
        self.accumulation = cfg.accumulation_steps(world_size=1)
        self.iteration = 0
        if tc.load:
            self._resume(tc.load)
        self.metrics = MetricsLogger(tc.save, tc.tensorboard_dir)

    # -- checkpoints ------------------------------------------------------------------------
    def _resume(self, load_dir: str) -> None:
        ckpt = load_checkpoint(load_dir)
        try:
            self.model.load_state_dict(ckpt.model_state)
        except RuntimeError as error:
            detail = next((line.strip() for line in str(error).splitlines()[1:] if line.strip()), str(error))
            raise ConfigError(f"checkpoint {ckpt.path} does not fit this model ({detail}); resume with the "
                              "model and MoE flags it was trained with") from None
        self.optimizer.load_state_dict(ckpt.optimizer_state)
        extra = ckpt.extra
        if self.scaler is not None and "loss_scaler" in extra:
            self.scaler.load_state_dict(extra["loss_scaler"])
        self.train_data.load_state_dict(extra["data"])
        restore_rng_state(extra["rng"])
        self.iteration = ckpt.iteration
        self._print(f"resumed from {ckpt.path} at iteration {self.iteration}")

    def save(self) -> str | None:
        save_dir = self.cfg.training.save
        if not save_dir:
            return None
        extra = {"rng": capture_rng_state(), "data": self.train_data.state_dict(),
                 "config": self.cfg.to_dict()}
        if self.scaler is not None:
            extra["loss_scaler"] = self.scaler.state_dict()
        tokenizer_path = os.path.join(save_dir, "tokenizer.json")
        if not os.path.exists(tokenizer_path):
            os.makedirs(save_dir, exist_ok=True)
            self.tokenizer.save(tokenizer_path)
        return save_checkpoint(save_dir, self.iteration, model_state=self.model.state_dict(),
                               optimizer_state=self.optimizer.state_dict(), extra=extra,
                               keep_last=self.cfg.training.keep_last_checkpoints,
                               files={"tokenizer.json": tokenizer_path})

    # -- one optimizer step -----------------------------------------------------------------
    def train_step(self) -> dict:
        """Accumulate gradients over the micro-batches, then clip and step (or skip on overflow)."""
        tc, moe = self.cfg.training, self.cfg.moe
        lr = self.schedule.apply(self.optimizer, self.iteration)
        self.model.train()
        parts = []
        for _ in range(self.accumulation):
            inputs, targets = (t.to(self.device) for t in self.train_data.next_batch(tc.micro_batch_size))
            with autocast(self.device.type, tc.precision):
                out = self.model(inputs, targets)
            loss = out.lm_loss + moe.aux_loss_coeff * out.aux_loss + moe.z_loss_coeff * out.z_loss
            scaled = loss / self.accumulation
            (self.scaler.scale(scaled) if self.scaler else scaled).backward()
            parts.append(torch.stack([loss, out.lm_loss, out.aux_loss, out.z_loss]).detach().float())
        # one host sync per step (not four per micro-batch) for the logged values
        means = (torch.stack(parts).sum(0) / self.accumulation).tolist()
        sums = dict(zip(("loss", "lm_loss", "aux_loss", "z_loss"), means))
        params = [p for p in self.model.parameters() if p.grad is not None]
        overflow = self.scaler.unscale_(params) if self.scaler else False
        grad_norm = float("nan")
        if not overflow:
            max_norm = tc.clip_grad if tc.clip_grad > 0 else math.inf
            grad_norm = float(torch.nn.utils.clip_grad_norm_(params, max_norm))
            self.optimizer.step()
            self.model.update_expert_biases()
        if self.scaler:
            self.scaler.update(overflow)
        self.optimizer.zero_grad(set_to_none=True)
        self.iteration += 1
        return {**sums, "lr": lr, "grad_norm": grad_norm, "skipped": overflow}

    @torch.no_grad()
    def evaluate(self) -> dict | None:
        """Held-out loss and perplexity in eval mode (eval capacity factor), with the drop rate."""
        if self.valid_data is None:
            return None
        tc = self.cfg.training
        self.model.eval()
        losses = []
        for inputs, targets in self.valid_data.eval_batches(tc.micro_batch_size, tc.eval_iters):
            with autocast(self.device.type, tc.precision):
                out = self.model(inputs.to(self.device), targets.to(self.device))
            losses.append(float(out.lm_loss))
        self.model.train()
        eval_loss = sum(losses) / len(losses)
        stats = [m.eval_routing_stats.summary(reset=True) for _, m in self.model.moe_layers()]
        drop = sum(s["drop_fraction"] for s in stats) / len(stats) if stats else 0.0
        return {"type": "eval", "step": self.iteration, "eval_loss": eval_loss,
                "eval_ppl": math.exp(min(eval_loss, 50.0)), "eval_drop_fraction": drop}

    # -- the loop -----------------------------------------------------------------------------
    def fit(self) -> TrainResult:
        tc = self.cfg.training
        self._print_startup()
        tokens_per_step = tc.micro_batch_size * self.accumulation * self.cfg.model.seq_length
        losses: list[float] = []
        window_start, window_steps = time.perf_counter(), 0
        bar = tqdm(total=tc.train_iters, initial=self.iteration, disable=self.quiet or not tc.progress_bar,
                   desc="train", unit="step", dynamic_ncols=True)
        last_eval = None
        with contextlib.closing(bar), contextlib.closing(self.metrics):
            while self.iteration < tc.train_iters:
                step = self.train_step()
                losses.append(float("nan") if step["skipped"] else step["loss"])
                window_steps += 1
                bar.update(1)
                if self.iteration % tc.log_interval == 0 or self.iteration == tc.train_iters:
                    elapsed = time.perf_counter() - window_start
                    record = self._train_record(step, window_steps * tokens_per_step / elapsed)
                    self.metrics.log(record)
                    self._print(format_train_line(record), bar)
                    window_start, window_steps = time.perf_counter(), 0
                if tc.eval_interval and self.iteration % tc.eval_interval == 0 \
                        and self.iteration < tc.train_iters:
                    last_eval = self._log_eval(bar)
                if tc.save_interval and self.iteration % tc.save_interval == 0 \
                        and self.iteration < tc.train_iters:
                    self.save()
            last_eval = self._log_eval(bar) or last_eval
            path = self.save()
        self._print_finish(path)
        return TrainResult(self.iteration, last_eval["eval_loss"] if last_eval else None, tc.save, losses)

    def _train_record(self, step: dict, tokens_per_s: float) -> dict:
        layers = [{"layer": i, **m.routing_stats.summary(reset=True)} for i, m in self.model.moe_layers()]
        return {"type": "train", "step": self.iteration, "loss": step["loss"], "lm_loss": step["lm_loss"],
                "aux_loss": step["aux_loss"], "z_loss": step["z_loss"], "lr": step["lr"],
                "grad_norm": step["grad_norm"], "tokens_per_s": tokens_per_s,
                "loss_scale": self.scaler.loss_scale if self.scaler else None,
                "skipped_steps": self.scaler.skipped_steps if self.scaler else 0, "moe_layers": layers}

    def _log_eval(self, bar) -> dict | None:
        record = self.evaluate()
        if record is not None:
            self.metrics.log(record)
            self._print(format_eval_line(record), bar)
        return record

    def _print(self, line: str, bar=None) -> None:
        if self.quiet:
            return
        (bar.write if bar is not None else print)(line)

    def _print_startup(self) -> None:
        counts = self.model.parameter_counts()
        experts = [e for e in self.cfg.experts_per_layer() if e]
        layout = f"{len(experts)} MoE layers with experts {experts}, top-{self.cfg.moe.topk}" if experts \
            else "dense"
        self._print(f"model: {self.cfg.model.style} style, {self.cfg.model.num_layers} layers, hidden "
                    f"{self.cfg.model.hidden_size}, {layout}")
        self._print(f"parameters: {counts['total'] / 1e6:.2f}M total, {counts['active'] / 1e6:.2f}M active "
                    f"per token | vocab {self.tokenizer.vocab_size} | train tokens "
                    f"{self.train_data.num_tokens:,} | device {self.device} | {self.cfg.training.precision}")

    def _print_finish(self, path: str | None) -> None:
        if path is None:
            return
        save_dir = self.cfg.training.save
        plots = plot_metrics(os.path.join(save_dir, "metrics.jsonl"), save_dir)
        self._print(f"checkpoint: {path}")
        self._print(f"metrics: {os.path.join(save_dir, 'metrics.jsonl')}; plots: {', '.join(plots)}")
        self._print(f"sample from it: moetrain generate --load {save_dir} --prompt \"def \"")


def train(cfg: Config, *, quiet: bool = False) -> TrainResult:
    return Trainer(cfg, quiet=quiet).fit()

