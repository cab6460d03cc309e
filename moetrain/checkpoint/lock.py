"""One run per save directory: a lock file holding the owner's pid and host (moetrain.filelock).

Two runs writing the same --save directory would rotate each other's checkpoints away and race on
`latest`. A stale lock (a killed run) is taken over, so a restarted job (torchrun --max-restarts) needs no
cleanup; a live one, or one from another host (which cannot be checked), is refused with the fix.
"""

from __future__ import annotations

import os

from moetrain.checkpoint.integrity import CheckpointError
from moetrain.filelock import OwnedLock

LOCK_FILE = ".lock"


class SaveDirLock(OwnedLock):
    """Held by rank 0 of a run for as long as it writes `save_dir`; `release()` when done."""

    def __init__(self, save_dir: str) -> None:
        os.makedirs(save_dir, exist_ok=True)
        super().__init__(os.path.join(save_dir, LOCK_FILE))
        holder = self.try_acquire()
        if holder is not None:
            raise CheckpointError(
                f"{save_dir} is in use by another run (pid {holder.get('pid')} on {holder.get('host')}); pass a "
                f"different --save, or if that run is gone, delete {self.path}")
