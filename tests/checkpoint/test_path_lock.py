"""PathLock (moetrain.filelock): exactly one process wins a stale lock however many take it over at
once, a live holder is refused whatever its file says, and a waiting lock gets it when the holder lets go.
(The --save directory's use of it is tested in test_checkpoint_faults.)"""

from __future__ import annotations

import json
import multiprocessing
import os
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from moetrain import filelock as lock_module
from moetrain.checkpoint import CheckpointError
from moetrain.checkpoint.lock import LOCK_FILE, SaveDirLock
from moetrain.filelock import PathInUse, PathLock
from tests.helpers import ROOT

RACERS = 3
ROUNDS = 12
JUDGING_DELAY_S = 0.05  # racer i takes i times this long to decide the lock is stale


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def _racer(index: int, save_dir: str, start, results) -> None:
    """Each round: wait for the others, try to take the stale lock over, report, let go once all reported."""
    alive = lock_module._alive

    def slow_alive(pid: int) -> bool:  # staggers the racers: the first has taken over before the last decides
        time.sleep(index * JUDGING_DELAY_S)
        return alive(pid)

    lock_module._alive = slow_alive
    for round_ in range(ROUNDS):
        start.wait()
        try:
            held = SaveDirLock(save_dir)
        except CheckpointError:
            held = None
        results.put((round_, index, held is not None))
        start.wait()  # every racer has reported
        if held is not None:
            held.release()
        start.wait()  # released: the next round's stale lock can be laid


def test_racers_taking_over_the_same_stale_lock_at_once_leave_exactly_one_owner(tmp_path):
    context = multiprocessing.get_context("spawn")
    start, results = context.Barrier(RACERS + 1), context.Queue()
    save_dir = tmp_path / "run"
    save_dir.mkdir()
    racers = [context.Process(target=_racer, args=(i, str(save_dir), start, results)) for i in range(RACERS)]
    for racer in racers:
        racer.start()
    try:
        stale = json.dumps({"pid": _dead_pid(), "host": socket.gethostname()})
        winners = []
        for _ in range(ROUNDS):
            (save_dir / LOCK_FILE).write_text(stale)
            start.wait(timeout=120)
            reports = [results.get(timeout=60) for _ in range(RACERS)]
            winners.append(sorted(index for _, index, won in reports if won))
            start.wait(timeout=60)
            start.wait(timeout=60)
        assert all(len(won) == 1 for won in winners), winners
    finally:
        for racer in racers:
            racer.join(timeout=30)
            if racer.is_alive():
                racer.kill()


HOLDER = textwrap.dedent("""
    import sys, time
    from moetrain.filelock import PathInUse, PathLock
    try:
        lock = PathLock(sys.argv[1])
    except PathInUse as error:
        sys.exit(f"refused: {error}")
    print("held", flush=True)
    time.sleep(float(sys.argv[2]))
    lock.release()
""")


def _hold_in_a_child(lock_file: Path, seconds: float) -> subprocess.Popen:
    child = subprocess.Popen([sys.executable, "-c", HOLDER, str(lock_file), str(seconds)], stdout=subprocess.PIPE,
                             text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert child.stdout.readline() == "held\n"
    return child


def test_a_live_holder_is_refused_even_when_its_file_names_a_dead_process(tmp_path):
    lock_file = tmp_path / "cache.lock"
    child = _hold_in_a_child(lock_file, 60)
    try:
        assert json.loads(lock_file.read_text())["pid"] == child.pid
        lock_file.write_text(json.dumps({"pid": _dead_pid(), "host": socket.gethostname()}))  # same file, rewritten
        with pytest.raises(PathInUse, match=rf"^{lock_file} is in use by another run \(pid \d+ on .*\); "
                                                  rf"if that run is gone, delete {lock_file}$"):
            PathLock(str(lock_file))
    finally:
        child.kill()
        child.wait()
        child.stdout.close()
    with PathLock(str(lock_file)) as lock:  # killed: the kernel dropped its flock
        assert json.loads(lock_file.read_text())["pid"] == os.getpid() and lock.path == str(lock_file)
    assert not lock_file.exists()


def test_a_waiting_lock_gets_it_when_the_holder_releases(tmp_path):
    lock_file = tmp_path / "cache.lock"
    child = _hold_in_a_child(lock_file, 0.5)
    try:
        with pytest.raises(PathInUse, match="in use by another run"):
            PathLock(str(lock_file), timeout_s=0.0)
        with PathLock(str(lock_file), name="the cache", timeout_s=60):
            assert child.wait(timeout=60) == 0
            assert json.loads(lock_file.read_text())["pid"] == os.getpid()
    finally:
        child.kill()
        child.wait()
        child.stdout.close()


def test_a_second_lock_in_the_holding_process_takes_it_over(tmp_path):
    first = PathLock(str(tmp_path / "x.lock"))
    second = PathLock(str(tmp_path / "x.lock"))  # e.g. a second Trainer on one --save in a test
    first.release()  # no longer its to release
    assert (tmp_path / "x.lock").exists()
    refused = subprocess.run([sys.executable, "-c", HOLDER, str(tmp_path / "x.lock"), "0"], capture_output=True,
                             text=True, env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=120)
    assert refused.stderr.startswith(f"refused: {tmp_path / 'x.lock'} is in use by another run (pid {os.getpid()} ")
    second.release()
    assert not (tmp_path / "x.lock").exists()
