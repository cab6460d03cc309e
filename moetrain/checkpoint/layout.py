"""Where each local tensor sits in the global model: `Piece`s, global names, tied names, optimizer state.

Every local tensor is a selection of a global tensor: whole, or the global indices it holds along
one dimension (experts along dimension 0 under expert parallelism, rows or columns under tensor
parallelism). The selections come from the sharded modules themselves (their global indices), and
ties from tensor identity, so no parameter name is spelled out here.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from moetrain.moe import MoE
from moetrain.moe.experts import GroupedExperts
from moetrain.parallel.tensor_parallel import tensor_parallel_shards
from moetrain.parallel.zero import ZeroOptimizer

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


@dataclass(frozen=True)
class Entry:
    """One tensor this rank holds, under its global key (``model/<name>`` or ``optim/<name>/<state>``)."""

    key: str
    tensor: Tensor
    piece: Piece


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


def optimizer_states(optimizer, params: list[nn.Parameter]) -> dict[nn.Parameter, dict[str, Tensor]]:
    """AdamW state of each parameter this rank holds it for (all of them, or its ZeRO share)."""
    if isinstance(optimizer, ZeroOptimizer):
        return {p: optimizer.state_of(p) for p in optimizer.owned}
    return {p: optimizer.state[p] for p in params if p in optimizer.state}


def set_optimizer_state(optimizer, param: nn.Parameter, state: dict[str, Tensor]) -> None:
    if isinstance(optimizer, ZeroOptimizer):
        optimizer.set_state(param, state)
    else:
        optimizer.state[param] = {k: v.to(param.device) for k, v in state.items()}


def holds_optimizer_state(optimizer, param: nn.Parameter) -> bool:
    """Whether this rank keeps `param`'s optimizer state (always, except for another rank's ZeRO share)."""
    return not isinstance(optimizer, ZeroOptimizer) or optimizer.owner_rank.get(param) == optimizer.rank


def local_entries(model: nn.Module, optimizer) -> tuple[list[Entry], dict[str, str]]:
    """Everything this rank holds (model and optimizer state), and the tied keys: alias -> stored key.

    A tensor that is the same tensor as an earlier one (a tied embedding) is stored once, under the
    first name; the alias lets readers find it under the other.
    """
    entries, aliases = [], {}
    first_key: dict[tuple, str] = {}
    global_of = {}
    for name, (global_name, tensor, piece) in model_pieces(model).items():
        global_of[name] = (global_name, piece)
        key, identity = f"model/{global_name}", (tensor.data_ptr(), tuple(tensor.shape))
        if identity in first_key and tensor.numel():
            aliases[key] = first_key[identity]
            continue
        first_key[identity] = key
        entries.append(Entry(key, tensor, piece))
    names = {id(p): n for n, p in model.named_parameters()}
    for param, state in optimizer_states(optimizer, list(model.parameters())).items():
        global_name, piece = global_of[names[id(param)]]
        for state_key, value in state.items():
            value = value.detach()
            value_piece = piece if value.shape == param.shape else Piece(tuple(value.shape))
            entries.append(Entry(f"optim/{global_name}/{state_key}", value, value_piece))
    return entries, aliases


def optimizer_param_names(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """Names of the optimizer's parameters in its state_dict order (saved with single-process checkpoints)."""
    names = {id(p): n for n, p in model.named_parameters()}
    return [names[id(p)] for group in optimizer.param_groups for p in group["params"]]
