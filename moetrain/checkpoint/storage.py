"""Checkpoint storage: atomic publishing, the single-process weights file and the weights_only state.pt.

Layout of ``save_dir`` (a sharded checkpoint has index.json + shard-NNNNN.safetensors in place of
model.safetensors, see moetrain.checkpoint.sharded)::

    latest                 text file naming the newest complete checkpoint, e.g. "iter_0000100"
    iter_0000100/
        model.safetensors  model weights (tied tensors stored once, see split_shared)
        state.pt           {"iteration", "optimizer", "extra", "with_manifest"}; only tensors, numbers, strings,
                           containers
        tokenizer.json ... extra text files given by the caller
        manifest.json      sha256 of every file above, written last (see moetrain.checkpoint.integrity)

A checkpoint is written into a hidden sibling directory, fsynced, then renamed into place with
``os.replace``; only after that is ``latest`` replaced (temp file + ``os.replace``). A crash at any
point therefore leaves the previous checkpoint and ``latest`` intact, and a half-written directory
never carries an ``iter_*`` name. A failed write (disk full) removes the hidden directory and raises a
one-line CheckpointError. One process writes to a given ``save_dir`` at a time (moetrain.checkpoint.lock).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import pickle
import re
import shutil
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import save_file

from moetrain.checkpoint.integrity import (
    MANIFEST_FILE,
    WITH_MANIFEST_KEY,
    CheckpointError,
    CheckpointWriteError,
    earlier_hint,
    file_digest,
    write_manifest,
)

MODEL_FILE = "model.safetensors"
SHARD_INDEX_FILE = "index.json"  # a sharded checkpoint: see moetrain.checkpoint.sharded
SHARD_PREFIX = "shard-"
STATE_FILE = "state.pt"
LATEST_FILE = "latest"
TMP_PREFIX = ".tmp-"
REPLACED_PREFIX = ".replaced-"
ALIASES_KEY = "moetrain_aliases"
ITER_DIR_RE = re.compile(r"^iter_(\d{7,})$")
# Exactly the types torch.load(weights_only=True) rebuilds; numpy scalars (float subclasses) are not among them.
SAFE_LEAF_TYPES = (bool, int, float, complex, str, bytes, bytearray, type(None), torch.dtype, torch.device)
SAFE_CONTAINER_TYPES = (list, tuple, set, dict, OrderedDict, torch.Size)


def iter_dir_name(iteration: int) -> str:
    """Zero-padded so directory listings sort by iteration."""
    return f"iter_{iteration:07d}"


def list_checkpoints(save_dir: str) -> list[int]:
    """Iterations of the complete checkpoints in ``save_dir``, ascending."""
    if not os.path.isdir(save_dir):
        return []
    found = (ITER_DIR_RE.match(name) for name in os.listdir(save_dir))
    return sorted(int(m.group(1)) for m in found if m and os.path.isdir(os.path.join(save_dir, m.group(0))))


# --------------------------------------------------------------------------------------------- save


def split_shared(model_state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Store each tied tensor once: return (tensors to write, alias name -> stored name).

    Tensors that are the same view of the same storage (tied embedding / LM head) become aliases and
    are re-tied by ``load_checkpoint``. Tensors that merely overlap a shared storage with a different
    view (slices of a fused buffer) are cloned, since safetensors cannot store overlapping memory;
    they load back as independent tensors. Non-contiguous tensors are made contiguous.
    """
    to_write: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    first_name_of_view: dict[tuple, str] = {}
    names_per_storage: dict[tuple, list[str]] = {}
    for name, tensor in model_state.items():
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"model_state[{name!r}] is a {type(tensor).__name__}, not a tensor; "
                            f"pass model.state_dict()")
        if tensor.numel() == 0:
            to_write[name] = tensor
            continue
        storage_key = (tensor.device, tensor.untyped_storage().data_ptr())
        view_key = (*storage_key, tensor.storage_offset(), tuple(tensor.shape), tensor.stride(), tensor.dtype)
        if view_key in first_name_of_view:
            aliases[name] = first_name_of_view[view_key]
            continue
        first_name_of_view[view_key] = name
        names_per_storage.setdefault(storage_key, []).append(name)
        to_write[name] = tensor.detach()
    for names in names_per_storage.values():
        for name in names:
            if len(names) > 1:
                to_write[name] = to_write[name].clone(memory_format=torch.contiguous_format)
            else:
                to_write[name] = to_write[name].contiguous()
    return to_write, aliases


def check_weights_only_safe(value: Any, where: str) -> None:
    """Reject anything torch.load(weights_only=True) would refuse, naming where it sits."""
    if isinstance(value, torch.Tensor):
        if type(value) not in (torch.Tensor, torch.nn.Parameter):
            raise TypeError(f"{where} is a {type(value).__name__} tensor subclass; store a plain tensor "
                            f"(e.g. .detach().clone() or .full_tensor())")
        return
    if type(value) in SAFE_LEAF_TYPES:
        return
    if type(value) not in SAFE_CONTAINER_TYPES:
        raise TypeError(f"{where} has type {type(value).__module__}.{type(value).__qualname__}, which a "
                        f"weights_only checkpoint cannot hold; convert it to tensors, numbers, strings, lists or dicts")
    if isinstance(value, dict):
        for key, item in value.items():
            check_weights_only_safe(key, f"{where} key {key!r}")
            check_weights_only_safe(item, f"{where}[{key!r}]")
    else:
        for index, item in enumerate(value):
            check_weights_only_safe(item, f"{where}[{index}]")


def fsync_path(path: str) -> None:
    """Flush a file or directory entry to disk (directories only where the OS allows opening them)."""
    if os.path.isdir(path) and os.name != "posix":
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_latest(save_dir: str, name: str) -> None:
    """Point `latest` at `name` atomically. On failure (disk full) the temp file is removed and the error says
    that the checkpoint itself is complete, and what `latest` still names."""
    tmp_path = os.path.join(save_dir, f"{TMP_PREFIX}{LATEST_FILE}")
    try:
        with open(tmp_path, "w") as f:
            f.write(name + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_path, os.path.join(save_dir, LATEST_FILE))
        fsync_path(save_dir)
    except OSError as error:
        with contextlib.suppress(OSError):
            os.remove(tmp_path)
        raise CheckpointWriteError(
            f"checkpoint {os.path.join(save_dir, name)} is complete, but {os.path.join(save_dir, LATEST_FILE)} could "
            f"not be updated ({error.strerror or error}); {_latest_names(save_dir)}. Free disk space and resume with "
            f"--load {os.path.join(save_dir, name)}") from None


def _latest_names(save_dir: str) -> str:
    """What `latest` names now, for a message after a failed write."""
    latest = os.path.join(save_dir, LATEST_FILE)
    if not os.path.isfile(latest):
        return "there is no `latest` yet"
    with open(latest, "rb") as f:
        return f"`latest` still names the complete {f.read(64).decode('utf-8', 'replace').strip()}"


def _remove_older(save_dir: str, iteration: int, keep_last: int) -> None:
    """Keep the just-saved checkpoint and the ``keep_last - 1`` newest below it.

    Directories with a higher iteration (left by an abandoned run that was restarted from an earlier
    checkpoint) are not "older" and are left alone.
    """
    older = [it for it in list_checkpoints(save_dir) if it < iteration]
    for stale in older[: max(len(older) - (keep_last - 1), 0)]:
        shutil.rmtree(os.path.join(save_dir, iter_dir_name(stale)))


def save_checkpoint(
    save_dir: str,
    iteration: int,
    *,
    model_state: dict[str, torch.Tensor],
    optimizer_state: dict,
    extra: dict,
    keep_last: int | None = None,
    files: dict[str, str] | None = None,
) -> str:
    """Atomically write ``save_dir/iter_{iteration:07d}`` and point ``latest`` at it; return its path.

    ``extra`` holds everything else needed to resume (LR step, loss scaler state, RNG states, data
    position, config dict) and must contain only weights_only-safe values. ``files`` maps a file
    name inside the checkpoint to its text (e.g. {"tokenizer.json": tokenizer.to_json()}), written
    with the rest so a checkpoint always carries the files of the run that wrote it.
    ``keep_last`` then deletes older checkpoints (see _remove_older).
    """
    if iteration < 0:
        raise ValueError(f"iteration must be >= 0, got {iteration}")
    if keep_last is not None and keep_last < 1:
        raise ValueError(f"keep_last must be >= 1 or None (keep all), got {keep_last}")
    files = files or {}
    for name in files:
        if os.path.basename(name) != name or name in (MODEL_FILE, STATE_FILE) or name.startswith("."):
            raise ValueError(f"extra checkpoint file name {name!r} must be a plain file name other than "
                             f"{MODEL_FILE} and {STATE_FILE}")
    state = {"iteration": iteration, "optimizer": optimizer_state, "extra": extra, WITH_MANIFEST_KEY: True}
    check_weights_only_safe(state, "checkpoint state")
    tensors, aliases = split_shared(model_state)

    try:
        tmp_dir = prepare_tmp_dir(save_dir, iteration)
        model_path = os.path.join(tmp_dir, MODEL_FILE)
        save_file(tensors, model_path, metadata={"format": "pt", ALIASES_KEY: json.dumps(aliases)})
        digests = {MODEL_FILE: fsync_and_digest(model_path), **write_state(tmp_dir, state, files)}
        return publish(save_dir, iteration, keep_last, digests)
    except (OSError, SafetensorError) as error:
        raise write_failed(save_dir, iteration, error) from error


def write_failed(save_dir: str, iteration: int, error: Exception) -> CheckpointWriteError:
    """Remove the half-written hidden directory; say what is still intact and what to do."""
    if isinstance(error, CheckpointWriteError):  # already says what happened (`latest` not updated)
        return error
    shutil.rmtree(os.path.join(save_dir, TMP_PREFIX + iter_dir_name(iteration)), ignore_errors=True)
    kept = _latest_names(save_dir) if os.path.isfile(os.path.join(save_dir, LATEST_FILE)) \
        else "no earlier checkpoint exists"
    return CheckpointWriteError(f"could not write checkpoint {iter_dir_name(iteration)} in {save_dir} "
                           f"({getattr(error, 'strerror', None) or error}); {kept}. Free disk space (or lower "
                           f"--keep-last-checkpoints) and resume with --load {save_dir}")


def prepare_tmp_dir(save_dir: str, iteration: int) -> str:
    """A fresh hidden directory for `iteration`, removing debris of earlier crashed saves."""
    os.makedirs(save_dir, exist_ok=True)
    for leftover in os.listdir(save_dir):
        if leftover.startswith(TMP_PREFIX + "iter_"):
            shutil.rmtree(os.path.join(save_dir, leftover))
    tmp_dir = os.path.join(save_dir, TMP_PREFIX + iter_dir_name(iteration))
    os.makedirs(tmp_dir)
    return tmp_dir


def write_state(tmp_dir: str, state: dict, files: dict[str, str]) -> dict[str, str]:
    """state.pt and the extra text files, each flushed to disk; return their digests."""
    state_path = os.path.join(tmp_dir, STATE_FILE)
    try:
        with open(state_path, "wb") as f:
            torch.save(state, f)
    except RuntimeError as error:  # torch.save's zip writer reports a failed write so ("unexpected pos ...")
        code = _write_errno(tmp_dir)
        raise OSError(code, f"{os.strerror(code)} writing {STATE_FILE}: {_first_line(error)}") from error
    for file_name, text in files.items():
        with open(os.path.join(tmp_dir, file_name), "w", encoding="utf-8") as f:
            f.write(text)
    return {name: fsync_and_digest(os.path.join(tmp_dir, name)) for name in (STATE_FILE, *files)}


LOW_DISK_BYTES = 16 << 20  # less free space than this where a write failed: the disk is full


def _write_errno(directory: str) -> int:
    """ENOSPC when the file system of `directory` is (nearly) full, else EIO: for writers that do not say."""
    try:
        stats = os.statvfs(directory)
    except OSError:
        return errno.EIO
    return errno.ENOSPC if stats.f_bavail * stats.f_frsize < LOW_DISK_BYTES else errno.EIO


def fsync_and_digest(path: str) -> str:
    """Flush a written file to disk and hash it at once: the hash reads the page cache while the disk writes,
    so on a disk slower than the hashing the digest costs no extra time."""
    with ThreadPoolExecutor(1) as flusher:
        flushed = flusher.submit(fsync_path, path)
        digest = file_digest(path)
        flushed.result()
    return digest


def publish(save_dir: str, iteration: int, keep_last: int | None, digests: dict[str, str] | None = None) -> str:
    """Write the manifest (`digests`: ones already computed), rename the finished hidden directory into place,
    then point ``latest`` at it."""
    name = iter_dir_name(iteration)
    tmp_dir = os.path.join(save_dir, TMP_PREFIX + name)
    write_manifest(tmp_dir, digests)
    fsync_path(tmp_dir)
    final_dir = os.path.join(save_dir, name)
    replaced_dir = os.path.join(save_dir, REPLACED_PREFIX + name)
    if os.path.isdir(final_dir):  # re-saving an iteration: directories cannot be swapped in one rename
        shutil.rmtree(replaced_dir, ignore_errors=True)
        os.replace(final_dir, replaced_dir)
    os.replace(tmp_dir, final_dir)
    fsync_path(save_dir)
    shutil.rmtree(replaced_dir, ignore_errors=True)
    _write_latest(save_dir, name)
    if keep_last is not None:
        _remove_older(save_dir, iteration, keep_last)
    return final_dir


# --------------------------------------------------------------------------------------------- load


def resolve_checkpoint_dir(load_dir: str, iteration: int | None = None) -> str:
    """The iter_* directory that `latest`, an iteration, or the path itself names."""
    if not os.path.isdir(load_dir):
        raise FileNotFoundError(f"checkpoint directory {load_dir!r} does not exist; check the load path")
    if iteration is not None:
        path = os.path.join(load_dir, iter_dir_name(iteration))
        if not os.path.isdir(path):
            raise FileNotFoundError(f"no checkpoint for iteration {iteration} in {load_dir!r}; "
                                    f"available iterations: {list_checkpoints(load_dir) or 'none'}")
        return path
    if any(os.path.isfile(os.path.join(load_dir, f)) for f in (MODEL_FILE, SHARD_INDEX_FILE)):
        return load_dir  # a direct iter_* directory
    latest_path = os.path.join(load_dir, LATEST_FILE)
    if not os.path.isfile(latest_path):
        raise FileNotFoundError(f"no checkpoint in {load_dir!r}: it has no '{LATEST_FILE}' file; "
                                f"pass an iteration (available: {list_checkpoints(load_dir) or 'none'})")
    name = read_latest(latest_path)
    if not ITER_DIR_RE.match(name):
        raise CheckpointError(f"{latest_path} holds {name[:40]!r}, not an iter_NNNNNNN name; "
                              f"rewrite it or pass an iteration")
    path = os.path.join(load_dir, name)
    if not os.path.isdir(path):
        replaced = os.path.join(load_dir, REPLACED_PREFIX + name)
        if _complete(replaced):  # a crash between the two renames of a re-save: read the complete original
            return replaced
        raise FileNotFoundError(f"{latest_path} names {name}, which is missing")
    return path


def _complete(path: str) -> bool:
    """Whether `path` is a published checkpoint directory (its manifest, state and weights all there)."""
    return all(os.path.isfile(os.path.join(path, f)) for f in (MANIFEST_FILE, STATE_FILE)) and \
        any(os.path.isfile(os.path.join(path, f)) for f in (MODEL_FILE, SHARD_INDEX_FILE))


def recover_interrupted_resave(save_dir: str) -> str | None:
    """Undo a re-save that a crash cut between its two renames (`latest` names iter_X, iter_X is missing and
    .replaced-iter_X is complete): rename the original back; return its name, or None when nothing was cut.
    Only the process holding the save directory's lock may call it (a live writer is between the renames)."""
    latest = os.path.join(save_dir, LATEST_FILE)
    try:
        name = read_latest(latest) if os.path.isfile(latest) else ""
    except CheckpointError:
        return None
    replaced = os.path.join(save_dir, REPLACED_PREFIX + name)
    if not ITER_DIR_RE.match(name) or os.path.isdir(os.path.join(save_dir, name)) or not _complete(replaced):
        return None
    os.replace(replaced, os.path.join(save_dir, name))
    fsync_path(save_dir)
    return name


def read_latest(latest_path: str) -> str:
    """The iter_* name a `latest` file holds; bytes that are not text are reported naming the file."""
    with open(latest_path, "rb") as f:
        raw = f.read(4096)
    try:
        return raw.decode("utf-8").strip()
    except UnicodeDecodeError:
        raise CheckpointError(f"{latest_path} is corrupt (not text: {raw[:16]!r}...); rewrite it with the name of "
                              f"a checkpoint (e.g. iter_0000100) or pass an iteration") from None


def pickled_global(error: pickle.UnpicklingError) -> str | None:
    """The Python object a weights_only load refused (an object pickled beside the tensors), or None when the
    error is the file's bytes themselves not being a valid pickle (corruption)."""
    found = re.search(r"Unsupported global: GLOBAL (\S+)", str(error))
    return found.group(1) if found else None


def load_state(path: str, mmap: bool = False) -> dict:
    """state.pt (weights_only); `mmap` maps its tensors (an optimizer state) instead of reading them, for a
    caller that wants only the plain data (the config)."""
    state_path = os.path.join(path, STATE_FILE)
    if not os.path.isfile(state_path):
        raise FileNotFoundError(f"checkpoint {path!r} has no {STATE_FILE}; it is incomplete or not a moetrain "
                                f"checkpoint")
    try:
        state = torch.load(state_path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as error:
        if pickled_global(error) is not None:
            raise CheckpointError(f"{state_path} contains pickled objects other than tensors and plain data "
                                  f"({pickled_global(error)}); refusing to unpickle it (weights_only). Re-save it with "
                                  f"plain types") from None
        raise CheckpointError(f"{state_path} is corrupt ({_unpickler_detail(error)}); {earlier_hint(path)}") from None
    except (RuntimeError, EOFError, OSError) as error:
        raise CheckpointError(f"{state_path} is corrupt or truncated ({_first_line(error)}); "
                              f"{earlier_hint(path)}") from error
    if not isinstance(state, dict) or not {"iteration", "optimizer", "extra"} <= state.keys():
        raise CheckpointError(f"{state_path} is not a moetrain checkpoint state (missing iteration/optimizer/extra)")
    return state


def _unpickler_detail(error: pickle.UnpicklingError) -> str:
    """The weights_only unpickler's own reason (e.g. "Unsupported operand 146"), without torch's advice around it."""
    found = re.search(r"WeightsUnpickler error:\s*(.+)", str(error))
    return found.group(1).strip() if found else _first_line(error)


def _first_line(error: Exception) -> str:
    return next((line.strip() for line in str(error).splitlines() if line.strip()), type(error).__name__)
