"""Checkpoint faults, tabulated: kill -9 during saving N times, and every file of a checkpoint truncated or
bit-flipped (single-process and sharded formats), plus index.json entries pointing outside the checkpoint.

Each row says what happened and whether data was lost: a damaged checkpoint loaded as if it were good,
the previous complete checkpoint no longer loading, or a restart resuming from anything older than the
newest complete checkpoint. The cases are the ones tests/checkpoint/test_checkpoint_faults.py asserts.

    python benchmarks/faults.py            # 20 kills
    python benchmarks/faults.py --kills 5  # quicker, on a shared machine
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from moetrain.checkpoint import storage  # noqa: E402
from tests.test_checkpoint_faults import CORRUPTIONS, kill_during_save, load_damaged  # noqa: E402


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kills", type=int, default=20)
    parser.add_argument("--seed", type=int, default=18)
    args = parser.parse_args()
    rows = [kill_loop(args.kills, args.seed)] + [corruption(*case) for case in CORRUPTIONS]
    width = max(len(case) for case, _, _ in rows)
    print(f"{'case':<{width}} | data lost | outcome")
    print(f"{'-' * width}-|-----------|--------")
    for case, outcome, lost in rows:
        print(f"{case:<{width}} | {'YES' if lost else 'no':<9} | {outcome}")
    print(f"\n{sum(lost for _, _, lost in rows)} of {len(rows)} cases lost data")


if __name__ == "__main__":
    main()
