"""Checkpoints: `save` / `restore` (either format, chosen from the run's layout), `load_model`,
`read_model_config` (merging one into a single-process checkpoint: moetrain.train.consolidate).

Modules, each importing only those before it: storage (files, atomic publish, state.pt), rng,
layout (pieces and global names of a sharded model), sharded (the multi-process writer), reader
(any format, any selection), api (what the rest of moetrain calls).
"""

from moetrain.checkpoint.api import Restored, load_model, read_model_config, restore, save
from moetrain.checkpoint.reader import Checkpoint, CheckpointReader, load_checkpoint, load_model_into
from moetrain.checkpoint.rng import capture_rng_state, restore_rng_state
from moetrain.checkpoint.storage import (
    CheckpointError,
    iter_dir_name,
    list_checkpoints,
    resolve_checkpoint_dir,
    save_checkpoint,
)
from moetrain.parallel.pieces import Piece

__all__ = [
    "Checkpoint",
    "CheckpointError",
    "CheckpointReader",
    "Piece",
    "Restored",
    "capture_rng_state",
    "iter_dir_name",
    "list_checkpoints",
    "load_checkpoint",
    "load_model",
    "load_model_into",
    "read_model_config",
    "resolve_checkpoint_dir",
    "restore",
    "restore_rng_state",
    "save",
    "save_checkpoint",
]
