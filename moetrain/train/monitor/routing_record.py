"""Routing record and replay (--record-routing DIR, --replay-routing DIR): every token's chosen experts, per
step and MoE layer, indexed by global token position, so a record made under one layout replays under any.

Layout of DIR: `{phase}/{step:08d}/rank{rank:05d}.npz` (phase `train`, `eval`, or `generate`: each forward of
`moetrain generate`, record_or_replay_generation), one file per step and
writing rank (tensor-parallel rank 0 of each group: its peers see the same tokens), written when the step
ends (atomically: a temporary name, then a rename). A file holds, for each MoE layer L, `L{L}_starts` (the
first global position of each forward), `L{L}_lengths` (its tokens) and `L{L}_choices` ([tokens, k], uint8 for
up to 256 experts, else uint16). Positions count tokens in the step's global batch: sample i's token t is
i * seq_length + t (moetrain.moe.routing_noise), so the files of all ranks together cover the step once.
A resumed run overwrites the steps from its checkpoint on (the directories a crashed run left past it are
removed first), so a record is always the history of the run that produced the checkpoint.

Replay loads a step's files (any number of ranks), checks that they cover every token the step routes (else
one line naming the step), and makes each router choose the recorded experts (moetrain.moe.routing_hook).
"""

from __future__ import annotations

import glob
import os
import shutil

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor

from moetrain.config import Config
from moetrain.model import GPT
from moetrain.moe.routing_hook import RoutingHook
from moetrain.moe.routing_noise import routing_key
from moetrain.parallel.mesh import ParallelState

PHASES = ("train", "eval", "generate")


class RoutingRecordError(ValueError):
    """A replay asked for choices its record does not hold."""


def step_dir(root: str, phase: str, step: int) -> str:
    return os.path.join(root, phase, f"{step:08d}")


def read_routing(root: str, phase: str, step: int) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """layer -> (choices [positions, k] int64, covered [positions] bool) of one recorded step, from every
    rank's file; a position no file holds is left uncovered (choice 0)."""
    files = sorted(glob.glob(os.path.join(step_dir(root, phase, step), "rank*.npz")))
    if not files:
        raise RoutingRecordError(f"--replay-routing {root}: no record of {phase} step {step} "
                                 f"({step_dir(root, phase, step)} is missing); record this run with --record-routing")
    runs: dict[int, list[tuple[int, np.ndarray]]] = {}
    for path in files:
        with np.load(path) as data:
            for name in data.files:
                if name.endswith("_starts"):
                    layer = int(name[1:-len("_starts")])
                    prefix = f"L{layer}_"
                    choices = data[prefix + "choices"].astype(np.int64)
                    ends = np.cumsum(data[prefix + "lengths"])
                    runs.setdefault(layer, []).extend((int(start), choices[end - length:end]) for start, length, end
                                                      in zip(data[prefix + "starts"], data[prefix + "lengths"], ends))
    tables = {}
    for layer, layer_runs in runs.items():
        size = max(start + len(rows) for start, rows in layer_runs)
        k = layer_runs[0][1].shape[1]
        table, covered = np.zeros((size, k), dtype=np.int64), np.zeros(size, dtype=bool)
        for start, rows in layer_runs:
            table[start:start + len(rows)] = rows
            covered[start:start + len(rows)] = True
        tables[layer] = (table, covered)
    return tables


class RoutingTape(RoutingHook):
    """Records (`record_dir`) and/or replays (`replay_dir`) the choices of every keyed forward between
    `begin(phase, step, ...)` and `end()`; forwards outside those (none in training) route on their own."""

    def __init__(self, record_dir: str | None, replay_dir: str | None, *, rank: int, writes: bool,
                 num_experts: int, device: torch.device, micro_batch: int, seq_length: int, train_tokens: int) -> None:
        self.record_dir, self.replay_dir, self.rank, self.writes = record_dir, replay_dir, rank, writes
        self.micro_batch, self.seq_length, self.train_tokens = micro_batch, seq_length, train_tokens
        self.dtype = np.uint8 if num_experts <= 256 else np.uint16
        self.device = device
        self.phase, self.step = None, 0
        self.recorded: list[tuple[int, Tensor, Tensor]] = []  # (layer, first position, choices) of each forward
        self.tables: dict[int, Tensor] = {}  # the replayed step's choices by layer, on the device

    def discard_after(self, step: int, distributed: bool) -> None:
        """Remove the record's steps from `step` on (left by a crashed run past its last checkpoint), before
        this run writes them again; rank 0 removes, every rank waits for it."""
        if self.record_dir is not None and self.rank == 0:
            for phase in PHASES:
                for path in glob.glob(os.path.join(self.record_dir, phase, "*")):
                    if os.path.basename(path).isdigit() and int(os.path.basename(path)) >= step:
                        shutil.rmtree(path)
        if distributed:
            dist.barrier()

    def begin_train(self, step: int) -> None:
        """Training step `step`: its forwards route the whole global batch."""
        self.begin("train", step, [(0, self.train_tokens)])

    def begin_eval(self, step: int, sizes: list[int]) -> None:
        """The evaluation at step `step` of batches of `sizes` rows: batch j's tokens start at j * micro-batch."""
        tokens = self.micro_batch * self.seq_length
        self.begin("eval", step, [(j * tokens, size * self.seq_length) for j, size in enumerate(sizes)])

    def begin(self, phase: str, step: int, routed: list[tuple[int, int]]) -> None:
        """Start `phase` step `step`, whose forwards route the global positions in the `routed` ranges
        (start, count): a replay loads that step's choices and checks they cover those positions."""
        self.phase, self.step, self.recorded = phase, step, []
        self.routed_end = max(start + count for start, count in routed)
        if self.replay_dir is None:
            return
        self.tables = {}
        for layer, (table, covered) in read_routing(self.replay_dir, phase, step).items():
            for start, count in routed:
                if start + count > len(covered) or not covered[start:start + count].all():
                    missing = start + int(np.argmin(np.append(covered[start:start + count], False)))
                    raise RoutingRecordError(
                        f"--replay-routing {self.replay_dir}: the record of {phase} step {step} is short: MoE layer "
                        f"{layer} has no choice for token {missing}; replay with the global batch and sequence "
                        f"length it was recorded with")
            self.tables[layer] = torch.from_numpy(table).to(self.device)

    def route(self, layer: int, first_position: Tensor, chosen: Tensor, training: bool) -> Tensor:
        if self.phase is None:
            return chosen
        if self.replay_dir is not None:
            table = self.tables.get(layer)
            if table is None or table.shape[1] != chosen.shape[1]:
                held = "no choices" if table is None else f"top-{table.shape[1]} choices"
                raise RoutingRecordError(f"--replay-routing {self.replay_dir}: {self.phase} step {self.step} holds "
                                         f"{held} for MoE layer {layer}, which routes top-{chosen.shape[1]}; replay "
                                         f"with the model it was recorded with")
            # positions past the record only occur in evaluation's padding rounds, which do not count
            rows = (first_position + torch.arange(chosen.shape[0], device=chosen.device)).clamp(max=len(table) - 1)
            chosen = table.index_select(0, rows.to(table.device)).to(chosen.device)
        if self.record_dir is not None and self.writes:
            self.recorded.append((layer, first_position, chosen.detach()))
        return chosen

    def end(self) -> None:
        """Write this rank's file of the step (after the step's host sync: the copies wait for nothing)."""
        if self.record_dir is not None and self.writes and self.recorded:
            forwards: dict[int, dict[int, np.ndarray]] = {}  # layer -> first position -> choices
            for layer, start, choices in self.recorded:  # a recomputed forward (recomputation) is kept once
                if int(start) < self.routed_end:  # not an evaluation padding round (its batch counts elsewhere)
                    forwards.setdefault(layer, {}).setdefault(int(start), choices.cpu().numpy().astype(self.dtype))
            arrays = {}
            for layer, by_start in sorted(forwards.items()):
                starts = sorted(by_start)
                arrays[f"L{layer}_starts"] = np.array(starts, dtype=np.int64)
                arrays[f"L{layer}_lengths"] = np.array([len(by_start[s]) for s in starts], dtype=np.int64)
                arrays[f"L{layer}_choices"] = np.concatenate([by_start[s] for s in starts])
            directory = step_dir(self.record_dir, self.phase, self.step)
            os.makedirs(directory, exist_ok=True)
            path = os.path.join(directory, f"rank{self.rank:05d}.npz")
            with open(path + ".tmp", "wb") as f:
                np.savez(f, **arrays)
            os.replace(path + ".tmp", path)
        self.phase, self.recorded, self.tables = None, [], {}


def attach_routing_tape(cfg: Config, model: GPT, state: ParallelState, device: torch.device,
                        iteration: int) -> RoutingTape | None:
    """A RoutingTape for --record-routing / --replay-routing, hooked into every router of `model` (None when
    neither is given); the record's steps from `iteration` on are removed before this run writes them."""
    record, replay = cfg.monitor.record_routing, cfg.monitor.replay_routing
    if record is None and replay is None:
        return None
    tape = RoutingTape(record, replay, rank=state.rank, writes=state.tp_rank == 0,
                       num_experts=max(cfg.experts_per_layer()), device=device,
                       micro_batch=cfg.training.micro_batch_size, seq_length=cfg.model.seq_length,
                       train_tokens=cfg.global_batch(state.world_size) * cfg.model.seq_length)
    for _, moe in model.moe_layers():
        moe.router.hook = tape
    tape.discard_after(iteration, state.distributed)
    return tape


def record_or_replay_generation(model: GPT, record_dir: str | None, replay_dir: str | None, seed: int) -> None:
    """Make `model.generate` record (`record_dir`) or replay (`replay_dir`) its routing: each forward of the
    generation (a whole context, batch x length tokens) is step i of phase `generate`, counted over the calls,
    keyed by (seed, i) so its positions are those of its context. Keyed routing noise replaces torch's RNG in
    these forwards, so a sampling router draws other (equally distributed) noise than without the flags."""
    if record_dir is None and replay_dir is None:
        return
    tape = RoutingTape(record_dir, replay_dir, rank=0, writes=True,
                       num_experts=max(moe.num_experts for _, moe in model.moe_layers()),
                       device=next(model.parameters()).device, micro_batch=1, seq_length=1, train_tokens=0)
    for _, moe in model.moe_layers():
        moe.router.hook = tape
    tape.discard_after(0, distributed=False)
    forward, forwards = model.forward, [0]

    def keyed_forward(input_ids: Tensor, *args, **kwargs):
        step = forwards[0]
        forwards[0] += 1
        tape.begin("generate", step, [(0, input_ids.numel())])
        output = forward(input_ids, *args, routing_key=routing_key(seed, step, 0, input_ids.device, training=False),
                         **kwargs)
        tape.end()
        return output
    model.forward = keyed_forward
