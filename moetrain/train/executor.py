"""How one optimizer step's micro-batches run: in this process (`LocalExecutor`) or through the pipeline
schedule (`PipelineExecutor`). Both compose the loss with the run's LossFunction, return the same logged
values, and pad evaluation so that every rank runs as many forwards (collectives must pair up). Each forward
gets a routing key (moetrain.moe.routing_noise): its routing noise is keyed by (seed, iteration, global token
position), so every layout and micro-batch split routes as one process does.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import Tensor

from moetrain.loss import LossFunction, StepLosses
from moetrain.model import GPT
from moetrain.moe.routing_noise import first_sample, routing_key
from moetrain.parallel.mesh import ParallelState
from moetrain.parallel.parallelize import sync_routing_stats
from moetrain.parallel.pipeline import PipelineRunner, all_reduce_tied_embedding_grads, embedding_group
from moetrain.precision import autocast
from moetrain.train.loss_scaler import LossScaler

Batch = tuple[Tensor, Tensor]
EvalRound = tuple[Tensor, Tensor, bool]  # inputs, targets, whether it counts (padding does not)


def pad_rounds(num_batches: int, read_batches: Callable[[list[int]], list[Batch]], state: ParallelState,
               multiple: int = 1) -> list[EvalRound]:
    """This data-parallel rank's share of the `num_batches` evaluation batches (every dp-th), padded to as
    many rounds as every other rank runs (a multiple of `multiple`) with batch 0 again, counting 0. Reads
    only those batches, each once, with `read_batches(indices)`."""
    mine = list(range(state.dp_rank, num_batches, state.dp))
    rounds = -(-num_batches // state.dp)
    rounds = -(-rounds // multiple) * multiple
    indices = mine + [0] * (rounds - len(mine))
    distinct = list(dict.fromkeys(indices))
    batches = dict(zip(distinct, read_batches(distinct), strict=True))
    return [(*batches[index], i < len(mine)) for i, index in enumerate(indices)]


class LocalExecutor:
    """Every micro-batch through the whole (data, tensor or expert parallel) model in this process."""

    def __init__(self, model: GPT, loss_function: LossFunction, state: ParallelState, device: torch.device,
                 precision: str, accumulation: int, *, seed: int = 0) -> None:
        self.model, self.loss_function, self.state = model, loss_function, state
        self.device, self.precision, self.accumulation = device, precision, accumulation
        moe_cfg = model.moe_cfg
        # each load-balancing type's loss is logged on its own when types are chosen (not DeepSpeed's l_aux)
        self.balance_types = [] if moe_cfg.load_balancing_type is None else list(moe_cfg.routing().load_balancing_type)
        self.seed = seed

    def routing_key(self, iteration: int | None, micro_batch: int, micro_batch_size: int) -> Tensor:
        """The key of this rank's `micro_batch`-th forward of a step (`iteration` None: evaluation, whose
        batches are dealt round-robin over data parallel as the step's micro-batches are)."""
        start = first_sample(micro_batch, micro_batch_size, self.state.dp_rank, self.state.dp)
        return routing_key(self.seed, iteration or 0, start, self.device, training=iteration is not None)

    def forward_backward(self, next_batch: Callable[[], Batch], iteration: int, scaler: LossScaler | None,
                         before_last_backward: Callable[[], None] = lambda: None) -> StepLosses:
        """Accumulate the micro-batches' gradients; return the mean of each logged loss, this rank's
        (`LossParts.logged`, then `balance_losses`). `before_last_backward` runs just before the last
        micro-batch's backward (the data-parallel all-reduce starts during it)."""
        self.start_global_batch()
        logged = []
        for micro_batch in range(self.accumulation):
            inputs, targets = next_batch()
            key = self.routing_key(iteration, micro_batch, inputs.shape[0])
            with autocast(self.device.type, self.precision):
                output = self.model(inputs, targets, routing_key=key)
                parts = self.loss_function.compute_loss(output, (inputs, targets), iteration)
            scaled = parts.loss / self.accumulation
            if micro_batch == self.accumulation - 1:
                before_last_backward()
            (scaler.scale(scaled) if scaler else scaled).backward()
            logged.append(parts.logged())
        return StepLosses.mean(logged).extended(self.balance_losses())

    def balance_losses(self) -> StepLosses:
        """"balance/<type>": each load-balancing type's unweighted loss, summed over this process's
        MoE layers and averaged over the micro-batches since the last call, as aux_loss is: so
        sum(coefficient * value) is aux_loss."""
        total = torch.zeros(len(self.balance_types), dtype=torch.float64, device=self.state.comm_device)
        for _, moe in self.model.moe_layers():
            means = moe.routing_stats.balance_means(reset=True)
            if means.numel() == total.numel():  # empty until a training forward records
                total += means.to(total.device)
        return StepLosses(tuple(f"balance/{name}" for name in self.balance_types), total.float())

    def start_global_batch(self) -> None:
        """A new optimizer step: global_aux_loss counts its micro-batches from zero (Router.start_global_batch)."""
        for _, moe in self.model.moe_layers():
            moe.router.start_global_batch()

    def eval_losses(self, sizes: list[int], read_batches: Callable[[list[int]], list[Batch]]) -> tuple[Tensor, Tensor]:
        """LM loss of each evaluation round of this rank, and whether each counts (1) or pads (0), both on
        the communication device (the trainer sums them over data parallel). `sizes`: the rows of each
        evaluation batch; `read_batches(indices)`: those batches, on the device."""
        rounds = pad_rounds(len(sizes), read_batches, self.state)
        losses = []
        for i, (inputs, targets, _) in enumerate(rounds):
            key = self.routing_key(None, i, sizes[0])
            with autocast(self.device.type, self.precision):
                output = self.model(inputs, targets, routing_key=key)
                losses.append(output.lm_loss.float())
        return torch.stack(losses), _counts(rounds, self.state.comm_device)

    def routing_summaries(self, training: bool) -> list[dict]:
        """Routing statistics of every MoE layer since the last call, summed over data parallel."""
        sync_routing_stats(self.model, self.state, training)
        return [{"layer": i, **(m.routing_stats if training else m.eval_routing_stats).summary(reset=True)}
                for i, m in self.model.moe_layers()]


class PipelineExecutor(LocalExecutor):
    """All micro-batches through the pipeline schedule; logged losses summed over the stages."""

    def __init__(self, model: GPT, loss_function: LossFunction, state: ParallelState, device: torch.device,
                 precision: str, accumulation: int, micro_batch_size: int, seq_length: int, schedule: str,
                 *, seed: int = 0) -> None:
        super().__init__(model, loss_function, state, device, precision, accumulation, seed=seed)
        self.micro_batch_size = micro_batch_size
        self.embedding_group = embedding_group(state)
        self.runner = PipelineRunner(model, state, accumulation, micro_batch_size, seq_length, device,
                                     schedule=schedule, precision=precision, loss_function=loss_function)

    def forward_backward(self, next_batch: Callable[[], Batch], iteration: int, scaler: LossScaler | None,
                         before_last_backward: Callable[[], None] = lambda: None) -> StepLosses:
        """As LocalExecutor's, through the schedule (which runs the backwards itself: no overlap hook)."""
        batches = [next_batch() for _ in range(self.accumulation)]
        self.start_global_batch()
        keys = [self.routing_key(iteration, m, self.micro_batch_size) for m in range(self.accumulation)]
        out = self.runner.step(torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches]),
                               scaler.loss_scale if scaler else 1.0, iteration, routing_keys=keys)
        losses = StepLosses.of(out).extended(self.balance_losses())
        dist.all_reduce(losses.values, group=self.state.pp_group)  # lm, kd: the last stage's; the rest every stage's
        all_reduce_tied_embedding_grads(self.model, self.embedding_group)
        loss = self.loss_function.total(losses.get("lm_loss"), losses.get("aux_loss"), losses.get("z_loss"),
                                        losses.get("kd_loss"))
        return StepLosses.of({"loss": loss}).extended(losses)

    def eval_losses(self, sizes: list[int], read_batches: Callable[[list[int]], list[Batch]]) -> tuple[Tensor, Tensor]:
        """Per-round lm losses through the stages, `accumulation` rounds per schedule run. The schedule
        runs fixed shapes: a short last batch is dropped."""
        full = sum(size == self.micro_batch_size for size in sizes) or 1  # only the last batch can be short
        rounds = pad_rounds(full, read_batches, self.state, multiple=self.accumulation)
        losses = []
        for start in range(0, len(rounds), self.accumulation):
            chunk = rounds[start:start + self.accumulation]
            keys = [self.routing_key(None, start + m, self.micro_batch_size) for m in range(len(chunk))]
            self.runner.evaluate(torch.cat([r[0] for r in chunk]), torch.cat([r[1] for r in chunk]),
                                 routing_keys=keys)
            per_batch = self.runner.lm_losses if self.state.is_last_stage \
                else [torch.zeros((), device=self.state.comm_device)] * len(chunk)
            losses.extend(loss.float() for loss in per_batch)
        values = torch.stack(losses)
        dist.all_reduce(values, group=self.state.pp_group)  # only the last stage computed them
        return values, _counts(rounds, self.state.comm_device)

    def routing_summaries(self, training: bool) -> list[dict]:
        """Every stage's layers, gathered over the pipeline group."""
        layers = super().routing_summaries(training)
        stages: list = [None] * self.state.pp
        dist.all_gather_object(stages, layers, group=self.state.pp_group)
        return [layer for stage in stages for layer in stage]


def _counts(rounds: list[EvalRound], device: torch.device) -> Tensor:
    return torch.tensor([float(real) for *_, real in rounds], dtype=torch.float64, device=device)
