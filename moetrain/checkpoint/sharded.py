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
from safetensors import SafetensorError
from safetensors.torch import save_file
from torch import nn

from moetrain.checkpoint.integrity import WITH_MANIFEST_KEY, CheckpointWriteError
from moetrain.checkpoint.layout import local_entries
from moetrain.checkpoint.storage import (
    SHARD_INDEX_FILE,
    SHARD_PREFIX,
    TMP_PREFIX,
    check_weights_only_safe,
    fsync_and_digest,
    iter_dir_name,
    prepare_tmp_dir,
    publish,
    split_shared,
    write_failed,
    write_state,
)
from moetrain.parallel.mesh import ParallelState
from moetrain.parallel.pieces import Piece


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
    file = f"{SHARD_PREFIX}{state.rank:05d}.safetensors"
    tensors = {e.key: e.tensor.contiguous().cpu() for e in entries if writer[(e.key, e.piece)] == state.rank}
    # each rank hashes its own shard; a failed write (disk full) on any rank fails the save on all of them
    outcome = _attempt(lambda: _write_shard(split_shared(tensors)[0], os.path.join(tmp_dir, file)))
    outcomes = _gather(outcome, state)
    failure = next((error for _, error in outcomes if error is not None), None)
    if failure is None and state.rank == 0:
        digests = {f"{SHARD_PREFIX}{rank:05d}.safetensors": digest for rank, (digest, _) in enumerate(outcomes)}
        failure = _attempt(lambda: _write_index_and_publish(
            save_dir, iteration, tmp_dir, writer, everyone, extra, state, keep_last, files, digests))[1]
    if state.distributed:
        shared = [failure]
        dist.broadcast_object_list(shared, src=0)
        failure = shared[0] or failure
    if failure is not None:
        if state.rank == 0:
            raise write_failed(save_dir, iteration, failure)
        raise CheckpointWriteError(f"could not write checkpoint {iter_dir_name(iteration)} in {save_dir} ({failure})")
    return os.path.join(save_dir, iter_dir_name(iteration))


def _write_shard(tensors: dict, path: str) -> str:
    save_file(tensors, path)
    return fsync_and_digest(path)


def _attempt(write) -> tuple[str | None, OSError | None]:
    """(what `write` returned, None) or (None, the OSError it raised)."""
    try:
        return write(), None
    except (OSError, SafetensorError) as error:
        return None, error if isinstance(error, OSError) else OSError(str(error))


def _gather(outcome: tuple, state: ParallelState) -> list[tuple]:
    if not state.distributed:
        return [outcome]
    everyone: list = [None] * state.world_size
    dist.all_gather_object(everyone, outcome)
    return everyone


def _write_index_and_publish(save_dir: str, iteration: int, tmp_dir: str, writer: dict, everyone: list,
                             extra: dict, state: ParallelState, keep_last: int | None,
                             files: dict[str, str] | None, digests: dict[str, str]) -> None:
    """Rank 0: the global index and state.pt, then the manifest and the atomic publish."""
    index: dict[str, list] = {}
    for (key, piece), rank in sorted(writer.items(), key=lambda item: (item[0][0], item[1])):
        index.setdefault(key, []).append({"file": f"{SHARD_PREFIX}{rank:05d}.safetensors", **piece.to_json()})
    all_aliases = {alias: key for _, rank_aliases, _ in everyone for alias, key in rank_aliases.items()
                   if alias not in index}
    with open(os.path.join(tmp_dir, SHARD_INDEX_FILE), "w") as f:
        json.dump({"world_size": state.world_size, "tensors": index, "aliases": all_aliases}, f)
        f.flush()
        os.fsync(f.fileno())
    full_state = {"iteration": iteration, "optimizer": {},
                  "extra": {**extra, "rng_per_rank": [rng for _, _, rng in everyone]}, WITH_MANIFEST_KEY: True}
    check_weights_only_safe(full_state, "checkpoint state")
    publish(save_dir, iteration, keep_last, {**digests, **write_state(tmp_dir, full_state, files or {})})


def _barrier(state: ParallelState) -> None:
    if state.distributed:
        dist.barrier()
