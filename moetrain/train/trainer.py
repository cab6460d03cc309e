"""The training loop: one screen per step, components from their own modules.

Loss = LM loss + moe_loss_coeff * sum(l_aux) + z_loss_coeff * sum(z-loss), each logged on its own.
Checkpoints carry everything a resumed run needs to continue bit for bit: model, optimizer, loss
scaler, RNG states, data position and iteration (the LR schedule is a function of the iteration).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import random
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from moetrain.config import Config, ConfigError
from moetrain.data import load_training_data
from moetrain.model import GPT
from moetrain.parallel.checkpoint import (
    CheckpointReader,
    load_into,
    optimizer_param_names,
    rank_rng_state,
    save_sharded,
)
from moetrain.parallel.data_parallel import (
    all_reduce_gradients,
    clip_gradients,
    global_grad_norm,
)
from moetrain.parallel.mesh import init_parallel
from moetrain.parallel.parallelize import (
    parallelize,
    sync_expert_load,
    sync_routing_stats,
)
from moetrain.parallel.pipeline import (
    PipelineRunner,
    all_reduce_tied_embedding_grads,
    embedding_group,
    split_for_pipeline,
    tied_embedding_params,
)
from moetrain.parallel.zero import ZeroOptimizer
from moetrain.plot import plot_metrics
from moetrain.train.checkpoint import (
    capture_rng_state,
    resolve_checkpoint_dir,
    restore_rng_state,
    save_checkpoint,
)
from moetrain.train.distill import Distiller
from moetrain.train.host_memory import keep_freed_memory
from moetrain.train.lr_schedule import LRSchedule
from moetrain.train.metrics import MetricsLogger, format_eval_line, format_train_line
from moetrain.train.optimizer import build_optimizer
from moetrain.train.precision import LossScaler, autocast


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("--device cuda was given but no CUDA device is available; use --device cpu")
    if name == "cuda" and "LOCAL_RANK" in os.environ:  # torchrun: one GPU per local rank
        return torch.device("cuda", int(os.environ["LOCAL_RANK"]))
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
        cfg.validate(int(os.environ.get("WORLD_SIZE", "1")))  # before joining: bad flags fail at once
        tc = cfg.training
        self.device = resolve_device(tc.device)
        if self.device.type == "cpu":
            keep_freed_memory()  # per-step activations and gradients reuse pages, not page faults
        self.parallel = init_parallel(cfg.parallel, self.device.type)
        self.cfg, self.quiet = cfg, quiet or self.parallel.rank != 0
        seed_everything(tc.seed)
        with self._rank_zero_first():  # one rank builds the tokenizer and token caches
            self.tokenizer, self.train_data, self.valid_data = load_training_data(
                cfg.data.data_path, tokenizer_type=cfg.data.tokenizer_type, vocab_file=cfg.data.vocab_file,
                merge_file=cfg.data.merge_file, tokenizer_model=cfg.data.tokenizer_model,
                vocab_size=cfg.data.vocab_size, seq_length=cfg.model.seq_length, split=cfg.data.split, seed=tc.seed,
                cache_dir=cfg.data.cache_dir, text_key=cfg.data.json_keys, train_data_path=cfg.data.train_data_path,
                valid_data_path=cfg.data.valid_data_path)
        cfg.model.vocab_size = self.tokenizer.vocab_size
        model = GPT(cfg.model, cfg.moe)  # whole, from the same seed on every rank; then sharded
        self.param_counts = model.parameter_counts()
        self.distiller = Distiller(cfg, self.tokenizer, self.device, log=self._print) if cfg.distill.enabled else None
        if self.distiller is not None:
            if cfg.distill.student_init_from_teacher and not tc.load:
                self.distiller.init_student(model)  # whole models, before either is sharded
            heads = self.distiller.teacher_cfg.model.num_attention_heads
            if heads % self.parallel.tp:
                raise ConfigError(f"the teacher's {heads} attention heads do not split over --tensor-parallel-size "
                                  f"{self.parallel.tp}; use a size that divides both models' head counts")
            parallelize(self.distiller.teacher, self.parallel)  # the teacher is sharded as the student is
        if self.parallel.pp > 1:
            model = split_for_pipeline(model, self.parallel.pp, self.parallel.pp_rank)
        self.grad_specs = parallelize(model, self.parallel)
        self.embedding_group = embedding_group(self.parallel)
        for param in tied_embedding_params(model):  # one weight, held by the first and the last stage
            spec = self.grad_specs[param]
            self.grad_specs[param] = dataclasses.replace(spec, copies=2 * spec.copies)
        self.model = model.to(self.device)
        self.optimizer = build_optimizer(self.model, lr=tc.lr, weight_decay=tc.weight_decay,
                                         betas=(tc.adam_beta1, tc.adam_beta2), eps=tc.adam_eps)
        if cfg.parallel.zero_stage:
            self.optimizer = ZeroOptimizer(self.optimizer, self.grad_specs, cfg.parallel.zero_stage,
                                           offload=cfg.parallel.offload_optimizer,
                                           reduce_late=tied_embedding_params(self.model))
        self.schedule = LRSchedule(tc.lr, tc.min_lr, tc.lr_warmup_iters,
                                   tc.lr_decay_iters or tc.train_iters, tc.lr_decay_style)
        self.scaler = LossScaler.from_config(
            tc.loss_scale, tc.initial_scale_power, tc.loss_scale_window, tc.hysteresis,
            tc.min_loss_scale, tc.consecutive_hysteresis) if tc.precision == "fp16" else None
        self.accumulation = cfg.accumulation_steps(self.parallel.world_size)
        self.pipeline = PipelineRunner(
            self.model, self.parallel, self.accumulation, tc.micro_batch_size, cfg.model.seq_length, self.device,
            aux_loss_coeff=cfg.moe.aux_loss_coeff, z_loss_coeff=cfg.moe.z_loss_coeff,
            schedule=cfg.parallel.pipeline_schedule, precision=tc.precision) if self.parallel.pp > 1 else None
        self.iteration = 0
        if tc.load:
            self._resume(tc.load)
        rank_zero = self.parallel.rank == 0
        self.metrics = MetricsLogger(tc.save if rank_zero else None, tc.tensorboard_dir if rank_zero else None)

    @contextlib.contextmanager
    def _rank_zero_first(self):
        """Rank 0 runs the body first (filling caches), the others after it, from the cache."""
        if self.parallel.distributed and self.parallel.rank != 0:
            dist.barrier()
        yield
        if self.parallel.distributed and self.parallel.rank == 0:
            dist.barrier()

    # -- checkpoints ------------------------------------------------------------------------
    def _resume(self, load_dir: str) -> None:
        """Same layout, one process: load as saved (bit-exact). Otherwise map any layout onto this one."""
        reader = CheckpointReader(resolve_checkpoint_dir(load_dir))
        # Weights only (moetrain import / upcycle write no data position): a new run from these weights.
        fresh_start = "data" not in reader.state["extra"]
        if reader.sharded or self.parallel.distributed or self.cfg.parallel.zero_stage:
            load_into(reader, self.model, self.optimizer)
        else:
            try:
                self.model.load_state_dict(reader.model_state())
            except RuntimeError as error:
                detail = next((line.strip() for line in str(error).splitlines()[1:] if line.strip()), str(error))
                raise ConfigError(f"checkpoint {reader.path} does not fit this model ({detail}); resume with the "
                                  "model and MoE flags it was trained with") from None
            if not fresh_start:
                self.optimizer.load_state_dict(reader.state["optimizer"])
        if fresh_start:
            self._print(f"initialised from the weights in {reader.path}; optimizer, schedule and data start afresh")
            return
        extra = reader.state["extra"]
        if self.scaler is not None and "loss_scaler" in extra:
            self.scaler.load_state_dict(extra["loss_scaler"])
        self.train_data.load_state_dict(extra["data"])
        restore_rng_state(rank_rng_state(extra, self.parallel.rank, self.parallel.world_size))
        if self.distiller is not None and "distill" in extra:
            self.distiller.load_state_dict(extra["distill"])  # a stopped distillation stays stopped
        self.iteration = int(reader.state["iteration"])
        self._print(f"resumed from {reader.path} at iteration {self.iteration}")

    def save(self) -> str | None:
        save_dir = self.cfg.training.save
        if not save_dir:
            return None
        extra = {"data": self.train_data.state_dict(), "config": self.cfg.to_dict()}
        if self.scaler is not None:
            extra["loss_scaler"] = self.scaler.state_dict()
        if self.distiller is not None:
            extra["distill"] = self.distiller.state_dict()
        files, keep = {"tokenizer.json": self.tokenizer.to_json()}, self.cfg.training.keep_last_checkpoints
        if self.parallel.distributed or self.cfg.parallel.zero_stage:
            return save_sharded(save_dir, self.iteration, self.model, self.optimizer, extra, capture_rng_state(),
                                self.parallel, keep, files)
        extra.update(rng=capture_rng_state(), optimizer_param_names=optimizer_param_names(self.model, self.optimizer))
        return save_checkpoint(save_dir, self.iteration, model_state=self.model.state_dict(),
                               optimizer_state=self.optimizer.state_dict(), extra=extra, keep_last=keep,
                               files=files)

    # -- one optimizer step -----------------------------------------------------------------
    def train_step(self) -> dict:
        """Accumulate gradients over the micro-batches, then clip and step (or skip on overflow)."""
        tc = self.cfg.training
        lr = self.schedule.apply(self.optimizer, self.iteration)
        self.model.train()
        means = self._pipeline_forward_backward() if self.pipeline is not None else self._forward_backward()
        if self.parallel.dp > 1:
            dist.all_reduce(means, group=self.parallel.dp_group)
            means /= self.parallel.dp
        # one host sync per step (not four per micro-batch) for the logged values
        sums = dict(zip(("loss", "lm_loss", "aux_loss", "z_loss", "kd_loss"), means.tolist()))
        zero = isinstance(self.optimizer, ZeroOptimizer)
        if zero:
            self.optimizer.reduce_gradients()
        else:
            all_reduce_gradients(self.grad_specs)
        held = [(p, s.copies // s.size if zero else s.copies) for p, s in self.grad_specs.items()
                if p.grad is not None]
        overflow = self.scaler.unscale_([p for p, _ in held]) if self.scaler else False
        grad_norm = float("nan")
        if not overflow:
            norm = global_grad_norm(((p.grad, copies) for p, copies in held), world=self.parallel.distributed)
            clip_gradients([p.grad for p, _ in held], tc.clip_grad if tc.clip_grad > 0 else math.inf, norm)
            grad_norm = float(norm)
            self.optimizer.step()
            sync_expert_load(self.model, self.parallel)
            self.model.update_expert_biases()
        if self.scaler:
            self.scaler.update(overflow)
        self.optimizer.zero_grad(set_to_none=True)
        self.iteration += 1
        return {**sums, "lr": lr, "grad_norm": grad_norm, "skipped": overflow}

    def _forward_backward(self) -> torch.Tensor:
        """Accumulate the micro-batches' gradients; return the mean of each logged loss."""
        tc, moe = self.cfg.training, self.cfg.moe
        parts = []
        distilling = self.distiller is not None and self.distiller.active(self.iteration)
        for _ in range(self.accumulation):
            inputs, targets = self._next_batch()
            with autocast(self.device.type, tc.precision):
                out = self.model(inputs, targets)
                lm_term, kd = out.lm_loss, []
                if distilling:  # alpha * LM + beta * KD takes the LM loss's place
                    kd = [self.distiller.loss(inputs, out.logits)]
                    lm_term = self.cfg.distill.alpha_ce * out.lm_loss + self.cfg.distill.beta_ce * kd[0]
            loss = lm_term + moe.aux_loss_coeff * out.aux_loss + moe.z_loss_coeff * out.z_loss
            scaled = loss / self.accumulation
            (self.scaler.scale(scaled) if self.scaler else scaled).backward()
            parts.append(torch.stack([loss, out.lm_loss, out.aux_loss, out.z_loss, *kd]).detach().float())
        return torch.stack(parts).sum(0) / self.accumulation

    def _pipeline_forward_backward(self) -> torch.Tensor:
        """All micro-batches through the pipeline schedule; the logged losses summed over stages."""
        moe = self.cfg.moe
        batches = [self._next_batch() for _ in range(self.accumulation)]
        out = self.pipeline.step(torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches]),
                                 self.scaler.loss_scale if self.scaler else 1.0)
        values = torch.stack([out["lm_loss"], out["aux_loss"], out["z_loss"]]).float()
        dist.all_reduce(values, group=self.parallel.pp_group)  # lm: the last stage's; aux, z: every stage's
        lm_loss, aux_loss, z_loss = values
        all_reduce_tied_embedding_grads(self.model, self.embedding_group)
        loss = lm_loss + moe.aux_loss_coeff * aux_loss + moe.z_loss_coeff * z_loss
        return torch.stack([loss, lm_loss, aux_loss, z_loss])

    def _next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """This data-parallel rank's rows of the next global micro-batch (every rank draws the same)."""
        micro, state = self.cfg.training.micro_batch_size, self.parallel
        inputs, targets = self.train_data.next_batch(micro * state.dp)
        rows = slice(state.dp_rank * micro, (state.dp_rank + 1) * micro)
        return inputs[rows].to(self.device), targets[rows].to(self.device)

    @torch.no_grad()
    def evaluate(self) -> dict | None:
        """Held-out loss and perplexity in eval mode (eval capacity factor), with the drop rate."""
        if self.valid_data is None:
            return None
        tc, state = self.cfg.training, self.parallel
        batches = self.valid_data.eval_batches(tc.micro_batch_size, tc.eval_iters)
        if self.pipeline is not None:  # the schedule runs fixed shapes: drop a short last batch
            batches = [b for b in batches if b[0].shape[0] == tc.micro_batch_size] or batches[:1]
        mine = batches[state.dp_rank::state.dp]
        # every rank runs as many forwards (expert all-to-alls and stages must pair up); padding counts 0
        rounds = -(-len(batches) // state.dp)
        if self.pipeline is not None:
            rounds = -(-rounds // self.accumulation) * self.accumulation
        padded = [(*mine[i], True) if i < len(mine) else (*batches[0], False) for i in range(rounds)]
        self.model.eval()
        losses = self._pipeline_eval_losses(padded) if self.pipeline is not None else self._eval_losses(padded)
        self.model.train()
        real = torch.tensor([float(r) for *_, r in padded], dtype=torch.float64)
        totals = torch.stack([(losses.double() * real).sum(), real.sum()])
        if state.dp > 1:
            dist.all_reduce(totals, group=state.dp_group)
        eval_loss = float(totals[0] / totals[1])
        stats = self._layer_summaries(training=False)
        drop = sum(s["drop_fraction"] for s in stats) / len(stats) if stats else 0.0
        return {"type": "eval", "step": self.iteration, "eval_loss": eval_loss,
                "eval_ppl": math.exp(min(eval_loss, 50.0)), "eval_drop_fraction": drop}

    def _eval_losses(self, batches: list) -> torch.Tensor:
        losses = []
        for inputs, targets, _ in batches:
            with autocast(self.device.type, self.cfg.training.precision):
                losses.append(self.model(inputs.to(self.device), targets.to(self.device)).lm_loss.float())
        return torch.stack(losses).cpu()

    def _pipeline_eval_losses(self, batches: list) -> torch.Tensor:
        """Per-batch lm losses through the stages, `accumulation` batches per schedule run."""
        losses = []
        for start in range(0, len(batches), self.accumulation):
            chunk = batches[start:start + self.accumulation]
            self.pipeline.evaluate(torch.cat([b[0] for b in chunk]).to(self.device),
                                   torch.cat([b[1] for b in chunk]).to(self.device))
            per_batch = self.pipeline.lm_losses if self.parallel.is_last_stage else [torch.zeros(())] * len(chunk)
            losses.extend(loss.float().cpu() for loss in per_batch)
        values = torch.stack(losses)
        dist.all_reduce(values, group=self.parallel.pp_group)  # only the last stage computed them
        return values

    # -- the loop -----------------------------------------------------------------------------
    def fit(self) -> TrainResult:
        tc = self.cfg.training
        self._print_startup()
        tokens_per_step = self.cfg.global_batch(self.parallel.world_size) * self.cfg.model.seq_length
        losses: list[float] = []
        window_seconds, window_steps = 0.0, 0  # time in train steps only: evals and saves are not training
        bar = tqdm(total=tc.train_iters, initial=self.iteration, disable=self.quiet or not tc.progress_bar,
                   desc="train", unit="step", dynamic_ncols=True)
        last_eval = None
        with contextlib.closing(bar), contextlib.closing(self.metrics):
            while self.iteration < tc.train_iters:
                step_start = time.perf_counter()
                step = self.train_step()
                window_seconds += time.perf_counter() - step_start
                losses.append(float("nan") if step["skipped"] else step["loss"])
                window_steps += 1
                bar.update(1)
                if self.iteration % tc.log_interval == 0 or self.iteration == tc.train_iters:
                    record = self._train_record(step, window_steps * tokens_per_step / window_seconds)
                    self.metrics.log(record)
                    self._print(format_train_line(record), bar)
                    window_seconds, window_steps = 0.0, 0
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
        layers = self._layer_summaries(training=True)
        return {"type": "train", "step": self.iteration, "loss": step["loss"], "lm_loss": step["lm_loss"],
                "aux_loss": step["aux_loss"], "z_loss": step["z_loss"], "lr": step["lr"],
                **({"kd_loss": step.get("kd_loss")} if self.distiller is not None else {}),
                "grad_norm": step["grad_norm"], "tokens_per_s": tokens_per_s,
                "loss_scale": self.scaler.loss_scale if self.scaler else None,
                "skipped_steps": self.scaler.skipped_steps if self.scaler else 0,
                "data_drawn": self.train_data.drawn(), "moe_layers": layers}

    def _layer_summaries(self, training: bool) -> list[dict]:
        """Routing statistics of every MoE layer since the last call, over all ranks and stages."""
        sync_routing_stats(self.model, self.parallel, training)
        layers = [{"layer": i, **(m.routing_stats if training else m.eval_routing_stats).summary(reset=True)}
                  for i, m in self.model.moe_layers()]
        if self.parallel.pp > 1:
            stages: list = [None] * self.parallel.pp
            dist.all_gather_object(stages, layers, group=self.parallel.pp_group)
            layers = [layer for stage in stages for layer in stage]
        return layers

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
        counts = self.param_counts
        experts = [e for e in self.cfg.experts_per_layer() if e]
        layout = f"{len(experts)} MoE layers with experts {experts}, top-{self.cfg.moe.topk}" if experts \
            else "dense"
        self._print(f"model: {self.cfg.model.style} style, {self.cfg.model.num_layers} layers, hidden "
                    f"{self.cfg.model.hidden_size}, {layout}")
        self._print(f"parameters: {counts['total'] / 1e6:.2f}M total, {counts['active'] / 1e6:.2f}M active "
                    f"per token | vocab {self.tokenizer.vocab_size} | train tokens "
                    f"{self.train_data.num_tokens:,} | device {self.device} | {self.cfg.training.precision}")
        blend = self.train_data.drawn()
        if len(blend) > 1:
            weights = ", ".join(f"{w:.3f} {name}" for w, name in zip(self.train_data.weights, blend))
            drawn = ", ".join(f"{count:,} {name}" for name, count in blend.items())
            self._print(f"data blend: weights {weights} | sequences drawn so far {drawn}")
        state = self.parallel
        if state.distributed:
            self._print(f"parallel: {state.world_size} processes = DP {state.dp} (EP {state.ep}) x TP {state.tp} x "
                        f"PP {state.pp} | ZeRO {self.cfg.parallel.zero_stage}")

    def _print_finish(self, path: str | None) -> None:
        if path is None or self.parallel.rank != 0:
            return
        save_dir = self.cfg.training.save
        plots = plot_metrics(os.path.join(save_dir, "metrics.jsonl"), save_dir)
        self._print(f"checkpoint: {path}")
        self._print(f"metrics: {os.path.join(save_dir, 'metrics.jsonl')}; plots: {', '.join(plots)}")
        self._print(f"sample from it: moetrain generate --load {save_dir} --prompt \"def \"")


def train(cfg: Config, *, quiet: bool = False) -> TrainResult:
    return Trainer(cfg, quiet=quiet).fit()

