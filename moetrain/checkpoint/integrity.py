"""What makes a checkpoint trustworthy to read: a sha256 manifest written last, and file names that stay inside.

``manifest.json`` lists the size and sha256 of every other file of a checkpoint. It is written after
all of them, just before the directory is published, so a bit flip or truncation of any file later
(bad disk, a copy cut short) is reported naming the file instead of loading garbage. Checkpoints
written before manifests existed have none and load unchecked.
"""

from __future__ import annotations

import hashlib
import json
import os

MANIFEST_FILE = "manifest.json"


class CheckpointError(RuntimeError):
    """A checkpoint exists but cannot be read safely (corrupt, truncated, or contains pickled code)."""


class CheckpointWriteError(CheckpointError, OSError):
    """A save failed (disk full, I/O error); the previous checkpoint and `latest` are intact."""


def file_digest(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()


def write_manifest(directory: str, known: dict[str, str] | None = None) -> None:
    """Record the sha256 of every file in `directory` (`known`: digests already computed by their writers)."""
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
    if file_digest(path) != manifest[name]:
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
