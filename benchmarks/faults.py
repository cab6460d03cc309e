"""Faults, tabulated: kill -9 during saving N times, every file of a checkpoint truncated or bit-flipped
(single-process and sharded formats); then whole `moetrain` commands as a user runs them: a diverging run
with checkpoint rotation (fp32, with rewinds, fp16), N two-process torchrun jobs and their exit codes, a
full disk at several fill levels (a 2 MiB tmpfs and a filler file; needs root to mount), a resume under
another head count or tokenizer, and BPE training on one long line without whitespace.

Each row says what happened and whether data was lost: a damaged checkpoint loaded as if it were good,
the previous complete checkpoint no longer loading, a restart resuming from anything older than the
newest complete checkpoint, or the last good checkpoint of a diverging run deleted. A command's row
also gives its exit code and whether its error was one line (no traceback). The cases are the ones
tests/checkpoint/test_checkpoint_faults.py and tests/train/test_divergence.py assert.

    python benchmarks/faults.py                              # 20 kills, 40 two-process runs
    python benchmarks/faults.py --kills 5 --exit-runs 10     # quicker, on a shared machine
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from moetrain.checkpoint import list_checkpoints, load_checkpoint, storage  # noqa: E402
from tests.checkpoint.test_checkpoint_faults import CORRUPTIONS, kill_during_save, load_damaged  # noqa: E402

TINY = ["--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4", "--seq-length", "32",
        "--micro-batch-size", "2", "--global-batch-size", "4", "--num-experts", "4", "--no-progress-bar",
        "--tokenizer-type", "byte", "--device", "cpu"]


def kill_loop(kills: int, seed: int) -> tuple[str, str, bool]:
    rng = random.Random(seed)
    landed_mid_save, lost, previous = 0, False, 0
    with tempfile.TemporaryDirectory() as tmp:
        save_dir = os.path.join(tmp, "run")
        for _ in range(kills):
            try:
                resumed, latest = kill_during_save(save_dir, rng)
            except AssertionError as error:
                return f"kill -9 during save x{kills}", f"resume failed: {str(error)[:60]}", True
            lost |= resumed != previous
            previous = latest
            landed_mid_save += os.path.isdir(save_dir) and any(
                n.startswith(storage.TMP_PREFIX + "iter_") for n in os.listdir(save_dir))
    outcome = (f"{kills}/{kills} restarts resumed from the newest complete checkpoint (iteration {previous}); "
               f"{landed_mid_save} kills left a half-written hidden dir")
    return f"kill -9 during save x{kills}", outcome, lost


def corruption(file: str, how: str, sharded: bool) -> tuple[str, str, bool]:
    case = f"{how} {file}" + (" (sharded)" if sharded and file == "state.pt" else "")
    with tempfile.TemporaryDirectory() as tmp:
        try:
            message = load_damaged(os.path.join(tmp, "run"), file, how, sharded)
        except AssertionError as error:
            return case, f"NOT DETECTED: {error}", True
        message = message.replace(os.path.join(tmp, "run") + os.sep, "")
    return case, f"refused: {message[:100]}", False


def moetrain(*args: str, cwd: str, torchrun: bool = False) -> tuple[int, str]:
    """Run a `moetrain` command (under a 2-process torchrun); its exit code and stderr."""
    launcher = ["-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={random.randint(20000, 60000)}"] \
        if torchrun else []
    done = subprocess.run([sys.executable, *launcher, "-m", "moetrain", *args], cwd=cwd, capture_output=True,
                          text=True, env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"})
    return done.returncode, done.stderr


def error_lines(stderr: str) -> str:
    """"one line" when the command reported one error line and no traceback, else what it printed."""
    errors = [line for line in stderr.splitlines() if "error" in line.lower() and "UserWarning" not in line]
    if "Traceback" in stderr or len(errors) > 1:
        return f"TRACEBACK/{len(errors)} lines"
    return "one line" if errors else "no error"


def corpus(directory: str) -> list[str]:
    """A small text corpus in `directory`; the flags that train on it with a token cache there too."""
    rng = random.Random(0)
    words = "the quick brown fox jumps over lazy dog and cat sat on mat".split()
    path = os.path.join(directory, "corpus.txt")
    with open(path, "w") as f:
        f.write("\n".join(" ".join(rng.choice(words) for _ in range(20)) for _ in range(400)))
    return [*TINY, "--data-path", path, "--data-cache-dir", os.path.join(directory, "cache")]


def divergence(variant: str) -> tuple[str, str, bool]:
    """The issue's two runs: 6 healthy steps saved every step keeping 3, then --lr 1e3 on top of them."""
    with tempfile.TemporaryDirectory() as tmp:
        flags, run = corpus(tmp), os.path.join(tmp, "r")
        extra = {"fp32": [], "rewind": ["--rewind-on-divergence", "2"], "fp16": ["--fp16"]}[variant]
        moetrain("train", *flags, "--train-iters", "6", "--lr-warmup-iters", "1", "--save", run, "--save-interval",
                 "1", "--keep-last-checkpoints", "3", cwd=tmp)
        code, stderr = moetrain("train", *flags, "--train-iters", "40", "--lr", "1e3", "--lr-warmup-iters", "0",
                                "--lr-decay-style", "constant", "--load", run, "--save", run, "--save-interval", "1",
                                "--keep-last-checkpoints", "3", *extra, cwd=tmp)
        kept = list_checkpoints(run)
        latest = load_checkpoint(run).iteration
    case = f"divergence, rotation keeping 3 ({variant})"
    lost = 6 not in kept or code == 0
    return case, (f"exit {code}, {error_lines(stderr)}; kept iterations {kept}, latest {latest} (healthy: 6)"), lost


def short_fp16_divergence() -> tuple[str, str, bool]:
    with tempfile.TemporaryDirectory() as tmp:
        run = os.path.join(tmp, "f")
        code, stderr = moetrain("train", *corpus(tmp), "--fp16", "--train-iters", "3", "--lr", "1e3", "--save", run,
                                cwd=tmp)
        written = list_checkpoints(run)
    return "fp16 --lr 1e3, 3 steps", f"exit {code}, {error_lines(stderr)}; checkpoints written: {written}", \
        code == 0 or bool(written)


def exit_codes(runs: int) -> tuple[str, str, bool]:
    """The issue's loop: finished two-process jobs (--no-save) and their exit codes."""
    codes, aborts = [], 0
    with tempfile.TemporaryDirectory() as tmp:
        flags = corpus(tmp)
        for _ in range(runs):
            code, stderr = moetrain("train", *flags, "--train-iters", "3", "--no-save", "--eval-interval", "0",
                                    cwd=tmp, torchrun=True)
            codes.append(code)
            aborts += "terminate called" in stderr
    failed = sum(code != 0 for code in codes)
    return f"torchrun 2 processes x{runs}, finished", f"{runs - failed}/{runs} exit 0; {aborts} aborts at exit", \
        failed > 0


def disk_full(free_kib: int) -> tuple[str, str, bool]:
    """Resume a run saved at iteration 2 on a 2 MiB tmpfs filled to leave `free_kib`; save at 4."""
    case = f"disk full, {free_kib} KiB free"
    with tempfile.TemporaryDirectory() as tmp:
        flags, mount = corpus(tmp), os.path.join(tmp, "disk")
        os.makedirs(mount)
        if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", mount], capture_output=True).returncode:
            return case, "skipped: mounting a tmpfs needs root", False
        try:
            moetrain("train", *flags, "--train-iters", "2", "--save", os.path.join(tmp, "good"), cwd=tmp)
            run = os.path.join(mount, "run")
            shutil.copytree(os.path.join(tmp, "good"), run)
            stats = os.statvfs(mount)
            with open(os.path.join(mount, "filler"), "wb") as f:
                f.write(b"\0" * max(stats.f_bavail * stats.f_frsize - free_kib * 1024, 0))
            code, stderr = moetrain("train", *flags, "--train-iters", "4", "--load", run, "--save", run, cwd=tmp)
            leftovers = [n for n in os.listdir(run) if n.startswith(storage.TMP_PREFIX)]
            try:
                latest = load_checkpoint(run).iteration
            except Exception as error:  # noqa: BLE001 - a row, not a crash
                latest = f"unloadable ({error})"
        finally:
            subprocess.run(["umount", mount], capture_output=True)
    message = next((line for line in stderr.splitlines() if "error" in line), "").replace(tmp, "")
    outcome = f"exit {code}, {error_lines(stderr)}; latest loads iteration {latest}; leftovers {leftovers or 'none'}"
    return case, f"{outcome}; {message[:110]}", not isinstance(latest, int) or bool(leftovers)


def mismatched_resume(flag: list[str]) -> tuple[str, str, bool]:
    with tempfile.TemporaryDirectory() as tmp:
        flags, run = corpus(tmp), os.path.join(tmp, "run")
        moetrain("train", *flags, "--train-iters", "2", "--save", run, cwd=tmp)
        # a flag given twice: the last one wins
        code, stderr = moetrain("train", *flags, *flag, "--train-iters", "4", "--load", run, "--save", run, cwd=tmp)
    message = next((line for line in stderr.splitlines() if "error" in line), "").replace(tmp, "")
    return f"resume with {' '.join(flag)}", f"exit {code}, {error_lines(stderr)}: {message[:130]}", code == 0


def long_line(chars: int) -> tuple[str, str, bool]:
    with tempfile.TemporaryDirectory() as tmp:
        with open(os.path.join(tmp, "one.txt"), "w") as f:
            f.write("x" * chars)
        start = time.perf_counter()
        code, stderr = moetrain("prepare-data", "--input", "one.txt", "--output-prefix", "p", "--vocab-size", "300",
                                cwd=tmp)
        seconds = time.perf_counter() - start
    return f"prepare-data, {chars:,} chars without whitespace", f"exit {code}, {seconds:.1f} s (command total)", \
        code != 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kills", type=int, default=20)
    parser.add_argument("--seed", type=int, default=18)
    parser.add_argument("--exit-runs", type=int, default=40, help="two-process torchrun jobs; 0 skips the row")
    args = parser.parse_args()
    rows = [kill_loop(args.kills, args.seed)] + [corruption(*case) for case in CORRUPTIONS]
    rows += [divergence(variant) for variant in ("fp32", "rewind", "fp16")] + [short_fp16_divergence()]
    rows += [disk_full(free) for free in (0, 64, 256, 512)]
    rows += [mismatched_resume(flag) for flag in (["--num-attention-heads", "8"],
                                                  ["--tokenizer-type", "bpe", "--vocab-size", "257"])]
    rows += [long_line(chars) for chars in (250_000, 1_000_000)]
    if args.exit_runs:
        rows.append(exit_codes(args.exit_runs))
    width = max(len(case) for case, _, _ in rows)
    print(f"{'case':<{width}} | data lost | outcome")
    print(f"{'-' * width}-|-----------|--------")
    for case, outcome, lost in rows:
        print(f"{case:<{width}} | {'YES' if lost else 'no':<9} | {outcome}")
    print(f"\n{sum(lost for _, _, lost in rows)} of {len(rows)} cases lost data")


if __name__ == "__main__":
    main()
