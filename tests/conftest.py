"""Shared test helpers: a tiny corpus, a tiny trainable config, a free TCP port for process groups, and
processes spawned as ranks (a gloo group of their own, or a config run as torchrun would launch it).

One intra-op thread per test process: the suite runs tiny models, where a second thread only
adds synchronisation (a tiny forward took 8 ms with 1 thread, 0.5 s with 2 on a busy 2-core box)."""

import contextlib
import json
import os
import socket
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from moetrain.config import Config

torch.set_num_threads(1)

TEXT = "the quick brown fox jumps over the lazy dog. " * 12  # 540 bytes per document


def write_corpus(root) -> str:
    """Five .txt documents: with split 80,20 four train and one validation document."""
    corpus = root / "corpus"
    corpus.mkdir(exist_ok=True)
    for i in range(5):
        (corpus / f"doc{i}.txt").write_text(TEXT)
    return str(corpus)


def tiny_config(tmp_path, *, save="run", **training) -> Config:
    """A 2-layer MoE on the tiny byte-level corpus that trains in seconds on a CPU; `training` overrides
    TrainingConfig fields."""
    cfg = Config()
    m = cfg.model
    m.num_layers, m.hidden_size, m.num_attention_heads, m.seq_length = 2, 32, 4, 16
    cfg.moe.num_experts, cfg.moe.expert_interval, cfg.moe.topk = [4], 1, 1
    cfg.data.data_path = [write_corpus(tmp_path)]
    cfg.data.tokenizer_type = "byte"
    cfg.data.cache_dir = str(tmp_path / "cache")
    cfg.data.split = "80,20,0"
    t = cfg.training
    t.micro_batch_size, t.train_iters, t.lr, t.lr_warmup_iters = 4, 6, 3e-3, 0
    t.eval_interval, t.eval_iters, t.log_interval = 0, 2, 1
    t.save = str(tmp_path / save) if save else None
    t.device, t.progress_bar = "cpu", False
    for key, value in training.items():
        setattr(t, key, value)
    return cfg


def read_records(save_dir):
    """The records of a run's metrics.jsonl."""
    with open(os.path.join(save_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


def free_port() -> int:
    """A TCP port free right now, for a process group's MASTER_PORT."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def gloo_group(rank: int, world: int, port: int) -> Iterator[None]:
    """This (spawned) process as `rank` of a `world`-process gloo group on 127.0.0.1:`port`, destroyed on exit."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        yield
    finally:
        dist.destroy_process_group()


def spawn(worker: Callable, world: int, *args: Any) -> dict:
    """`worker(rank, port, *args, results)` in `world` spawned processes (a module-level function, so it
    pickles); `results`, the dict they fill, as a plain dict."""
    results = mp.Manager().dict()
    mp.spawn(worker, args=(free_port(), *args, results), nprocs=world, join=True)
    return dict(results)


def run_ranks(work: Callable[[Config], Any], cfg: Config, world: int) -> dict[int, Any]:
    """rank -> `work(cfg)` on each of `world` spawned processes, launched as torchrun launches `moetrain train`
    (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT) with one thread each; `work` is a module-level function."""
    return spawn(_run_rank, world, work, world, cfg.to_dict())


def _run_rank(rank: int, port: int, work: Callable[[Config], Any], world: int, cfg_dict: dict, results) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    try:
        results[rank] = work(Config.from_dict(cfg_dict))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
