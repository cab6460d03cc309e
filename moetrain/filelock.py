"""A lock file naming its owner (pid and host): taken atomically, taken over when its owner is dead.

Used for one run per --save directory (moetrain.checkpoint.lock) and one writer per token cache
(moetrain.data.loader). The lock is a complete file linked into place (O_EXCL semantics, also on NFS);
a lock whose pid is dead on this host is stale (a killed process) and is taken over, so a restarted job
needs no cleanup. A lock from another host cannot be checked: the caller decides to refuse or to wait.
"""

from __future__ import annotations

import json
import os
import socket
import time


class OwnedLock:
    """A lock file at `path`; `try_acquire()` takes it or names its live holder, `release()` frees it."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = str(path)
        self.owner = {"pid": os.getpid(), "host": socket.gethostname()}

    def try_acquire(self) -> dict | None:
        """Take the lock (or keep it, when this process holds it): None; else its live (or unverifiable,
        on another host) holder's {"pid", "host"}."""
        while not self._create():
            holder = self._holder()
            if holder is None:
                continue  # released meanwhile
            if self._mine_or_stale(holder):
                self._remove()
                continue
            return holder
        return None

    def acquire_waiting(self, poll_s: float = 0.2, on_wait=lambda holder: None) -> None:
        """Take the lock, waiting for as long as its holder keeps it; `on_wait(holder)` runs once, when the
        wait starts (to say who is waited for)."""
        waited = False
        while (holder := self.try_acquire()) is not None:
            if not waited:
                on_wait(holder)
                waited = True
            time.sleep(poll_s)

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
