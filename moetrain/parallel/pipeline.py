"""Pipeline parallelism: split the GPT into contiguous stages and run them with torch's schedules.

Every rank builds the GPT on the meta device and keeps its stage (`split_for_pipeline`) before anything
is allocated; the stage keeps the whole model's parameter names ("blocks.5.attn.qkv.weight"), which
checkpoints and the keyed initialisation key by, so all stages start from the weights of a
single-process run. `PipelineRunner` drives one optimizer
step's micro-batches through `torch.distributed.pipelining` (GPipe or 1F1B).

The MoE auxiliary and z losses of every stage reach the gradient without travelling down the
pipeline: each stage attaches its weighted sum to its output through `_AuxLossScaler`, whose
backward hands that scalar the gradient the averaged trainer loss would give it (Megatron's
MoEAuxLossAutoScaler).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe

from moetrain.loss import LossFunction, LossParts
from moetrain.model import GPT, ModelOutput
from moetrain.parallel.mesh import ParallelState
from moetrain.parallel.pieces import local
from moetrain.precision import autocast

SCHEDULES = {"gpipe": ScheduleGPipe, "1f1b": Schedule1F1B}


def stage_layers(num_layers: int, pp: int, pp_rank: int) -> range:
    """The blocks of stage `pp_rank`: balanced, the earlier stages take one more when uneven."""
    if not 1 <= pp <= num_layers:
        raise ValueError(f"pipeline-parallel size {pp} is not between 1 and the {num_layers} layers; "
                         f"use at most one stage per layer")
    if not 0 <= pp_rank < pp:
        raise ValueError(f"pipeline rank {pp_rank} is outside the {pp} stages")
    base, extra = divmod(num_layers, pp)
    start = pp_rank * base + min(pp_rank, extra)
    return range(start, start + base + (1 if pp_rank < extra else 0))


def split_for_pipeline(model: GPT, pp: int, pp_rank: int) -> GPT:
    """This rank's stage of `model` (built on the meta device, or whole): a GPT over the stage's layers."""
    return model.pipeline_stage(stage_layers(model.cfg.num_layers, pp, pp_rank))


def tied_embedding_params(stage: GPT) -> list[nn.Parameter]:
    """This stage's copy of a weight tied to one on another stage (tok_emb first, lm_head last), if any."""
    held = dict(stage.named_parameters(remove_duplicate=False))
    return [held[alias] if alias in held else held[stored] for alias, stored in stage.tied_parameters().items()
            if (alias in held) != (stored in held)]


def embedding_group(state: ParallelState) -> dist.ProcessGroup | None:
    """The group of this rank's first and last stage (same dp/tp coordinates); None elsewhere.

    Creates one group per (dp, tp) pair, so every rank must call it, in the same order.
    """
    if state.pp == 1:
        return None
    layout = torch.arange(state.world_size).view(state.pp, state.dp, state.tp)
    mine = None
    for first, last in zip(layout[0].flatten().tolist(), layout[-1].flatten().tolist()):
        group = dist.new_group([first, last])
        if state.rank in (first, last):
            mine = group
    return mine


def all_reduce_tied_embedding_grads(stage: nn.Module, group: dist.ProcessGroup | None) -> None:
    """Sum the tied embedding's gradient of the first and last stage, so both copies step alike."""
    for param in tied_embedding_params(stage):
        if param.grad is None:
            param.grad = torch.zeros_like(param)
        dist.all_reduce(local(param.grad), group=group)  # ZeRO-3: both stages' shards line up


class _AuxLossScaler(torch.autograd.Function):
    """Identity on the activation; in backward, the aux-loss scalar gets the gradient `scale`."""

    @staticmethod
    def forward(ctx, activation: Tensor, aux_loss: Tensor, scale: float) -> Tensor:
        ctx.save_for_backward(aux_loss)
        ctx.scale = scale
        return activation

    @staticmethod
    def backward(ctx, grad: Tensor):
        (aux_loss,) = ctx.saved_tensors
        return grad, torch.full_like(aux_loss, ctx.scale), None


class _ScheduledStage(nn.Module):
    """What the schedule runs: the stage under autocast, its router losses attached and recorded."""

    def __init__(self, stage: GPT, loss_function: LossFunction, precision: str) -> None:
        super().__init__()
        self.stage, self.loss_function, self.precision = stage, loss_function, precision
        self.aux_grad = 1.0  # gradient of the weighted router term: loss scale / micro-batches
        self.recorded: list[Tensor] = []  # [aux, z] of each micro-batch, in forward order
        self.routing_keys: list[Tensor] | None = None  # each micro-batch's routing key, in forward order

    def forward(self, x: Tensor) -> Tensor:
        key = self.routing_keys[len(self.recorded)] if self.routing_keys else None
        with autocast(x.device.type, self.precision):
            out, aux, z = self.stage.forward_stage(x, routing_key=key)
        self.recorded.append(torch.stack([aux, z]).detach().float())
        weighted = self.loss_function.router_loss(aux, z)
        if weighted.requires_grad:
            out = _AuxLossScaler.apply(out, weighted, self.aux_grad)
        return out


class PipelineRunner:
    """Runs the forward and backward of one optimizer step's micro-batches through the pipeline.

    The last stage's schedule loss is `loss_function.compute_loss` of its final hidden states and LM
    head (the LM term, with
    distillation's KD term while distilling) * loss_scale / num_microbatches, and the schedule does
    not rescale (scale_grads=False); every stage adds its own router terms (`router_loss`). So the
    accumulated gradients equal those of a single process averaging the whole loss over the same
    micro-batches. `aux_loss_coeff` / `z_loss_coeff` are shorthand for LossFunction(aux, z).
    Stage shapes are given up front (static metadata): torch then skips its shape-inference
    forward and backward, which would run the MoE routers (and their statistics) an extra time.
    """

    def __init__(self, stage: GPT, state: ParallelState, num_microbatches: int,
                 micro_batch_size: int, seq_length: int, device: torch.device, *,
                 aux_loss_coeff: float = 0.0, z_loss_coeff: float = 0.0, schedule: str = "1f1b",
                 precision: str = "fp32", loss_function: LossFunction | None = None) -> None:
        if schedule not in SCHEDULES:
            raise ValueError(f"unknown pipeline schedule {schedule!r}; use one of {', '.join(SCHEDULES)}")
        self.state, self.num_microbatches, self.device = state, num_microbatches, device
        self.batch_shape = (num_microbatches * micro_batch_size, seq_length)
        self.loss_function = loss_function or LossFunction(aux_loss_coeff, z_loss_coeff)
        self.precision = precision
        self.module = _ScheduledStage(stage, self.loss_function, precision)
        dtype = next(stage.parameters()).dtype
        hidden = (micro_batch_size, seq_length, stage.cfg.hidden_size)
        if state.is_first_stage:
            inputs = torch.empty(micro_batch_size, seq_length, dtype=torch.long, device="meta")
        else:
            inputs = torch.empty(hidden, dtype=dtype, device="meta", requires_grad=True)
        # every stage outputs the residual stream in `dtype`; the last stage its final norm's output, which
        # the loss projects through the LM head a chunk of rows at a time (no [B, T, V] logits)
        outputs = torch.empty(hidden, dtype=dtype, device="meta", requires_grad=True)
        self.stage = PipelineStage(self.module, state.pp_rank, state.pp, device, input_args=inputs,
                                   output_args=outputs, group=state.pp_group)
        self.schedule = SCHEDULES[schedule](self.stage, num_microbatches, loss_fn=self._loss,
                                            scale_grads=False)
        self.loss_scale = 1.0
        self.iteration: int | None = None  # the step being trained (None: evaluation, no distillation)
        self.microbatch_inputs: tuple[Tensor, ...] = ()
        self.head_parts: list[LossParts] = []  # last stage: each micro-batch's loss terms, in order

    def _loss(self, hidden: Tensor, targets: Tensor) -> Tensor:
        inputs = self.microbatch_inputs[len(self.head_parts)]
        keys = self.module.routing_keys
        zero = torch.zeros((), device=hidden.device)  # router terms reach the gradient at their own stage
        stage = self.module.stage
        output = ModelOutput(hidden, stage.lm_head.weight, None, zero, zero,
                             keys[len(self.head_parts)] if keys else None, stage.cfg.vocab_size)
        with autocast(hidden.device.type, self.precision):
            parts = self.loss_function.compute_loss(output, (inputs, targets), self.iteration)
        self.head_parts.append(parts)
        return parts.loss * (self.loss_scale / self.num_microbatches)

    @property
    def lm_losses(self) -> list[Tensor]:
        """The last stage's lm loss of each micro-batch of the last run."""
        return [parts.lm_loss.detach() for parts in self.head_parts]

    def _run(self, run, inputs: Tensor, targets: Tensor, routing_keys: list[Tensor] | None = None) -> None:
        """One pass of the schedule (`step` or `eval`): first stage feeds inputs, last targets; micro-batch
        m's MoE layers key their routing noise with `routing_keys[m]` (None: torch's RNG)."""
        if tuple(inputs.shape) != self.batch_shape or tuple(targets.shape) != self.batch_shape:
            raise ValueError(f"pipeline batches must be [num_microbatches * micro_batch, seq] = "
                             f"{list(self.batch_shape)}; got {list(inputs.shape)} and {list(targets.shape)}")
        self.module.recorded.clear()
        self.module.routing_keys = routing_keys
        self.head_parts.clear()
        self.microbatch_inputs = inputs.chunk(self.num_microbatches)
        args = (inputs,) if self.state.is_first_stage else ()
        target = targets if self.state.is_last_stage else None
        run(*args, target=target, return_outputs=False)

    def _mean(self, values: list[Tensor]) -> Tensor:
        return torch.stack(values).mean() if values else torch.zeros((), device=self.device)

    def step(self, inputs: Tensor, targets: Tensor, loss_scale: float = 1.0,
             iteration: int | None = None, routing_keys: list[Tensor] | None = None) -> dict[str, Tensor]:
        """Forward and backward of all micro-batches; gradients accumulate into the stage's .grad.

        `loss_scale` multiplies every gradient (fp16 loss scaling); `iteration` is the step being
        trained (the loss function's distillation schedule). Returns detached means over the
        micro-batches: lm_loss (last stage; 0 elsewhere) and this stage's aux_loss, z_loss, and
        kd_loss while distilling (last stage; 0 elsewhere).
        """
        self.loss_scale, self.iteration = loss_scale, iteration
        self.module.aux_grad = loss_scale / self.num_microbatches
        distilling = self.loss_function.distilling(iteration)
        self._run(self.schedule.step, inputs, targets, routing_keys)
        aux, z = torch.stack(self.module.recorded).mean(0)
        out = {"lm_loss": self._mean(self.lm_losses), "aux_loss": aux, "z_loss": z}
        if distilling:
            out["kd_loss"] = self._mean([parts.kd_loss.detach() for parts in self.head_parts])
        return out

    @torch.no_grad()
    def evaluate(self, inputs: Tensor, targets: Tensor, routing_keys: list[Tensor] | None = None) -> Tensor:
        """Mean lm loss over the micro-batches (last stage; 0 elsewhere), forward only, in eval mode."""
        was_training = self.module.training
        self.module.eval()
        self.iteration = None
        try:
            self._run(self.schedule.eval, inputs, targets, routing_keys)
        finally:
            self.module.train(was_training)
        return self._mean(self.lm_losses)
