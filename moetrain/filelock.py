"""One process at a time on a path: a lock file, held with the kernel's flock and naming its owner.

Used for one run per --save directory (moetrain.checkpoint.lock) and one writer per token cache
(moetrain.data.loader). The kernel arbitrates: the holder keeps an exclusive flock on the file for as
long as it holds it, and the kernel drops it when the process dies, however it dies. So two processes
taking over the same stale lock at the same instant cannot both win, and a restarted job (torchrun
--max-restarts) needs no cleanup. The file also holds the owner's pid and host, for the message naming
it and for what flock cannot see: a lock from another host (a shared filesystem whose flock may not span
hosts) is refused, as is one naming a live process on this host (a writer that does not use flock).
Without flock (no fcntl module, or a filesystem that refuses it) only these pid checks remain, which a
simultaneous take-over can race.
"""

from __future__ import annotations

import errno
import json
import os
import socket
import time
from collections.abc import Callable

try:
    import fcntl
except ImportError:  # not a POSIX system
    fcntl = None

RETRY_SECONDS = 0.1
_HELD: dict[tuple[int, str], PathLock] = {}  # (pid, lock file's real path) -> the lock this process holds on it


class PathInUse(RuntimeError):
    """Another live process holds the lock; the message names it and the fix."""


class PathLock:
    """Exclusive ownership of `lock_file` by this process until `release()` (or its exit); a context manager.

    Raises PathInUse naming the holder if another live process holds it after `timeout_s`
    seconds. `name` (what the lock protects) and `advice` (what to do instead) shape that message.
    A second PathLock on the same file in the holding process takes it over; the first one's release
    then does nothing.
    """

    def __init__(self, lock_file: str, *, name: str | None = None, advice: str = "",
                 timeout_s: float = 0.0, on_wait: Callable[[str], None] | None = None) -> None:
        self.path = lock_file
        self.name = name or lock_file
        self.advice = advice
        self.owner = {"pid": os.getpid(), "host": socket.gethostname()}
        self._fd: int | None = None
        deadline = time.monotonic() + timeout_s
        while (refusal := self._try_acquire()) is not None:
            if time.monotonic() >= deadline:
                raise PathInUse(refusal)
            if on_wait is not None:
                on_wait(refusal)  # once, when the wait starts: say who is waited for
                on_wait = None
            time.sleep(RETRY_SECONDS)

    def _try_acquire(self) -> str | None:
        """Take the lock (None), or say who holds it."""
        key = (os.getpid(), os.path.realpath(self.path))  # a forked child holds nothing of its parent's
        previous = _HELD.get(key)
        if previous is not None:  # this process holds it already (a second Trainer in one process)
            self._fd, previous._fd = previous._fd, None
            _HELD[key] = self
            return None
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                if not _flock(fd):
                    return self._in_use(_read_owner(fd))
                if _same_file(fd, self.path):
                    holder = _read_owner(fd)
                    if holder and not self._stale(holder):
                        return self._in_use(holder)
                    _write_owner(fd, self.owner)
                    self._fd, fd = fd, None
                    _HELD[key] = self
                    return None
            finally:
                if fd is not None:
                    os.close(fd)
            # else its holder released it (removing the file) meanwhile: lock the new one

    def _stale(self, holder: dict) -> bool:
        """Whether the owner is gone: a dead (or this very) pid on this host; another host's cannot be checked."""
        pid = holder.get("pid")
        if holder.get("host") != self.owner["host"]:
            return False
        return not isinstance(pid, int) or pid == self.owner["pid"] or not _alive(pid)

    def _in_use(self, holder: dict) -> str:
        who = f"pid {holder.get('pid')} on {holder.get('host')}" if holder else "a process taking it right now"
        instead = f"{self.advice}, or if" if self.advice else "if"
        return f"{self.name} is in use by another run ({who}); {instead} that run is gone, delete {self.path}"

    def release(self) -> None:
        """Remove the lock file and let go, if this object still holds the lock."""
        if self._fd is None:
            return
        _HELD.pop((os.getpid(), os.path.realpath(self.path)), None)
        try:
            os.remove(self.path)  # still under the flock: a waiting process then locks a new file
        except FileNotFoundError:
            pass
        os.close(self._fd)
        self._fd = None

    def __enter__(self) -> PathLock:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def _flock(fd: int) -> bool:
    """Whether this process now holds the flock (also True where flock is unavailable: pid checks only)."""
    if fcntl is None:
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    except OSError as error:
        if error.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
            return True
        raise
    return True


def _same_file(fd: int, path: str) -> bool:
    """Whether `fd` is still the file at `path` (not one its holder removed on release)."""
    try:
        here = os.stat(path)
    except FileNotFoundError:
        return False
    opened = os.fstat(fd)
    return (here.st_dev, here.st_ino) == (opened.st_dev, opened.st_ino)


def _read_owner(fd: int) -> dict:
    """The owner written in the lock ({} if empty or unreadable: a holder killed before writing it)."""
    os.lseek(fd, 0, os.SEEK_SET)
    try:
        holder = json.loads(os.read(fd, 4096) or b"{}")
    except ValueError:
        return {}
    return holder if isinstance(holder, dict) else {}


def _write_owner(fd: int, owner: dict) -> None:
    os.ftruncate(fd, 0)
    os.lseek(fd, 0, os.SEEK_SET)
    os.write(fd, json.dumps(owner).encode())
    os.fsync(fd)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's live process
    return True
