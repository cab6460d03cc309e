"""What a rank stores: its model tensors under their global names (the `Piece`s of moetrain.parallel.pieces),
tied names, optimizer state.

Ties come from tensor identity, so no parameter name is spelled out here.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from moetrain.parallel.pieces import Piece, like, local, model_pieces
from moetrain.parallel.zero import ZeroOptimizer

OPTIMIZER_PARAM_NAMES = "optimizer_param_names"  # extra key: names of the optimizer's params, in order


@dataclass(frozen=True)
class Entry:
    """One tensor this rank holds, under its global key (``model/<name>`` or ``optim/<name>/<state>``)."""

    key: str
    tensor: Tensor
    piece: Piece


def optimizer_states(optimizer, params: list[nn.Parameter]) -> dict[nn.Parameter, dict[str, Tensor]]:
    """AdamW state of each parameter this rank holds it for (all of them, or its ZeRO share)."""
    if isinstance(optimizer, ZeroOptimizer):
        return {p: optimizer.state_of(p) for p in optimizer.owned}
    return {p: optimizer.state[p] for p in params if p in optimizer.state}


def set_optimizer_state(optimizer, param: nn.Parameter, state: dict[str, Tensor]) -> None:
    if isinstance(optimizer, ZeroOptimizer):
        optimizer.set_state(param, state)
    else:  # ZeRO-3: the state of a DTensor parameter is a DTensor sharded like it (the step count is not)
        optimizer.state[param] = {k: like(param, v) if v.shape == local(param).shape and v.dim() else
                                  v.to(local(param).device) for k, v in state.items()}


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
        if piece.index == ():  # a ZeRO-3 rank whose shard of a small tensor is empty
            continue
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
            value = local(value.detach())
            value_piece = piece if value.shape == local(param).shape and value.dim() else Piece(tuple(value.shape))
            if value_piece.index == ():
                continue
            entries.append(Entry(f"optim/{global_name}/{state_key}", value, value_piece))
    return entries, aliases


def optimizer_param_names(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """Names of the optimizer's parameters in its state_dict order (saved with single-process checkpoints)."""
    names = {id(p): n for n, p in model.named_parameters()}
    return [names[id(p)] for group in optimizer.param_groups for p in group["params"]]
