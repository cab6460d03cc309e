"""A finished multi-process job exits 0: the process groups are destroyed after a barrier (mesh.leave_job), so no
gloo thread outlives them into interpreter exit (`terminate called without an active exception`, SIGABRT).
A handful of runs here; benchmarks/faults.py counts exit codes over 40."""

from __future__ import annotations

import os
import subprocess
import sys

from tests.helpers import ROOT, free_port, write_corpus

RUNS = 3


def test_finished_two_process_runs_exit_0_every_time(tmp_path):
    args = ["--data-path", write_corpus(tmp_path), "--tokenizer-type", "byte", "--split", "80,20,0",
            "--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4", "--seq-length", "16",
            "--num-experts", "4", "--micro-batch-size", "2", "--global-batch-size", "4", "--train-iters", "3",
            "--no-save", "--eval-interval", "0", "--eval-iters", "1", "--device", "cpu", "--no-progress-bar",
            "--data-cache-dir", str(tmp_path / "cache")]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    for run in range(RUNS):
        done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                               f"--master_port={free_port()}", "-m", "moetrain", "train", *args],
                              capture_output=True, text=True, env=env, timeout=300)
        assert done.returncode == 0 and "terminate called" not in done.stderr, (run, done.stderr[-3000:])
