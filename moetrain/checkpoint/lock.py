"""One run per save directory: a lock file holding the owner's pid and host.

Two runs writing the same --save directory would rotate each other's checkpoints away and race on
`latest`. The lock is created atomically (O_EXCL); a lock whose pid is dead on this host is stale (a
killed run) and is taken over, so a restarted job (torchrun --max-restarts) needs no cleanup. A lock
from another host cannot be checked and is refused with the command to remove it.
"""

from __future__ import annotations

import json
import os
import socket

from moetrain.checkpoint.integrity import CheckpointError

LOCK_FILE = ".lock"


class SaveDirLock:
    """Held by rank 0 of a run for as long as it writes `save_dir`; `release()` when done."""

    def __init__(self, save_dir: str) -> None:
        os.makedirs(save_dir, exist_ok=True)
        self.path = os.path.join(save_dir, LOCK_FILE)
        self.owner = {"pid": os.getpid(), "host": socket.gethostname()}
        while not self._create():
            holder = self._holder()
            if holder is None:
                continue  # released meanwhile
            if self._mine_or_stale(holder):
                self._remove()
                continue
            raise CheckpointError(
                f"{save_dir} is in use by another run (pid {holder.get('pid')} on {holder.get('host')}); pass a "
                f"different --save, or if that run is gone, delete {self.path}")

    def _create(self) -> bool:
        """Link a complete temp file into place: the lock never exists half-written."""
        tmp = f"{self.path}.{self.owner['pid']}"
        with open(tmp, "w") as f:
            json.dump(self.owner, f)
        try:
            os.link(tmp, self.path)
            return True
        except FileExistsError:
            return False
        finally:
            os.remove(tmp)

    def _holder(self) -> dict | None:
        """The owner written in the lock ({} if unreadable: stale); None if the lock is gone."""
        try:
            with open(self.path) as f:
                holder = json.load(f)
            return holder if isinstance(holder, dict) else {}
        except FileNotFoundError:
            return None
        except ValueError:
            return {}

    def _mine_or_stale(self, holder: dict) -> bool:
        if not holder:
            return True
        if holder.get("host") != self.owner["host"]:
            return False
        pid = holder.get("pid")
        if pid == self.owner["pid"]:
            return True  # this process already holds it (a second Trainer in one process)
        return not isinstance(pid, int) or not _alive(pid)

    def _remove(self) -> None:
        try:
            os.remove(self.path)
        except FileNotFoundError:
            pass

    def release(self) -> None:
        """Remove the lock if this process still owns it."""
        if self._holder() == self.owner:
            self._remove()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's live process
    return True
