"""Sharded checkpoints: every rank writes its pieces once, rank 0 writes one global index.

``index.json`` maps every global key (``model/<name>``, ``optim/<name>/<state>``) to the pieces
that hold it, each written once, by one of the ranks holding it, into that rank's
``shard-NNNNN.safetensors``; ``aliases`` maps tied keys to the key they are stored under.
moetrain.checkpoint.reader assembles any other layout's selection from these pieces.
"""

from __future__ import annotations

import json
import os
import zlib

import torch.distributed as dist
from safetensors.torch import save_file
from torch import nn

from moetrain.checkpoint.layout import Piece, local_entries
from moetrain.checkpoint.storage import (
    SHARD_INDEX_FILE,
    TMP_PREFIX,
    check_weights_only_safe,
    iter_dir_name,
    prepare_tmp_dir,
    publish,
    split_shared,
    write_state,
)
from moetrain.parallel.mesh import ParallelState


def save_sharded(save_dir: str, iteration: int, model: nn.Module, optimizer, extra: dict, rng: dict,
                 state: ParallelState, keep_last: int | None = None, files: dict[str, str] | None = None) -> str:
    """Every rank writes the pieces it is assigned; rank 0 writes the index and publishes atomically.

    `extra` (data position, config, loss scaler) is the same on every rank; `rng` is this rank's.
    """
    entries, aliases = local_entries(model, optimizer)
    mine = [(e.key, e.piece) for e in entries]
    everyone: list = [(mine, aliases, rng)]
    if state.distributed:
        everyone = [None] * state.world_size
        dist.all_gather_object(everyone, (mine, aliases, rng))
    holders: dict[tuple[str, Piece], list[int]] = {}
    for rank, (listing, _, _) in enumerate(everyone):
        for key, piece in listing:
            holders.setdefault((key, piece), []).append(rank)
    writer = {item: ranks[zlib.crc32(item[0].encode()) % len(ranks)] for item, ranks in holders.items()}
    if state.rank == 0:
        prepare_tmp_dir(save_dir, iteration)
    _barrier(state)
    tmp_dir = os.path.join(save_dir, TMP_PREFIX + iter_dir_name(iteration))
    file = f"shard-{state.rank:05d}.safetensors"
    tensors = {e.key: e.tensor.contiguous().cpu() for e in entries if writer[(e.key, e.piece)] == state.rank}
    save_file(split_shared(tensors)[0], os.path.join(tmp_dir, file))
    _barrier(state)
    if state.rank == 0:
        index: dict[str, list] = {}
        for (key, piece), rank in sorted(writer.items(), key=lambda item: (item[0][0], item[1])):
            index.setdefault(key, []).append({"file": f"shard-{rank:05d}.safetensors", **piece.to_json()})
        all_aliases = {alias: key for _, rank_aliases, _ in everyone for alias, key in rank_aliases.items()
                       if alias not in index}
        with open(os.path.join(tmp_dir, SHARD_INDEX_FILE), "w") as f:
            json.dump({"world_size": state.world_size, "tensors": index, "aliases": all_aliases}, f)
        full_state = {"iteration": iteration, "optimizer": {},
                      "extra": {**extra, "rng_per_rank": [rng for _, _, rng in everyone]}}
        check_weights_only_safe(full_state, "checkpoint state")
        write_state(tmp_dir, full_state, files or {})
        publish(save_dir, iteration, keep_last)
    _barrier(state)
    return os.path.join(save_dir, iter_dir_name(iteration))


def _barrier(state: ParallelState) -> None:
    if state.distributed:
        dist.barrier()
