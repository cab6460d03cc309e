"""A dead rank under torchrun: the job restarts (--max-restarts), resumes from its last checkpoint
(--load = --save) and ends with the same losses as a run nobody killed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import ROOT, free_port, write_corpus

# `moetrain train`, except that on the job's first attempt rank 1 kills itself (SIGKILL) at KILL_AT
WORKER = """
import os, signal, sys
from moetrain.cli import main
from moetrain.train.trainer import Trainer

kill_at = int(os.environ.get("KILL_AT", "0"))
if kill_at and os.environ["RANK"] == "1" and os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0":
    train_step = Trainer.train_step

    def dying_step(self):
        if self.iteration == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        return train_step(self)
    Trainer.train_step = dying_step
main(["train", *sys.argv[1:]])
"""


def torchrun_job(tmp_path: Path, name: str, kill_at: int) -> dict[int, float]:
    """Run the 2-process job with --max-restarts 1; return the loss of each step (the last record of a
    step logged twice, i.e. after the restart)."""
    worker = tmp_path / "worker.py"
    worker.write_text(WORKER)
    save = tmp_path / name
    args = ["--data-path", write_corpus(tmp_path), "--tokenizer-type", "byte", "--split", "80,20,0",
            "--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4", "--seq-length", "16",
            "--num-experts", "4", "--micro-batch-size", "2", "--global-batch-size", "4", "--train-iters", "6",
            "--save-interval", "2", "--log-interval", "1", "--eval-iters", "1", "--eval-interval", "0",
            "--save", str(save), "--load", str(save), "--device", "cpu", "--data-cache-dir", str(tmp_path / "cache"),
            "--no-progress-bar", "--lr-warmup-iters", "0", "--distributed-timeout-minutes", "1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "KILL_AT": str(kill_at)}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--max-restarts=1",
                           f"--master_port={free_port()}", str(worker), *args],
                          capture_output=True, text=True, env=env, timeout=400)
    errors = [line for line in done.stderr.splitlines() if "Error" in line or "error:" in line]
    assert done.returncode == 0, "\n".join(errors[-20:]) or done.stderr[-3000:]
    restarted = "resumed from" in done.stdout
    assert restarted == bool(kill_at), done.stdout[-2000:]
    with open(save / "metrics.jsonl") as f:
        records = [json.loads(line) for line in f if line.strip()]
    return {r["step"]: r["loss"] for r in records if r["type"] == "train"}


@pytest.mark.slow
def test_a_killed_worker_restarts_from_the_checkpoint_and_matches_an_uninterrupted_run(tmp_path):
    killed = torchrun_job(tmp_path, "killed", kill_at=3)  # dies in step 4, after the checkpoint at 2
    uninterrupted = torchrun_job(tmp_path, "whole", kill_at=0)
    assert sorted(killed) == sorted(uninterrupted) == list(range(1, 7))
    assert killed == pytest.approx(uninterrupted, rel=1e-6)


def test_the_survivor_of_a_dead_rank_exits_instead_of_hanging(tmp_path):
    """Without torchrun's agent to stop it, rank 0 must fail its next collective, well within the timeout."""
    worker = tmp_path / "worker.py"
    worker.write_text(WORKER)
    args = ["--data-path", write_corpus(tmp_path), "--tokenizer-type", "byte", "--split", "80,20,0",
            "--num-layers", "2", "--expert-interval", "1", "--hidden-size", "16", "--num-attention-heads", "2",
            "--seq-length", "8", "--lr-warmup-iters", "0",
            "--num-experts", "2", "--micro-batch-size", "1", "--train-iters", "50", "--device", "cpu",
            "--no-save", "--data-cache-dir", str(tmp_path / "cache"), "--no-progress-bar",
            "--distributed-timeout-minutes", "1"]
    port = str(free_port())
    ranks = [subprocess.Popen([sys.executable, str(worker), *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT),
                                              "KILL_AT": "2", "RANK": str(rank), "LOCAL_RANK": str(rank),
                                              "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port})
             for rank in (0, 1)]
    try:
        _, err = ranks[0].communicate(timeout=240)  # startup on a busy machine + at most the 1-minute timeout
    finally:
        for process in ranks:
            process.kill()
        _, err_1 = ranks[1].communicate()
    assert ranks[1].returncode == -9, err_1[-2000:]
    assert ranks[0].returncode != 0 and "Step 50" not in err
