"""Shared test helpers: a tiny corpus, a tiny trainable config, a free TCP port for process groups.

One intra-op thread per test process: the suite runs tiny models, where a second thread only
adds synchronisation (a tiny forward took 8 ms with 1 thread, 0.5 s with 2 on a busy 2-core box)."""

import json
import os
import socket

import torch

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
