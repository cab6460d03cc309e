"""The data-parallel all-reduce overlapped with the last micro-batch's backward gives the gradients of the
all-reduce after it, bit for bit, and really starts during the backward (gloo, 2 processes)."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from moetrain.config import Config
from moetrain.train.trainer import Trainer
from tests.helpers import free_port, parallel_config


def _grads(trainer: Trainer, batches: list, overlap: bool) -> tuple[dict, int]:
    """Gradients after forward, backward and reduction of `batches`; buckets launched inside the backward."""
    sync, launched = trainer.grad_sync, 0
    trainer.optimizer.zero_grad(set_to_none=True)
    feed = iter(batches)
    torch.manual_seed(7)
    if overlap:
        trainer.executor.forward_backward(lambda: next(feed), 0, None, sync.before_last_backward)
        launched = len(sync.overlapped.launched)
    else:
        trainer.executor.forward_backward(lambda: next(feed), 0, None)
    sync.reduce()
    return {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None}, launched


def _worker(rank: int, port: int, cfg_dict: dict, results) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2",
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    try:
        trainer = Trainer(Config.from_dict(cfg_dict), quiet=True)
        assert trainer.accumulation == 2
        batches = [trainer._next_batch() for _ in range(trainer.accumulation)]
        overlapped, launched = _grads(trainer, batches, overlap=True)
        after, _ = _grads(trainer, batches, overlap=False)
        results[rank] = {"launched": launched, "buckets": len(trainer.grad_sync.overlapped.buckets),
                         "equal": overlapped.keys() == after.keys() and all(
                             torch.equal(overlapped[n], after[n]) for n in after)}
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def test_overlapped_all_reduce_equals_the_all_reduce_after_backward(tmp_path):
    cfg = parallel_config(tmp_path)  # DP 2, micro-batch 2, global batch 8: 2 micro-batches per rank
    results = mp.Manager().dict()
    mp.spawn(_worker, args=(free_port(), cfg.to_dict(), results), nprocs=2, join=True)
    for rank in range(2):
        assert results[rank]["equal"], f"rank {rank}"
        assert 0 < results[rank]["launched"] <= results[rank]["buckets"]
