"""One run per save directory: a PathLock (moetrain.filelock) on `save_dir/.lock`.

Two runs writing the same --save directory would rotate each other's checkpoints away and race on
`latest`; the second is refused with a one-line CheckpointError naming the first.
"""

from __future__ import annotations

import os

from moetrain.checkpoint.integrity import CheckpointError
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
