"""What makes a checkpoint trustworthy to read: a sha256 manifest written last, and file names that stay inside.

``manifest.json`` lists a sha256 digest of every other file of a checkpoint. It is written after all
of them, just before the directory is published, so a bit flip or truncation of any file later (bad
disk, a copy cut short) is reported naming the file instead of loading garbage. Checkpoints written
before manifests existed have none and load unchecked; state.pt of every later one says it was written
with a manifest (WITH_MANIFEST_KEY), so deleting the manifest does not turn the checks off.

A digest is the sha256 of the sha256s of the file's 16 MiB chunks, written ``chunked-sha256:<hex>``:
as strong as one sha256 of the whole file, but its chunks are hashed on all cores at once (hashlib
lets go of the GIL), since one core's sha256 was most of a large checkpoint's load time
(benchmarks/checkpoint_io.py). A digest without the prefix (manifests written before) is the sha256
of the whole file and is checked as such.
"""

from __future__ import annotations

import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor

MANIFEST_FILE = "manifest.json"
# state.pt's mark of a checkpoint written with a manifest: one that has lost it is refused, not read unchecked
WITH_MANIFEST_KEY = "with_manifest"
CHUNK_BYTES = 16 << 20
CHUNKED_PREFIX = "chunked-sha256:"
MAX_HASHING_THREADS = 16  # past this, memory bandwidth is the limit; each holds one chunk in memory


class CheckpointError(RuntimeError):
    """A checkpoint exists but cannot be read safely (corrupt, truncated, or contains pickled code)."""


class CheckpointWriteError(CheckpointError, OSError):
    """A save failed (disk full, I/O error); the previous checkpoint and `latest` are intact."""


def file_digest(path: str) -> str:
    """The manifest's digest of the file at `path` (see the module docstring)."""
    size = os.path.getsize(path)
    with open(path, "rb") as f, ThreadPoolExecutor(hashing_threads(size)) as pool:
        chunks = pool.map(lambda offset: hashlib.sha256(_read_chunk(f.fileno(), offset)).digest(),
                          range(0, size, CHUNK_BYTES))
        return CHUNKED_PREFIX + hashlib.sha256(b"".join(chunks)).hexdigest()


def _read_chunk(fd: int, offset: int) -> bytes:
    """The CHUNK_BYTES at `offset` (fewer at the end of the file), however many reads that takes."""
    parts, wanted = [], CHUNK_BYTES
    while wanted and (part := os.pread(fd, wanted, offset + CHUNK_BYTES - wanted)):
        parts.append(part)
        wanted -= len(part)
    return b"".join(parts) if len(parts) != 1 else parts[0]


def whole_file_sha256(path: str) -> str:
    """The digest manifests held before chunked digests: one sha256 of the whole file."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(CHUNK_BYTES), b""):
            digest.update(block)
    return digest.hexdigest()


def hashing_threads(size: int) -> int:
    """Threads to hash `size` bytes with: one per chunk, at most one per core this process may use."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(cores, MAX_HASHING_THREADS, -(-size // CHUNK_BYTES)))


def _digest_like(path: str, recorded: str) -> str:
    """The digest of `path` computed the way `recorded` was (chunked, or a whole-file sha256)."""
    return file_digest(path) if recorded.startswith(CHUNKED_PREFIX) else whole_file_sha256(path)


def write_manifest(directory: str, known: dict[str, str] | None = None) -> None:
    """Record the digest of every file in `directory` (`known`: digests already computed by their writers)."""
    known = known or {}
    digests = {name: known.get(name) or file_digest(os.path.join(directory, name))
               for name in sorted(os.listdir(directory)) if name != MANIFEST_FILE}
    path = os.path.join(directory, MANIFEST_FILE)
    with open(path, "w") as f:
        json.dump({"sha256": digests}, f, indent=1)
        f.flush()
        os.fsync(f.fileno())


def read_manifest(checkpoint_dir: str) -> dict[str, str] | None:
    """File name -> sha256, or None for a checkpoint written before manifests."""
    path = os.path.join(checkpoint_dir, MANIFEST_FILE)
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            digests = json.load(f)["sha256"]
        if not isinstance(digests, dict):
            raise TypeError("sha256 is not a mapping")
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as error:
        raise CheckpointError(f"{path} is corrupt ({error}); {earlier_hint(checkpoint_dir)}") from None
    for name in digests:
        check_inside(checkpoint_dir, name, path)
    return digests


def verify_file(checkpoint_dir: str, name: str, manifest: dict[str, str] | None) -> None:
    """Raise a one-line CheckpointError if `name` differs from what the manifest recorded."""
    if manifest is None:
        return
    path = os.path.join(checkpoint_dir, name)
    if name not in manifest:
        raise CheckpointError(f"{path} is not listed in {MANIFEST_FILE}; the checkpoint was altered after it was "
                              f"written; {earlier_hint(checkpoint_dir)}")
    if not os.path.isfile(path):
        raise CheckpointError(f"{path} is missing; {earlier_hint(checkpoint_dir)}")
    if _digest_like(path, manifest[name]) != manifest[name]:
        raise CheckpointError(f"{path} is corrupt or truncated (its sha256 differs from the one in "
                              f"{MANIFEST_FILE}); {earlier_hint(checkpoint_dir)}")


def check_inside(checkpoint_dir: str, name: str, listed_in: str) -> str:
    """The path of `name`, refused unless it is a plain file name inside `checkpoint_dir` (no ../, /, symlink)."""
    path = os.path.join(checkpoint_dir, name)
    inside = (isinstance(name, str) and name not in ("", ".", "..") and os.path.basename(name) == name
              and "\\" not in name and not os.path.islink(path))
    if not inside or os.path.dirname(os.path.realpath(path)) != os.path.realpath(checkpoint_dir):
        raise CheckpointError(f"{listed_in} names {str(name)[:80]!r}, which is not a file inside {checkpoint_dir}; "
                              f"refusing to read it (a tampered or hand-edited checkpoint)")
    return path


def earlier_hint(checkpoint_dir: str) -> str:
    """Where to resume instead: the newest other iter_* directory beside this one."""
    parent, name = os.path.split(os.path.normpath(checkpoint_dir))
    others = sorted(n for n in os.listdir(parent) if n.startswith("iter_") and n < name) if parent else []
    if not others:
        return "no earlier checkpoint is beside it"
    return f"load an earlier checkpoint, e.g. --load {os.path.join(parent, others[-1])}"
