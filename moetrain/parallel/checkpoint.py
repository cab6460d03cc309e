"""Sharded checkpoints with one global index: save under one layout, load under any other.

Every local tensor is described as a selection of a global tensor: whole, or the global indices
it holds along one dimension (experts along dimension 0 under expert parallelism, rows or
columns under tensor parallelism). Each distinct piece is written once, by one of the ranks
holding it, into that rank's ``shard-NNNNN.safetensors``; ``index.json`` maps every global key
(``model/<name>``, ``optim/<name>/<state>``) to its pieces. Loading assembles whatever selection
the new layout needs from whichever pieces cover it, so EP 2 -> EP 4 -> one process, DP 4 -> DP 2,
ZeRO on or off, all just work; a key or index the checkpoint lacks is a clear error.
Single-process checkpoints (``model.safetensors`` + ``state.pt``) read through the same interface.
"""

from __future__ import annotations

import json
import os
import zlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from moetrain.moe import MoE
from moetrain.moe.experts import GroupedExperts
from moetrain.parallel.mesh import ParallelState
from moetrain.parallel.tensor_parallel import tensor_parallel_shards
from moetrain.parallel.zero import ZeroOptimizer
from moetrain.train.checkpoint import (
    SHARD_INDEX_FILE,
    TMP_PREFIX,
    CheckpointError,
    _check_weights_only_safe,
    _load_model_state,
    _load_state,
    _split_shared,
    iter_dir_name,
    prepare_tmp_dir,
    publish,
    write_state,
)

OPTIMIZER_PARAM_NAMES = "optimizer_param_names"  # extra key: names of the optimizer's params, in order


@dataclass(frozen=True)
class Piece:
    """A local tensor as a selection of a global one: all of it, or `index` along `dim`."""

    shape: tuple[int, ...]  # global shape
    dim: int | None = None
    index: tuple[int, ...] | None = None

    def to_json(self) -> dict:
        return {"shape": list(self.shape), "dim": self.dim, "index": list(self.index) if self.index else None}

    @classmethod
    def from_json(cls, data: dict) -> Piece:
        index = tuple(data["index"]) if data["index"] is not None else None
        return cls(tuple(data["shape"]), data["dim"], index)


def model_pieces(model: nn.Module) -> dict[str, tuple[str, Tensor, Piece]]:
    """Local state-dict name -> (global name, tensor, piece) for every tensor of the (sharded) model."""
    tp = tensor_parallel_shards(model)
    experts: dict[str, tuple[int, int, str]] = {}  # local prefix -> (first expert, count, global prefix)
    for name, module in model.named_modules():
        if isinstance(module, MoE) and module.ep_size > 1:
            experts[f"{name}.experts."] = (module.first_expert, module.num_experts, name)
    pieces = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        tensor = tensor.detach()
        piece, global_name = Piece(tuple(tensor.shape)), name
        if name in tp:
            dim, index, full = tp[name]
            piece = Piece(tuple(full), dim, tuple(index.tolist()))
        for prefix, (first, total, moe_name) in experts.items():
            if name.startswith(prefix):
                local = name[len(prefix):]
                module = model.get_submodule(f"{moe_name}.experts")
                if isinstance(module, GroupedExperts):
                    piece = Piece((total, *tensor.shape[1:]), 0, tuple(range(first, first + tensor.shape[0])))
                else:  # ModuleExperts: experts.<i>.<param>, renumbered to the global expert index
                    position, rest = local.split(".", 2)[1:]
                    global_name = f"{prefix}experts.{first + int(position)}.{rest}"
        pieces[name] = (global_name, tensor, piece)
    return pieces


def _optimizer_states(optimizer, params: list[nn.Parameter]) -> dict[nn.Parameter, dict[str, Tensor]]:
    """AdamW state of each parameter this rank holds it for (all of them, or its ZeRO share)."""
    if isinstance(optimizer, ZeroOptimizer):
        return {p: optimizer.state_of(p) for p in optimizer.owned}
    return {p: optimizer.state[p] for p in params if p in optimizer.state}


def _set_optimizer_state(optimizer, param: nn.Parameter, state: dict[str, Tensor]) -> None:
    if isinstance(optimizer, ZeroOptimizer):
        optimizer.set_state(param, state)
    else:
        optimizer.state[param] = {k: v.to(param.device) for k, v in state.items()}


def _local_entries(model: nn.Module, optimizer) -> Iterator[tuple[str, Tensor, Piece]]:
    """(global key, tensor, piece) of everything this rank holds, model and optimizer state."""
    pieces = model_pieces(model)
    seen: set[tuple] = set()
    by_param = {}
    for name, (global_name, tensor, piece) in pieces.items():
        identity = (tensor.data_ptr(), tuple(tensor.shape))
        by_param[name] = (global_name, piece)
        if identity in seen and tensor.numel():
            continue  # tied to the embedding: stored once under tok_emb.weight
        seen.add(identity)
        yield f"model/{global_name}", tensor, piece
    names = {id(p): n for n, p in model.named_parameters()}
    for param, state in _optimizer_states(optimizer, list(model.parameters())).items():
        global_name, piece = by_param[names[id(param)]]
        for key, value in state.items():
            value = value.detach()
            value_piece = piece if value.shape == param.shape else Piece(tuple(value.shape))
            yield f"optim/{global_name}/{key}", value, value_piece


def save_sharded(save_dir: str, iteration: int, model: nn.Module, optimizer, extra: dict, rng: dict,
                 state: ParallelState, keep_last: int | None = None, files: dict[str, str] | None = None) -> str:
    """Every rank writes the pieces it is assigned; rank 0 writes the index and publishes atomically.

    `extra` (data position, config, loss scaler) is the same on every rank; `rng` is this rank's.
    """
    entries = list(_local_entries(model, optimizer))
    mine = [(key, piece) for key, _, piece in entries]
    everyone: list = [(mine, rng)]
    if state.distributed:
        everyone = [None] * state.world_size
        dist.all_gather_object(everyone, (mine, rng))
    holders: dict[tuple[str, Piece], list[int]] = {}
    for rank, (listing, _) in enumerate(everyone):
        for key, piece in listing:
            holders.setdefault((key, piece), []).append(rank)
    writer = {item: ranks[zlib.crc32(item[0].encode()) % len(ranks)] for item, ranks in holders.items()}
    if state.rank == 0:
        prepare_tmp_dir(save_dir, iteration)
    _barrier(state)
    tmp_dir = os.path.join(save_dir, TMP_PREFIX + iter_dir_name(iteration))
    file = f"shard-{state.rank:05d}.safetensors"
    tensors = {key: t.contiguous().cpu() for key, t, piece in entries if writer[(key, piece)] == state.rank}
    save_file(_split_shared(tensors)[0], os.path.join(tmp_dir, file))
    _barrier(state)
    if state.rank == 0:
        index: dict[str, list] = {}
        for (key, piece), rank in sorted(writer.items(), key=lambda item: (item[0][0], item[1])):
            index.setdefault(key, []).append({"file": f"shard-{rank:05d}.safetensors", **piece.to_json()})
        with open(os.path.join(tmp_dir, SHARD_INDEX_FILE), "w") as f:
            json.dump({"world_size": state.world_size, "tensors": index}, f)
        full_state = {"iteration": iteration, "optimizer": {},
                      "extra": {**extra, "rng_per_rank": [rng for _, rng in everyone]}}
        _check_weights_only_safe(full_state, "checkpoint state")
        write_state(tmp_dir, full_state, files or {})
        publish(save_dir, iteration, keep_last)
    _barrier(state)
    return os.path.join(save_dir, iter_dir_name(iteration))


class CheckpointReader:
    """Reads global tensors, or any piece of them, from a sharded or a single-process checkpoint."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.state = _load_state(path)
        self.sharded = os.path.isfile(os.path.join(path, SHARD_INDEX_FILE))
        self._files: dict[str, object] = {}
        if self.sharded:
            with open(os.path.join(path, SHARD_INDEX_FILE)) as f:
                self.index = json.load(f)["tensors"]
        else:
            self._full = {f"model/{k}": v for k, v in _load_model_state(path).items()}
            self._full.update(self._named_optimizer_state())

    def _named_optimizer_state(self) -> dict[str, Tensor]:
        """A torch optimizer state_dict (keyed by position) re-keyed by parameter name."""
        optimizer = self.state["optimizer"]
        if not optimizer or not optimizer.get("state"):
            return {}
        names = self.state["extra"].get(OPTIMIZER_PARAM_NAMES)
        if names is None:
            return {}  # saved by an older moetrain: weights only, the optimizer starts afresh
        return {f"optim/{names[int(position)]}/{key}": value
                for position, state in optimizer["state"].items() for key, value in state.items()}

    def keys(self) -> list[str]:
        return list(self.index) if self.sharded else list(self._full)

    def model_state(self) -> dict[str, Tensor]:
        """All model tensors, whole (what a single-process model loads)."""
        if not self.sharded:
            return {k[len("model/"):]: v for k, v in self._full.items() if k.startswith("model/")}
        state = {key[len("model/"):]: self.read(key, Piece(tuple(entries[0]["shape"])))
                 for key, entries in self.index.items() if key.startswith("model/")}
        if "lm_head.weight" not in state and "tok_emb.weight" in state:
            state["lm_head.weight"] = state["tok_emb.weight"]  # tied: stored once
        return state

    def read(self, key: str, want: Piece) -> Tensor:
        """The selection `want` of global tensor `key`, assembled from the pieces that hold it."""
        if not self.sharded:
            if key not in self._full:
                raise CheckpointError(f"{self.path} has no tensor {key!r}; it was saved from a different model")
            return _select(self._full[key], want, key, self.path)
        if key not in self.index:
            raise CheckpointError(f"{self.path} has no tensor {key!r}; it was saved from a different model")
        pieces = [(Piece.from_json(entry), entry["file"]) for entry in self.index[key]]
        whole = next((file for piece, file in pieces if piece.dim is None), None)
        if whole is not None:
            return _select(self._open(whole).get_tensor(key), want, key, self.path)
        dim = pieces[0][0].dim
        if pieces[0][0].shape != want.shape:
            raise CheckpointError(f"{key} has shape {list(pieces[0][0].shape)} in {self.path} but the model needs "
                                  f"{list(want.shape)}; load it with the model flags it was saved with")
        if want.dim not in (None, dim):
            raise CheckpointError(f"{key} was split along dimension {dim} when saved and {want.dim} now; "
                                  "consolidate the checkpoint first (moetrain consolidate)")
        wanted = want.index if want.dim is not None else tuple(range(want.shape[dim]))
        target = {g: j for j, g in enumerate(wanted)}
        out, covered = None, 0
        for piece, file in pieces:
            pairs = [(i, target[g]) for i, g in enumerate(piece.index) if g in target]
            if not pairs:
                continue
            tensor = self._open(file).get_tensor(key)
            if out is None:
                shape = list(want.shape)
                shape[dim] = len(wanted)
                out = tensor.new_empty(shape)
            source, destination = (torch.tensor(column) for column in zip(*pairs))
            out.index_copy_(dim, destination, tensor.index_select(dim, source))
            covered += len(pairs)
        if covered != len(wanted):
            raise CheckpointError(f"{self.path} holds {covered} of the {len(wanted)} slices of {key} this layout "
                                  "needs; the checkpoint is incomplete")
        return out

    def _open(self, file: str):
        if file not in self._files:
            self._files[file] = safe_open(os.path.join(self.path, file), framework="pt")
        return self._files[file]


def _select(full: Tensor, want: Piece, key: str, path: str) -> Tensor:
    if tuple(full.shape) != want.shape:
        raise CheckpointError(f"{key} has shape {list(full.shape)} in {path} but the model needs "
                              f"{list(want.shape)}; load it with the model flags it was saved with")
    if want.dim is None:
        return full
    return full.index_select(want.dim, torch.tensor(want.index))


@torch.no_grad()
def load_into(reader: CheckpointReader, model: nn.Module, optimizer) -> None:
    """Fill this rank's model tensors and optimizer state from any layout's checkpoint."""
    keys = set(reader.keys())
    tied_fallback = "model/tok_emb.weight"
    entries = model_pieces(model)
    for global_name, tensor, piece in entries.values():
        key = f"model/{global_name}"
        if key not in keys and global_name == "lm_head.weight" and tied_fallback in keys:
            key = tied_fallback  # saved tied, loaded as a pipeline stage's own copy
        tensor.copy_(reader.read(key, piece))
    state_keys: dict[str, list[str]] = {}
    for key in keys:
        if key.startswith("optim/"):
            global_name, state_key = key[len("optim/"):].rsplit("/", 1)
            state_keys.setdefault(global_name, []).append(state_key)
    params = dict(model.named_parameters())
    for name, (param, held) in _held_params(optimizer, params).items():
        global_name, _, piece = entries[name]
        if not held or global_name not in state_keys:
            continue
        state = {}
        for state_key in state_keys[global_name]:
            key = f"optim/{global_name}/{state_key}"
            value_piece = piece if state_key != "step" else Piece(())
            state[state_key] = reader.read(key, value_piece)
        _set_optimizer_state(optimizer, param, state)


def _held_params(optimizer, params: dict[str, nn.Parameter]) -> dict[str, tuple[nn.Parameter, bool]]:
    """Each named parameter and whether this rank keeps its optimizer state."""
    owned = set(optimizer.owned) if isinstance(optimizer, ZeroOptimizer) else set(params.values())
    return {name: (param, param in owned) for name, param in params.items()}


def optimizer_param_names(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """Names of the optimizer's parameters in its state_dict order (saved with single-process checkpoints)."""
    names = {id(p): n for n, p in model.named_parameters()}
    return [names[id(p)] for group in optimizer.param_groups for p in group["params"]]


def rank_rng_state(extra: dict, rank: int, world_size: int) -> dict:
    """This rank's saved RNG state; under a different world size, rank modulo the saved count."""
    if "rng_per_rank" in extra:
        states = extra["rng_per_rank"]
        return states[rank % len(states)]
    return extra["rng"]


def _barrier(state: ParallelState) -> None:
    if state.distributed:
        dist.barrier()


def consolidate(load_dir: str, out_dir: str) -> str:
    """Merge a checkpoint of any layout into a single-process one: whole tensors, torch optimizer state."""
    from moetrain.config import Config, ParallelConfig
    from moetrain.model import GPT
    from moetrain.train.checkpoint import resolve_checkpoint_dir, save_checkpoint
    from moetrain.train.optimizer import build_optimizer

    reader = CheckpointReader(resolve_checkpoint_dir(load_dir))
    extra = dict(reader.state["extra"])
    cfg = Config.from_dict(extra["config"])
    cfg.parallel = ParallelConfig()  # the result is a one-process checkpoint
    model = GPT(cfg.model, cfg.moe)
    tc = cfg.training
    optimizer = build_optimizer(model, lr=tc.lr, weight_decay=tc.weight_decay,
                                betas=(tc.adam_beta1, tc.adam_beta2), eps=tc.adam_eps)
    load_into(reader, model, optimizer)
    extra.update(config=cfg.to_dict(), rng=rank_rng_state(extra, 0, 1),
                 optimizer_param_names=optimizer_param_names(model, optimizer))
    extra.pop("rng_per_rank", None)
    tokenizer = os.path.join(reader.path, "tokenizer.json")
    files = {}
    if os.path.isfile(tokenizer):
        with open(tokenizer, encoding="utf-8") as f:
            files["tokenizer.json"] = f.read()
    return save_checkpoint(out_dir, int(reader.state["iteration"]), model_state=model.state_dict(),
                           optimizer_state=optimizer.state_dict(), extra=extra, files=files)
