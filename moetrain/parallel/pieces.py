"""Where each local tensor of a sharded model sits in the global model: `Piece`s and global names.

Every local tensor is a selection of a global tensor: whole, or the global indices it holds along
one dimension (experts along dimension 0 under expert parallelism, rows or columns under tensor
parallelism). The selections come from the sharded modules themselves (their global indices), so no
parameter name is spelled out here. Under ZeRO-3 a parameter is a DTensor whose local shard
continues that selection along the same dimension (moetrain.parallel.fsdp): its piece is the shard's
slice of the indices. Materialising a meta model reads them (parallelize), checkpoints
store by them (moetrain.checkpoint).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.distributed.tensor import DTensor, Shard

from moetrain.moe import MoE
from moetrain.moe.experts import GroupedExperts
from moetrain.parallel.tensor_parallel import tensor_parallel_shards


@dataclass(frozen=True)
class Piece:
    """A local tensor as a selection of a global one: all of it, or `index` along `dim`."""

    shape: tuple[int, ...]  # global shape
    dim: int | None = None
    index: tuple[int, ...] | None = None

    def to_json(self) -> dict:
        return {"shape": list(self.shape), "dim": self.dim,
                "index": list(self.index) if self.index is not None else None}

    @classmethod
    def from_json(cls, data: dict) -> Piece:
        index = tuple(data["index"]) if data["index"] is not None else None
        return cls(tuple(data["shape"]), data["dim"], index)

    def sharded(self, dim: int, start: int, length: int) -> Piece:
        """The part of this piece that rows [start, start + length) of its local tensor along `dim` hold."""
        if self.dim not in (None, dim):
            raise ValueError(f"a piece split along dimension {self.dim} cannot be sharded along {dim}")
        indices = self.index if self.dim is not None else range(self.shape[dim])
        return Piece(self.shape, dim, tuple(indices[start:start + length]))

    def cut_from(self, value: Tensor, held: Piece) -> Tensor | None:
        """This piece's part of `value`, which holds piece `held` of the same global tensor (a whole teacher
        weight for a ZeRO-3 student's shard); None where `held` does not cover this piece."""
        if held.shape != self.shape or (self.dim is None and held.dim is not None):
            return None
        if held == self:
            return value
        if held.dim not in (None, self.dim):
            return None
        position = {g: i for i, g in enumerate(held.index if held.dim is not None else range(self.shape[self.dim]))}
        if any(g not in position for g in self.index):
            return None
        return value.index_select(self.dim, torch.tensor([position[g] for g in self.index], dtype=torch.long))


def local(tensor: Tensor) -> Tensor:
    """This rank's shard of a DTensor (a ZeRO-3 parameter, its gradient or optimizer state), else the tensor."""
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def like(param: Tensor, value: Tensor) -> Tensor:
    """`value` (this rank's local values of `param`'s shape) as `param` is held: a DTensor shard like it."""
    if not isinstance(param, DTensor):
        return value.to(param.device)
    return DTensor.from_local(value.to(param.to_local().device), param.device_mesh, param.placements,
                              run_check=False, shape=param.shape, stride=param.stride())


def _shard_of(tensor: DTensor) -> tuple[int, int, int]:
    """(dimension, first row, rows) of a DTensor's local shard: FSDP's even chunks, the last ones short."""
    (placement,) = tensor.placements
    if not isinstance(placement, Shard):
        raise ValueError(f"expected a tensor sharded along one dimension, got placements {tensor.placements}")
    dim, size = placement.dim, tensor.shape[placement.dim]
    chunk = -(-size // tensor.device_mesh.size())
    start = min(size, tensor.device_mesh.get_local_rank() * chunk)
    return dim, start, tensor.to_local().shape[dim]


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
        shard = _shard_of(tensor) if isinstance(tensor, DTensor) else None
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
        if shard is not None:
            piece, tensor = piece.sharded(*shard), tensor.to_local()
        pieces[name] = (global_name, tensor, piece)
    return pieces
