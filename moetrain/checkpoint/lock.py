"""One run per save directory: a PathLock (moetrain.filelock) on `save_dir/.lock`.

Two runs writing the same --save directory would rotate each other's checkpoints away and race on
`latest`; the second is refused with a one-line CheckpointError naming the first. Taking the lock also
completes a re-save that a crash interrupted (storage.recover_interrupted_resave).
"""

from __future__ import annotations

import os
import warnings

from moetrain.checkpoint.integrity import CheckpointError
from moetrain.checkpoint.storage import REPLACED_PREFIX, recover_interrupted_resave
from moetrain.filelock import PathInUse, PathLock

LOCK_FILE = ".lock"


class SaveDirLock(PathLock):
    """Held by rank 0 of a run for as long as it writes `save_dir`; `release()` when done."""

    def __init__(self, save_dir: str) -> None:
        os.makedirs(save_dir, exist_ok=True)
        try:
            super().__init__(os.path.join(save_dir, LOCK_FILE), name=save_dir, advice="pass a different --save")
        except PathInUse as error:
            raise CheckpointError(str(error)) from None
        # the lock holder is the one writer: finish what a crash cut short before anything reads `latest`
        recovered = recover_interrupted_resave(save_dir)
        if recovered is not None:
            warnings.warn(f"a crash interrupted re-saving {recovered} in {save_dir}; restored the complete original "
                          f"from {REPLACED_PREFIX}{recovered}", stacklevel=2)
