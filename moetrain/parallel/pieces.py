"""Where each local tensor of a sharded model sits in the global model: `Piece`s and global names.

Every local tensor is a selection of a global tensor: whole, or the global indices it holds along
one dimension (experts along dimension 0 under expert parallelism, rows or columns under tensor
parallelism). The selections come from the sharded modules themselves (their global indices), so no
parameter name is spelled out here. Materialising a meta model reads them (parallelize), checkpoints
store by them (moetrain.checkpoint).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn

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
