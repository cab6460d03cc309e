"""The training loop: one screen per step, components from their own modules.

The pieces come from build_run (moetrain.train.run); the loss from moetrain.loss, composed once for the
local and the pipeline executor (moetrain.train.executor); each term is logged on its own.
Checkpoints carry everything a resumed run needs to continue bit for bit: model, optimizer, loss
scaler, RNG states, data position and iteration (the LR schedule is a function of the iteration).
"""

from __future__ import annotations

import contextlib
import math
import os
import time
import warnings
from dataclasses import dataclass

import torch
import torch.distributed as dist
from tqdm import tqdm

from moetrain.checkpoint import (
    CheckpointError,
    iter_dir_name,
    list_checkpoints,
    resolve_checkpoint_dir,
    restore,
    restore_rng_state,
    save,
)
from moetrain.checkpoint.lock import SaveDirLock
from moetrain.config import Config
from moetrain.data.blend import NO_ROWS
from moetrain.loss import StepLosses
from moetrain.parallel.data_parallel import clip_gradients, clip_needed, global_grad_norm
from moetrain.parallel.mesh import leave_job
from moetrain.parallel.parallelize import sync_expert_load
from moetrain.train.compatibility import check_loadable
from moetrain.train.divergence import rewind_target
from moetrain.train.metrics import MetricsLogger, format_eval_line, format_train_line
from moetrain.train.monitor.health import ExpertHealth
from moetrain.train.monitor.profiler import StepProfiler
from moetrain.train.monitor.routing_record import attach_routing_tape
from moetrain.train.monitor.spikes import SpikeDetector
from moetrain.train.monitor.wandb_logger import wandb_sinks
from moetrain.train.run import build_run


@dataclass
class TrainResult:
    iteration: int
    final_eval_loss: float | None
    save_dir: str | None
    losses: list[float]  # total loss of every optimizer step this run took (skipped steps: nan)


# The non-finite guard's state, saved with each checkpoint so a resumed run stops (or rewinds) when the
# uninterrupted one would: consecutive skipped steps, all skipped steps, rewinds against --max-rewinds.
GUARD_STATE = ("non_finite_in_a_row", "non_finite_skipped", "rewinds")
DIVERGENCE_ADVICE = "Lower --lr, set --clip-grad, use --bf16 instead of --fp16"


class TrainingDiverged(RuntimeError):
    """The loss or gradient norm stayed non-finite for --max-skipped-steps steps in a row (and no rewind was left)."""


class Trainer:
    """Owns the model, optimizer and data of one run; `fit()` trains to `train_iters`."""

    def __init__(self, cfg: Config, *, quiet: bool = False) -> None:
        run = build_run(cfg, quiet=quiet)
        self.cfg, self.device, self.parallel, self.quiet = run.cfg, run.device, run.parallel, run.quiet
        self.tokenizer, self.train_data, self.valid_data = run.tokenizer, run.train_data, run.valid_data
        self.model, self.distiller, self.param_counts = run.model, run.distiller, run.param_counts
        self.grad_specs, self.optimizer, self.scaler = run.grad_specs, run.optimizer, run.scaler
        self.executor, self.grad_sync, self.schedule = run.executor, run.grad_sync, run.schedule
        self.accumulation, self.compute_weights = run.accumulation, run.compute_weights
        self.iteration = 0
        self.non_finite_in_a_row = 0  # consecutive steps skipped by the non-finite guard
        self.non_finite_skipped = 0
        self.rewinds = 0
        self.streak_start = 0  # the iteration whose weights the open non-finite streak started from
        self.rewound_to: set[int] = set()  # checkpoints a rewind went back to (never chosen twice)
        mc = self.cfg.monitor
        self.spikes = SpikeDetector(mc.loss_spike_window, mc.loss_spike_sigmas) if mc.skip_loss_spikes else None
        self.health = ExpertHealth(mc.expert_alarm_steps, mc.collapse_factor, mc.min_router_entropy) \
            if mc.expert_alarms else None
        tc = cfg.training
        self.save_lock = self._lock_save_dir(tc.save)
        if tc.load and not self._first_start_of_restartable_job(tc.load, tc.save):
            self._resume(tc.load)
        self.profiler = StepProfiler(self.cfg, self.parallel.rank, self.device)
        self.routing_tape = attach_routing_tape(self.cfg, self.model, self.parallel, self.device, self.iteration)
        rank_zero = self.parallel.rank == 0
        self.metrics = MetricsLogger(tc.save if rank_zero else None, tc.tensorboard_dir if rank_zero else None,
                                     resumed_at=self.iteration or None)
        self.metrics.sinks += wandb_sinks(self.cfg, self.parallel.rank)

    # -- checkpoints ------------------------------------------------------------------------
    def _lock_save_dir(self, save_dir: str | None) -> SaveDirLock | None:
        """Rank 0 locks --save against a second run; every rank learns whether it could."""
        if not save_dir:
            return None
        lock, refusal = None, None
        if self.parallel.rank == 0:
            try:
                lock = SaveDirLock(save_dir)
            except CheckpointError as error:
                refusal = str(error)
        if self.parallel.distributed:
            shared = [refusal]
            dist.broadcast_object_list(shared, src=0)
            refusal = shared[0]
        if refusal is not None:
            raise CheckpointError(refusal)
        return lock

    def _first_start_of_restartable_job(self, load_dir: str, save_dir: str | None) -> bool:
        """--load equal to --save with no checkpoint there yet: the first start of a job that torchrun
        --max-restarts may restart, resuming from what it saved (a different empty --load stays an error)."""
        same = save_dir is not None and os.path.realpath(load_dir) == os.path.realpath(save_dir)
        if not same or list_checkpoints(load_dir) or os.path.exists(os.path.join(load_dir, "latest")):
            return False
        self._print(f"no checkpoint in {load_dir} yet: starting from scratch")
        return True

    def _resume(self, load_dir: str, *, rewinding: bool = False) -> None:
        tc = self.cfg.training
        path = resolve_checkpoint_dir(load_dir)
        if not rewinding:  # --load: trained like this run (--finetune: weights only, into any model they fit)
            check_loadable(path, self.cfg, self.tokenizer, tc.finetune)
        finetune = tc.finetune and not rewinding
        restored = restore(path, self.model, self.optimizer, self.parallel,
                           load_optimizer=rewinding or (tc.load_optim and not finetune))
        if self.compute_weights is not None:
            self.compute_weights.invalidate()
        if restored.fresh_start or finetune:
            self._print(f"initialised from the weights in {restored.path}; optimizer, schedule and data start afresh")
            return
        extra = restored.extra
        if self.scaler is not None and "loss_scaler" in extra:
            self.scaler.load_state_dict(extra["loss_scaler"])
        self.train_data.load_state_dict(extra["data"])
        if rewinding or tc.load_rng:
            restore_rng_state(restored.rng)
        if self.distiller is not None and "distill" in extra:
            self.distiller.load_state_dict(extra["distill"])  # a stopped distillation stays stopped
        if not rewinding:  # a rewind keeps this run's counts: its skipped steps and rewinds happened
            self._load_guard_state(extra.get("guard", {}))
        if self.spikes is not None and "loss_spikes" in extra:
            self.spikes.load_state_dict(extra["loss_spikes"], counts=not rewinding)
        if self.health is not None:
            self.health.load_state_dict(extra.get("expert_health", {"last_step": restored.iteration}))
        self.iteration = restored.iteration
        self._print(f"resumed from {restored.path} at iteration {self.iteration}")

    def save(self) -> str | None:
        save_dir = self.cfg.training.save
        if not save_dir:
            return None
        extra = {"data": self.train_data.state_dict(), "config": self.cfg.to_dict()}
        if self.scaler is not None:
            extra["loss_scaler"] = self.scaler.state_dict()
        if self.distiller is not None:
            extra["distill"] = self.distiller.state_dict()
        extra["guard"] = {**{name: getattr(self, name) for name in GUARD_STATE}, "rewound_to": sorted(self.rewound_to)}
        if self.spikes is not None:
            extra["loss_spikes"] = self.spikes.state_dict()
        if self.health is not None:
            extra["expert_health"] = self.health.state_dict()
        return save(save_dir, self.iteration, self.model, self.optimizer, self.parallel, extra=extra,
                    files={"tokenizer.json": self.tokenizer.to_json()},
                    keep_last=self.cfg.training.keep_last_checkpoints)

    def _load_guard_state(self, guard: dict) -> None:
        """The non-finite guard's counts (0 from a checkpoint written before they were saved)."""
        for name in GUARD_STATE:
            setattr(self, name, int(guard.get(name, 0)))
        self.rewound_to = {int(it) for it in guard.get("rewound_to", [])}

    # -- one optimizer step -----------------------------------------------------------------
    def train_step(self) -> dict:
        """Accumulate gradients over the micro-batches, then clip and step (or skip on overflow). Returns the
        step's "losses" (name -> value: loss, lm_loss, aux_loss, z_loss, ...), "lr", "grad_norm", "skipped"."""
        tc = self.cfg.training
        lr = self.schedule.apply(self.optimizer, self.iteration)
        self.model.train()
        if self.routing_tape is not None:
            self.routing_tape.begin_train(self.iteration)
        means = self.executor.forward_backward(self._next_batch, self.iteration, self.scaler,
                                               self.grad_sync.before_last_backward)
        if self.parallel.dp > 1:
            dist.all_reduce(means.values, group=self.parallel.dp_group)
            means.values.div_(self.parallel.dp)
        self.grad_sync.reduce()
        held = self.grad_sync.held()
        grads = [p.grad for p, _ in held]
        overflow = self.scaler.unscale_([p for p, _ in held], self.parallel.comm_device) if self.scaler else None
        norm = global_grad_norm(((p.grad, copies) for p, copies in held), world=self.parallel.distributed,
                                device=self.parallel.comm_device)
        flag = norm.new_zeros(()) if overflow is None else overflow.to(norm.device)
        # the step's one host sync: losses, norm (NaN from any rank) and overflow flag, all global, in one copy;
        # the clip/skip/spike decisions are made on the host from it
        losses = means.extended(StepLosses(("grad_norm", "overflow"), torch.stack([norm, flag]))).to_host()
        grad_norm, overflow = losses.pop("grad_norm"), losses.pop("overflow") > 0
        applied = spike = False
        if overflow:
            grad_norm = float("nan")
        else:
            finite = math.isfinite(grad_norm) and math.isfinite(losses["loss"])
            spike = finite and self.spikes is not None and self.spikes.check(losses["loss"], grad_norm)
            if (not tc.check_for_nan_in_loss_and_grad or finite) and not spike:
                max_norm = tc.clip_grad if tc.clip_grad > 0 else math.inf
                if clip_needed(max_norm, grad_norm):
                    clip_gradients(grads, max_norm, norm)
                self.optimizer.step()
                sync_expert_load(self.model, self.parallel)
                self.model.update_expert_biases()
                if self.compute_weights is not None:
                    self.compute_weights.invalidate()  # the next forward writes the bf16/fp16 copies, once
                applied = True
        # fp16 overflow is the scaler's to skip while it can still lower the scale; at its floor, or with the
        # (unscaled) loss itself non-finite, which no scale mends, it is divergence
        scaler_exhausted = overflow and (not self.scaler.dynamic or self.scaler.loss_scale <= self.scaler.min_scale
                                         or not math.isfinite(losses["loss"]))
        if self.scaler:
            self.scaler.update(overflow)
        guard_skip = not applied and not overflow and not spike
        self.non_finite_skipped += guard_skip
        streaking = guard_skip or scaler_exhausted or spike  # a lasting loss spike stops or rewinds the run too
        if streaking and not self.non_finite_in_a_row:
            self.streak_start = self.iteration
        self.non_finite_in_a_row = self.non_finite_in_a_row + 1 if streaking else 0
        self.optimizer.zero_grad(set_to_none=True)
        if self.routing_tape is not None:
            self.routing_tape.end()
        self.iteration += 1
        return {"losses": losses, "lr": lr, "grad_norm": grad_norm, "skipped": not applied, "spike": spike}

    def _on_divergence(self, step: dict, bar) -> None:
        """After --max-skipped-steps non-finite steps in a row: rewind to the newest checkpoint from before the
        streak not rewound to already (divergence.rewind_target), or stop."""
        tc = self.cfg.training
        save_dir = tc.save
        target = rewind_target(save_dir, self.streak_start, frozenset(self.rewound_to))
        where = (f"step {self.iteration}: loss {step['losses']['loss']:.4g}, grad norm {step['grad_norm']:.4g}, "
                 f"{'a loss spike' if step['spike'] else 'not finite'} for {self.non_finite_in_a_row} steps in a row "
                 f"(--max-skipped-steps {tc.max_skipped_steps})")
        if tc.rewind_on_divergence and self.rewinds < tc.max_rewinds and target is not None:
            self.rewinds += 1
            self.rewound_to.add(target)
            diverged_at = self.iteration
            self._resume(os.path.join(save_dir, iter_dir_name(target)), rewinding=True)
            for _ in range(tc.rewind_on_divergence * self.accumulation):
                self.train_data.next_batch(tc.micro_batch_size * self.parallel.dp, rows=NO_ROWS)
            self.non_finite_in_a_row = 0
            bar.n = self.iteration
            bar.refresh()
            self.metrics.log({"type": "rewind", "step": self.iteration, "diverged_at": diverged_at,
                              "skipped_batches": tc.rewind_on_divergence, "rewind": self.rewinds})
            self._print(f"{where}; rewound to iteration {self.iteration} and skipped the next "
                        f"{tc.rewind_on_divergence} batches (rewind {self.rewinds} of {tc.max_rewinds})", bar)
            return
        raise TrainingDiverged(f"{where}; {self._stopped_without_saving()}. {DIVERGENCE_ADVICE}, or pass "
                               f"--rewind-on-divergence K")

    def _stopped_without_saving(self) -> str:
        """Where a stopped run left its last good weights: the newest checkpoint from before the streak."""
        good = rewind_target(self.cfg.training.save, self.streak_start if self.non_finite_in_a_row else self.iteration)
        kept = f"the last good checkpoint is {iter_dir_name(good)}" if good is not None else "no checkpoint was written"
        return f"stopped without saving, {kept}"

    def _next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """This data-parallel rank's rows of the next global micro-batch. Every rank advances by the whole
        global micro-batch (one sample order whatever the layout) but reads from the dataset only its own
        rows; a middle pipeline stage reads none (`_placeholder`)."""
        micro, state = self.cfg.training.micro_batch_size, self.parallel
        rows = slice(state.dp_rank * micro, (state.dp_rank + 1) * micro)
        if self._middle_stage:
            self.train_data.next_batch(micro * state.dp, rows=NO_ROWS)
            return self._placeholder(micro)
        inputs, targets = self.train_data.next_batch(micro * state.dp, rows=rows)
        return self._to_device(inputs), self._to_device(targets)

    def _eval_batches(self, indices: list[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The evaluation batches at `indices`, the only ones read from the dataset; a middle pipeline stage
        reads none (`_placeholder`; the pipeline evaluates only batches of a whole micro-batch)."""
        micro = self.cfg.training.micro_batch_size
        if self._middle_stage:
            return [self._placeholder(micro)] * len(indices)
        return [(self._to_device(inputs), self._to_device(targets))
                for inputs, targets in self.valid_data.eval_batches(micro, indices)]

    @property
    def _middle_stage(self) -> bool:
        """A pipeline stage that takes neither tokens nor targets, so reads no data."""
        return not (self.parallel.is_first_stage or self.parallel.is_last_stage)

    def _placeholder(self, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
        """What a middle pipeline stage gets instead of a batch: zeros of its shape that occupy no memory."""
        zeros = torch.zeros((), dtype=torch.long, device=self.device).expand(rows, self.cfg.model.seq_length)
        return zeros, zeros

    def _to_device(self, batch: torch.Tensor) -> torch.Tensor:
        """Host rows to the device; to a GPU from pinned memory without blocking (the copy overlaps the
        work already queued; the stream orders it before the forward that reads it)."""
        if self.device.type != "cuda":
            return batch.to(self.device)
        return batch.pin_memory().to(self.device, non_blocking=True)

    @torch.no_grad()
    def evaluate(self) -> dict | None:
        """Held-out loss and perplexity in eval mode (eval capacity factor), with the drop rate."""
        if self.valid_data is None:
            return None
        tc, state = self.cfg.training, self.parallel
        self.model.eval()
        sizes = self.valid_data.eval_batch_sizes(tc.micro_batch_size, tc.eval_iters)
        if self.routing_tape is not None:
            self.routing_tape.begin_eval(self.iteration, sizes)
        losses, counts = self.executor.eval_losses(sizes, self._eval_batches)
        if self.routing_tape is not None:
            self.routing_tape.end()
        self.model.train()
        totals = torch.stack([(losses.double() * counts).sum(), counts.sum()])
        if state.dp > 1:
            dist.all_reduce(totals, group=state.dp_group)
        eval_loss = float(totals[0] / totals[1])
        stats = self.executor.routing_summaries(training=False)
        drop = sum(s["drop_fraction"] for s in stats) / len(stats) if stats else 0.0
        return {"type": "eval", "step": self.iteration, "eval_loss": eval_loss,
                "eval_ppl": math.exp(min(eval_loss, 50.0)), "eval_drop_fraction": drop}

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
        with contextlib.closing(bar), contextlib.closing(self.metrics), self._holding_save_lock():
            while self.iteration < tc.train_iters:
                step_start = time.perf_counter()
                self.profiler.step_started(self.iteration)
                step = self.train_step()
                self.profiler.step_finished(self.iteration)
                window_seconds += time.perf_counter() - step_start
                losses.append(float("nan") if step["skipped"] else step["losses"]["loss"])
                window_steps += 1
                bar.update(1)
                if self.iteration % tc.log_interval == 0 or self.iteration == tc.train_iters:
                    record = self._train_record(step, window_steps * tokens_per_step / window_seconds)
                    self.metrics.log(record)
                    self._print(format_train_line(record), bar)
                    for warning in self.health.take_warnings() if self.health is not None else []:
                        self._print(warning, bar)
                    window_seconds, window_steps = 0.0, 0
                if step["spike"]:
                    self._print(f"step {self.iteration}: loss spike, {self.spikes.last_spike}; step skipped "
                                f"({self.non_finite_in_a_row} in a row)", bar)
                elif self.non_finite_in_a_row:
                    self._print(f"step {self.iteration}: loss {step['losses']['loss']:.4g}, grad norm "
                                f"{step['grad_norm']:.4g} not finite; step skipped "
                                f"({self.non_finite_in_a_row} in a row)", bar)
                if self.non_finite_in_a_row >= tc.max_skipped_steps and tc.check_for_nan_in_loss_and_grad:
                    self._on_divergence(step, bar)
                    continue
                if tc.eval_interval and self.iteration % tc.eval_interval == 0 \
                        and self.iteration < tc.train_iters:
                    last_eval = self._log_eval(bar)
                if tc.save_interval and self.iteration % tc.save_interval == 0 \
                        and self.iteration < tc.train_iters and not self.non_finite_in_a_row:
                    self.save()  # never during a non-finite streak: it would rotate the last good checkpoint away
            final_eval = self._log_eval(bar)
            self._refuse_a_non_finite_end(final_eval)
            last_eval = final_eval or last_eval
            path = self.save()
        self.profiler.stop()
        if self.profiler.summary and self.parallel.rank == 0:
            self._print(self.profiler.summary)
        self._print_finish(path)
        return TrainResult(self.iteration, last_eval["eval_loss"] if last_eval else None, tc.save, losses)

    def _refuse_a_non_finite_end(self, final_eval: dict | None) -> None:
        """A run that ends inside a non-finite streak, or whose final evaluation is not finite, is not finished:
        it raises (exit 1) and writes nothing."""
        if self.non_finite_in_a_row:
            what = f"the run ended inside a non-finite streak ({self.non_finite_in_a_row} in a row)"
        elif final_eval is not None and not math.isfinite(final_eval["eval_loss"]):
            what = f"the final evaluation loss is {final_eval['eval_loss']}"
        else:
            return
        raise TrainingDiverged(f"step {self.iteration}: {what}; {self._stopped_without_saving()}. {DIVERGENCE_ADVICE}")

    @contextlib.contextmanager
    def _holding_save_lock(self):
        """Release the --save lock when fit ends, however it ends (a killed process leaves a stale one)."""
        try:
            yield
        finally:
            if self.save_lock is not None:
                self.save_lock.release()

    def _train_record(self, step: dict, tokens_per_s: float) -> dict:
        """The metrics.jsonl record: the step's losses in their order, except kd_loss, which a distilling run
        logs after lr, null once distillation stopped (the schema in docs/DESIGN.md)."""
        layers = self.executor.routing_summaries(training=True)
        if self.health is not None:
            self.health.update(layers, self.iteration)
        losses = dict(step["losses"])
        kd_loss = losses.pop("kd_loss", None)
        return {"type": "train", "step": self.iteration, **losses, "lr": step["lr"],
                **({"kd_loss": kd_loss} if self.distiller is not None else {}),
                "grad_norm": step["grad_norm"], "tokens_per_s": tokens_per_s,
                "loss_scale": self.scaler.loss_scale if self.scaler else None,
                "skipped_steps": (self.scaler.skipped_steps if self.scaler else 0) + self.non_finite_skipped
                + (self.spikes.skipped if self.spikes is not None else 0),
                **({"loss_spike_skips": self.spikes.skipped} if self.spikes is not None else {}),
                "data_drawn": self.train_data.drawn(), "moe_layers": layers}

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
        from moetrain.plot import plot_metrics  # here: matplotlib loads only in a process that writes a plot

        save_dir = self.cfg.training.save
        try:
            plots = ", ".join(plot_metrics(os.path.join(save_dir, "metrics.jsonl"), save_dir))
        except OSError as error:  # the checkpoint is safe: a plot is no reason to fail the run
            plots = "none"
            warnings.warn(f"could not write the plots in {save_dir} ({error.strerror or error}); the checkpoint is "
                          f"complete; `moetrain plot` draws them later", stacklevel=1)
        self._print(f"checkpoint: {path}")
        self._print(f"metrics: {os.path.join(save_dir, 'metrics.jsonl')}; plots: {plots}")
        self._print(f"sample from it: moetrain generate --load {save_dir} --prompt \"def \"")


def train(cfg: Config, *, quiet: bool = False) -> TrainResult:
    """Train `cfg` to its end; a distributed run then leaves its job cleanly (mesh.leave_job)."""
    trainer = Trainer(cfg, quiet=quiet)
    result = trainer.fit()
    del trainer  # its groups (ParallelState, the mesh, MoE layers) go with leave_job's collection
    leave_job()
    return result

