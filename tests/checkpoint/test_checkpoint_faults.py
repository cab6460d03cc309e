"""Checkpoints under faults: kill -9 mid-save, a full disk, two runs on one --save directory, an index
pointing outside its checkpoint, and truncated or bit-flipped files. The last good checkpoint always
survives; a damaged one is refused with one line naming the file (never loaded as garbage).

The kill loop and the corruption matrix are also tabulated by benchmarks/faults.py, which imports them."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import shutil
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from torch import nn

from moetrain.checkpoint import CheckpointError, integrity, load_checkpoint, save_checkpoint, storage
from moetrain.checkpoint.integrity import MANIFEST_FILE
from moetrain.checkpoint.lock import LOCK_FILE, SaveDirLock
from moetrain.checkpoint.sharded import save_sharded
from moetrain.parallel.mesh import ParallelState
from moetrain.train.trainer import Trainer
from tests.helpers import ROOT, tiny_config

# Saves checkpoints of ~2 MB in a loop; on start resumes from `latest`, which must be complete: every
# tensor holds its iteration number, and the manifest verifies every file.
SAVING_LOOP = textwrap.dedent("""
    import os, sys, torch
    from moetrain.checkpoint import load_checkpoint, save_checkpoint
    save_dir = sys.argv[1]
    start = 0
    if os.path.exists(os.path.join(save_dir, "latest")):
        ckpt = load_checkpoint(save_dir)
        start = ckpt.iteration
        assert all(bool((t == start).all()) for t in ckpt.model_state.values()), "incomplete checkpoint"
    print("resumed", start, flush=True)
    for it in range(start + 1, 10**6):
        weights = {f"w{i}": torch.full((64, 1024), float(it)) for i in range(8)}
        save_checkpoint(save_dir, it, model_state=weights, optimizer_state={"step": it}, extra={"it": it},
                        keep_last=2, files={"tokenizer.json": '{"it": %d}' % it})
        print("saved", it, flush=True)
""")


def kill_during_save(save_dir: str, rng: random.Random, max_delay: float = 0.4,
                     after_a_save: bool = False) -> tuple[int, int]:
    """Start the saving loop, kill -9 it after a random delay (counted from its first completed save if
    `after_a_save`, so a loaded machine still makes progress); return (iteration it resumed from, the
    iteration of the complete checkpoint `latest` names afterwards). Raises if it could not resume."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    child = subprocess.Popen([sys.executable, "-c", SAVING_LOOP, save_dir], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, env=env)
    line = child.stdout.readline()
    if not line.startswith("resumed"):
        child.kill()
        raise AssertionError(f"the saving loop could not resume: {child.stderr.read()[-500:]}")
    if after_a_save:
        assert child.stdout.readline().startswith("saved"), child.stderr.read()[-500:]
    time.sleep(rng.uniform(0.0, max_delay))
    child.kill()
    child.wait()
    child.stdout.close()
    child.stderr.close()
    after = load_checkpoint(save_dir) if os.path.exists(os.path.join(save_dir, "latest")) else None
    if after is not None:
        assert all(bool((t == after.iteration).all()) for t in after.model_state.values())
    return int(line.split()[1]), after.iteration if after else 0


KILL_ROUNDS = 12  # each a random kill point in a save (~3 s a round); benchmarks/faults.py runs many more


@pytest.mark.slow
def test_kill_9_during_saving_always_resumes_from_a_complete_checkpoint(tmp_path):
    rng, save_dir = random.Random(18), str(tmp_path / "run")
    previous = 0
    for round_ in range(KILL_ROUNDS):
        resumed, latest = kill_during_save(save_dir, rng, after_a_save=round_ == KILL_ROUNDS - 1)
        assert resumed == previous  # every restart found the checkpoint the last kill left
        assert latest >= resumed
        previous = latest
    assert previous > 0
    debris = [n for n in os.listdir(save_dir) if n.startswith(storage.TMP_PREFIX + "iter_")]
    assert len(debris) <= 1  # at most the save the last kill interrupted; the next save removes it


# ------------------------------------------------------------------------------------------ corruption


def _tiny_model() -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 4))
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.ones(2, 8)).sum().backward()
    optimizer.step()
    return model, optimizer


def write_two_checkpoints(save_dir: str, sharded: bool) -> None:
    """Iterations 1 and 2, in the single-process or the sharded format, with a tokenizer.json."""
    model, optimizer = _tiny_model()
    files = {"tokenizer.json": json.dumps({"vocab": list(range(50))})}
    for iteration in (1, 2):
        if sharded:
            save_sharded(save_dir, iteration, model, optimizer, {"it": iteration}, {}, ParallelState(), files=files)
        else:
            save_checkpoint(save_dir, iteration, model_state=model.state_dict(),
                            optimizer_state=optimizer.state_dict(), extra={"it": iteration}, files=files)


def damage(path: str, how: str) -> None:
    data = bytearray(Path(path).read_bytes())
    if how == "truncate":
        data = data[: len(data) // 2]
    else:  # flip one bit in the middle of the file
        data[len(data) // 2] ^= 0x01
    Path(path).write_bytes(bytes(data))


CORRUPTIONS = [(file, how, sharded) for file, sharded in
               [("model.safetensors", False), ("state.pt", False), ("tokenizer.json", False), ("latest", False),
                (MANIFEST_FILE, False), ("shard-00000.safetensors", True), ("index.json", True),
                ("state.pt", True)]
               for how in ("truncate", "bitflip")]


def load_damaged(save_dir: str, file: str, how: str, sharded: bool) -> str:
    """Write iterations 1 and 2, damage `file` of iteration 2, load `latest`; return the one-line error.
    Raises AssertionError if the damaged checkpoint loaded or iteration 1 no longer does."""
    write_two_checkpoints(save_dir, sharded)
    damage(os.path.join(save_dir, file if file == "latest" else os.path.join("iter_0000002", file)), how)
    try:
        load_checkpoint(save_dir)
    except (CheckpointError, FileNotFoundError) as error:
        message = str(error)
    else:
        raise AssertionError(f"{how} {file} loaded without an error")
    assert load_checkpoint(save_dir, 1).iteration == 1  # the previous checkpoint is untouched
    return message


@pytest.mark.parametrize("file,how,sharded", CORRUPTIONS)
def test_a_damaged_file_is_refused_naming_it(tmp_path, file, how, sharded):
    message = load_damaged(str(tmp_path / "run"), file, how, sharded)
    assert file in message and "\n" not in message
    if file != "latest":
        assert "iter_0000001" in message  # names the checkpoint to load instead


@pytest.mark.parametrize("sharded", [False, True])
def test_a_checkpoint_that_lost_its_manifest_is_refused_in_one_line(tmp_path, sharded):
    # the case: manifest.json deleted, then one bit of the weights flipped
    write_two_checkpoints(str(tmp_path), sharded=sharded)
    os.remove(tmp_path / "iter_0000002" / MANIFEST_FILE)
    damage(str(tmp_path / "iter_0000002" / ("shard-00000.safetensors" if sharded else "model.safetensors")), "bitflip")
    with pytest.raises(CheckpointError, match=f"^{tmp_path / 'iter_0000002'} was written with a manifest.json and "
                                              f"has lost it, so none of its files can be checked; load an earlier "
                                              f"checkpoint, e.g. --load {tmp_path / 'iter_0000001'}$"):
        load_checkpoint(str(tmp_path))


def test_checkpoints_from_before_manifests_still_load(tmp_path):
    write_two_checkpoints(str(tmp_path), sharded=True)
    state_path = tmp_path / "iter_0000002" / "state.pt"
    state = torch.load(state_path, weights_only=True)
    del state["with_manifest"]  # as written before manifests (tests/fixtures has such checkpoints too)
    torch.save(state, state_path)
    os.remove(tmp_path / "iter_0000002" / MANIFEST_FILE)
    assert load_checkpoint(str(tmp_path)).iteration == 2


def test_a_chunked_digest_is_the_sha256_of_its_chunks_sha256s_and_sees_any_change(tmp_path, monkeypatch):
    monkeypatch.setattr(integrity, "CHUNK_BYTES", 1024)  # 6 chunks, hashed on every core
    data = random.Random(0).randbytes(5 * 1024 + 300)
    path = tmp_path / "blob"
    path.write_bytes(data)
    chunks = [hashlib.sha256(data[i:i + 1024]).digest() for i in range(0, len(data), 1024)]
    assert integrity.file_digest(str(path)) == "chunked-sha256:" + hashlib.sha256(b"".join(chunks)).hexdigest()
    seen = {integrity.file_digest(str(path))}
    for damaged in (data[:3000] + bytes([data[3000] ^ 1]) + data[3001:], data[:4096], data + b"\0", b""):
        path.write_bytes(damaged)
        seen.add(integrity.file_digest(str(path)))
    assert len(seen) == 5


def test_a_manifest_of_whole_file_sha256s_written_before_chunked_digests_is_still_checked(tmp_path):
    write_two_checkpoints(str(tmp_path), sharded=False)
    ckpt = tmp_path / "iter_0000002"
    old = {name: hashlib.sha256((ckpt / name).read_bytes()).hexdigest()
           for name in os.listdir(ckpt) if name != MANIFEST_FILE}
    (ckpt / MANIFEST_FILE).write_text(json.dumps({"sha256": old}))
    assert load_checkpoint(str(tmp_path)).iteration == 2
    data = bytearray((ckpt / "model.safetensors").read_bytes())
    data[-1] ^= 1
    (ckpt / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"model.safetensors is corrupt or truncated \(its sha256 differs"):
        load_checkpoint(str(tmp_path))


@pytest.mark.parametrize("escape", ["../x.safetensors", "/etc/passwd", "symlink"])
def test_an_index_naming_a_file_outside_its_checkpoint_is_refused(tmp_path, escape):
    write_two_checkpoints(str(tmp_path / "run"), sharded=True)
    ckpt = tmp_path / "run" / "iter_0000002"
    if escape == "symlink":
        outside = tmp_path / "outside.safetensors"
        outside.write_bytes((ckpt / "shard-00000.safetensors").read_bytes())
        (ckpt / "link.safetensors").symlink_to(outside)
        escape = "link.safetensors"
    index = json.loads((ckpt / "index.json").read_text())
    for entries in index["tensors"].values():
        for entry in entries:
            entry["file"] = escape
    (ckpt / "index.json").write_text(json.dumps(index))
    os.remove(ckpt / MANIFEST_FILE)  # as a hand-edited checkpoint would be
    with pytest.raises(CheckpointError, match="not a file inside"):
        load_checkpoint(str(tmp_path / "run"))


# ------------------------------------------------------------------------------------------ disk full


def _disk_full(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


@pytest.mark.parametrize("writer", ["weights", "state"])
def test_a_full_disk_keeps_the_previous_checkpoint_and_stops_with_a_clear_message(tmp_path, monkeypatch, writer):
    trainer = Trainer(tiny_config(tmp_path, train_iters=4, save_interval=2), quiet=True)
    trainer.train_step()
    trainer.train_step()
    trainer.save()
    good = load_checkpoint(str(tmp_path / "run"))
    if writer == "weights":
        monkeypatch.setattr(storage, "save_file", _disk_full)
    else:
        monkeypatch.setattr(storage.torch, "save", _disk_full)
    with pytest.raises(CheckpointError, match=r"could not write checkpoint iter_0000004 .*No space left on device"
                                              r".*`latest` still names the complete iter_0000002"):
        trainer.fit()
    monkeypatch.undo()
    names = os.listdir(tmp_path / "run")
    assert "iter_0000004" not in names and not [n for n in names if n.startswith(storage.TMP_PREFIX)]
    after = load_checkpoint(str(tmp_path / "run"))
    assert after.iteration == 2
    assert all(torch.equal(good.model_state[k], v) for k, v in after.model_state.items())


class _FullDisk:
    f_bavail, f_frsize = 0, 4096


def test_torch_saves_runtime_error_on_a_full_disk_is_a_one_line_no_space_error(tmp_path, monkeypatch):
    write_two_checkpoints(str(tmp_path), sharded=False)

    def zip_writer_failed(*args, **kwargs):  # what torch.save raises when the disk fills under it
        raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 1344 vs 1232")
    monkeypatch.setattr(storage.torch, "save", zip_writer_failed)
    monkeypatch.setattr(storage.os, "statvfs", lambda path: _FullDisk())
    model, optimizer = _tiny_model()
    with pytest.raises(CheckpointError, match=r"^could not write checkpoint iter_0000003 .*\(No space left on device "
                                              r"writing state.pt: .*unexpected pos.*still names the complete "
                                              r"iter_0000002") as error:
        save_checkpoint(str(tmp_path), 3, model_state=model.state_dict(), optimizer_state=optimizer.state_dict(),
                        extra={})
    assert "\n" not in str(error.value)
    assert sorted(os.listdir(tmp_path)) == ["iter_0000001", "iter_0000002", "latest"]


def test_a_full_disk_when_only_latest_fails_says_the_checkpoint_is_complete(tmp_path, monkeypatch):
    write_two_checkpoints(str(tmp_path), sharded=False)

    def no_room_for_latest(path, *args, **kwargs):
        if os.path.basename(path) == storage.TMP_PREFIX + storage.LATEST_FILE:
            with open(path, "w"):  # created, then the write fails
                pass
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)
        return open(path, *args, **kwargs)
    monkeypatch.setattr(storage, "open", no_room_for_latest, raising=False)
    model, optimizer = _tiny_model()
    with pytest.raises(CheckpointError, match=f"^checkpoint {tmp_path / 'iter_0000003'} is complete, but "
                                              f"{tmp_path / 'latest'} could not be updated \\(No space left on device"
                                              f"\\); `latest` still names the complete iter_0000002"):
        save_checkpoint(str(tmp_path), 3, model_state=model.state_dict(), optimizer_state=optimizer.state_dict(),
                        extra={}, keep_last=1)
    monkeypatch.undo()
    assert sorted(os.listdir(tmp_path)) == ["iter_0000001", "iter_0000002", "iter_0000003", "latest"]  # no rotation
    assert load_checkpoint(str(tmp_path / "iter_0000003")).iteration == 3


def test_a_plot_that_fails_after_a_good_save_is_a_warning(tmp_path, monkeypatch):
    import moetrain.plot

    monkeypatch.setattr(moetrain.plot, "plot_metrics", _disk_full)
    trainer = Trainer(tiny_config(tmp_path, train_iters=1), quiet=False)
    with pytest.warns(UserWarning, match="could not write the plots .*No space left on device.*checkpoint is complete"):
        trainer.fit()
    assert load_checkpoint(str(tmp_path / "run")).iteration == 1


def test_a_full_disk_outside_a_checkpoint_is_one_line_naming_the_file(tmp_path, monkeypatch, capsys):
    from moetrain.cli import main
    from moetrain.train.metrics import MetricsLogger

    def full(self, record):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp_path / "run" / "metrics.jsonl"))
    monkeypatch.setattr(MetricsLogger, "log", full)
    cfg = tiny_config(tmp_path)
    with pytest.raises(SystemExit) as exited:
        main(["train", "--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4", "--seq-length", "16",
              "--micro-batch-size", "2", "--num-experts", "4", "--train-iters", "1", "--no-progress-bar",
              "--data-path", cfg.data.data_path[0], "--split", "80,20,0", "--tokenizer-type", "byte",
              "--data-cache-dir", cfg.data.cache_dir, "--save", str(tmp_path / "run")])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert exited.value.code == 1
    assert err == (f"moetrain train: error: No space left on device writing {tmp_path / 'run' / 'metrics.jsonl'}; "
                   f"free disk space (a checkpoint run resumes with --load)")


def test_a_full_disk_during_a_sharded_save(tmp_path, monkeypatch):
    import moetrain.checkpoint.sharded as sharded

    write_two_checkpoints(str(tmp_path), sharded=True)
    monkeypatch.setattr(sharded, "save_file", _disk_full)
    model, optimizer = _tiny_model()
    with pytest.raises(CheckpointError, match="No space left on device.*iter_0000002"):
        save_sharded(str(tmp_path), 3, model, optimizer, {}, {}, ParallelState())
    assert load_checkpoint(str(tmp_path)).iteration == 2
    assert not [n for n in os.listdir(tmp_path) if n.startswith(storage.TMP_PREFIX)]


# ------------------------------------------------------------------------------------------ one run per dir


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_a_second_run_on_the_same_save_directory_is_refused(tmp_path):
    save_dir = tmp_path / "run"
    save_dir.mkdir()
    (save_dir / LOCK_FILE).write_text(json.dumps({"pid": os.getppid(), "host": socket.gethostname()}))
    with pytest.raises(CheckpointError, match=rf"in use by another run \(pid {os.getppid()} on "):
        Trainer(tiny_config(tmp_path), quiet=True)
    (save_dir / LOCK_FILE).write_text(json.dumps({"pid": 1, "host": "elsewhere"}))
    with pytest.raises(CheckpointError, match=f"delete {save_dir / LOCK_FILE}"):
        SaveDirLock(str(save_dir))


def test_a_stale_lock_is_taken_over_and_released_after_the_run(tmp_path):
    save_dir = tmp_path / "run"
    save_dir.mkdir()
    (save_dir / LOCK_FILE).write_text(json.dumps({"pid": _dead_pid(), "host": socket.gethostname()}))
    trainer = Trainer(tiny_config(tmp_path, train_iters=1), quiet=True)
    assert json.loads((save_dir / LOCK_FILE).read_text())["pid"] == os.getpid()
    trainer.fit()
    assert not (save_dir / LOCK_FILE).exists()


# ------------------------------------------------------------------------------------------ garbage files


def test_a_latest_of_garbage_bytes_is_refused_naming_the_file(tmp_path):
    write_two_checkpoints(str(tmp_path), sharded=False)
    (tmp_path / "latest").write_bytes(bytes(range(128, 256)))
    with pytest.raises(CheckpointError, match=f"^{tmp_path / 'latest'} is corrupt \\(not text"):
        load_checkpoint(str(tmp_path))


def test_a_state_pt_of_garbage_is_reported_as_corruption_not_as_pickled_objects(tmp_path):
    write_two_checkpoints(str(tmp_path), sharded=False)
    (tmp_path / "iter_0000002" / "state.pt").write_bytes(random.Random(0).randbytes(4096))
    os.remove(tmp_path / "iter_0000002" / MANIFEST_FILE)  # not caught by the digest: by the reader itself
    with pytest.raises(CheckpointError, match="state.pt is corrupt .*--load .*iter_0000001") as error:
        load_checkpoint(str(tmp_path))
    assert "pickled" not in str(error.value) and "\n" not in str(error.value)


def test_generate_reading_a_checkpoint_that_a_rotation_removes_reads_the_new_latest(tmp_path, monkeypatch):
    from moetrain.checkpoint import api

    Trainer(tiny_config(tmp_path, train_iters=2, save_interval=1, keep_last_checkpoints=1), quiet=True).fit()
    read_model_config = api.read_model_config
    rotations = []

    def rotated_while_reading(path):
        if not rotations:  # the job publishes iteration 3 and removes 2 just after `latest` was resolved
            rotations.append(path)
            shutil.copytree(tmp_path / "run" / "iter_0000002", tmp_path / "run" / "iter_0000003")
            (tmp_path / "run" / "latest").write_text("iter_0000003\n")
            shutil.rmtree(tmp_path / "run" / "iter_0000002")
        return read_model_config(path)
    monkeypatch.setattr(api, "read_model_config", rotated_while_reading)
    model, _, _ = api.load_model(str(tmp_path / "run"))
    assert rotations == [str(tmp_path / "run" / "iter_0000002")] and model is not None


# ------------------------------------------------------------------------------------------ interrupted re-save


def test_a_re_save_cut_between_its_renames_recovers_without_a_hand(tmp_path):
    Trainer(tiny_config(tmp_path, train_iters=2, save_interval=1), quiet=True).fit()
    run = tmp_path / "run"
    saved = load_checkpoint(str(run))
    # a re-save of iteration 2 killed after moving the original aside, before renaming the new one in
    os.replace(run / "iter_0000002", run / (storage.REPLACED_PREFIX + "iter_0000002"))
    (run / (storage.TMP_PREFIX + "iter_0000002")).mkdir()
    reader_view = load_checkpoint(str(run))  # a reader (generate) reads the complete original where it is
    assert reader_view.iteration == 2 and reader_view.path.endswith(storage.REPLACED_PREFIX + "iter_0000002")
    with pytest.warns(UserWarning, match="a crash interrupted re-saving iter_0000002 .* restored the complete"):
        resumed = Trainer(tiny_config(tmp_path, train_iters=3, load=str(run)), quiet=True)  # a --max-restarts loop
    assert resumed.iteration == 2 and (run / "iter_0000002").is_dir()
    assert not (run / (storage.REPLACED_PREFIX + "iter_0000002")).exists()
    assert all(torch.equal(v, load_checkpoint(str(run)).model_state[k]) for k, v in saved.model_state.items())
    resumed.fit()
    assert load_checkpoint(str(run)).iteration == 3
