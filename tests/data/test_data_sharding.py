"""Each data-parallel rank reads only its own rows, in the job's one sample order, and only its own evaluation
batches; token caches are written once, by whichever process takes their lock file, with no collective while
it works."""

from __future__ import annotations

import json
import multiprocessing
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from moetrain.config import Config
from moetrain.data import load_training_data
from moetrain.data.blend import NO_ROWS, BlendedBatches
from moetrain.data.loader import TokenBatches
from moetrain.train.trainer import Trainer
from tests.helpers import free_port, tiny_config, write_corpus


class CountingTokens:
    """Stands in for a dataset's token array and records every index read from it."""

    def __init__(self, tokens) -> None:
        self.tokens, self.reads = tokens, []

    def __len__(self) -> int:
        return len(self.tokens)

    def __getitem__(self, index):
        self.reads.append(np.asarray(index))
        return self.tokens[index]

    def windows_read(self, seq_length: int) -> list[int]:
        return [int(start) // seq_length for read in self.reads for start in np.atleast_2d(read)[:, 0]]


def blend(seq_length: int = 8) -> BlendedBatches:
    """Two sources with disjoint token ranges (every row shows where it came from), wrapped to count reads."""
    sources = [TokenBatches(np.arange(offset, offset + size), seq_length, seed=7, stream=k + 1)
               for k, (offset, size) in enumerate([(0, 161), (10_000, 403)])]
    for source in sources:
        source.tokens = CountingTokens(source.tokens)
    return BlendedBatches(sources, [0.3, 0.7])


def _reads(batches) -> list[int]:
    """The windows read from each source's tokens, by source."""
    sources = [batches] if isinstance(batches, TokenBatches) else batches.sources
    return [len(source.tokens.windows_read(source.seq_length)) for source in sources]


@pytest.mark.parametrize("make", [lambda: TokenBatches(CountingTokens(np.arange(500)), 8, seed=3), blend],
                         ids=["one source", "blend"])
def test_a_rank_reads_its_rows_of_the_global_batch_and_nothing_else(make):
    whole, ranks = make(), [make() for _ in range(3)]  # each rank its own reader, as in a job
    for batch in range(12):  # crosses epochs of every source
        inputs, targets = whole.next_batch(6)
        for rank, reader in enumerate(ranks):
            assert reader.samples_drawn == 6 * batch
            if batch % 4 == 3:  # a skipped batch (a rewind, a middle pipeline stage) advances as far
                assert reader.next_batch(6, rows=NO_ROWS)[0].shape == (0, 8)
                continue
            rows = slice(2 * rank, 2 * rank + 2)
            got = reader.next_batch(6, rows=rows)
            assert torch.equal(got[0], inputs[rows]) and torch.equal(got[1], targets[rows])
    assert whole.state_dict() == ranks[0].state_dict() == ranks[2].state_dict()
    for reader in ranks:
        assert sum(_reads(reader)) == 9 * 2  # its two rows of the 9 batches read; nothing of the others'
    assert sum(_reads(whole)) == 12 * 6


@pytest.mark.parametrize("make", [lambda: TokenBatches(CountingTokens(np.arange(500)), 8), blend],
                         ids=["one source", "blend"])
def test_an_evaluation_batch_read_alone_is_that_batch_of_all_and_reads_only_its_windows(make):
    whole = make()
    sizes = whole.eval_batch_sizes(5, 11)  # 55 samples: more than the blend's first source holds (it wraps)
    assert sizes == [5] * 11
    everything = whole.eval_batches(5, range(11))
    for indices in ([3], [10, 0, 7], []):
        reader = make()
        got = reader.eval_batches(5, indices)
        assert len(got) == len(indices)
        for index, (inputs, targets) in zip(indices, got):
            assert torch.equal(inputs, everything[index][0]) and torch.equal(targets, everything[index][1])
        assert sum(_reads(reader)) == 5 * len(indices)
    assert sum(_reads(whole)) == 55


def _dp_worker(rank: int, world: int, port: int, cfg_dict: dict, results) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    try:
        trainer = Trainer(Config.from_dict(cfg_dict), quiet=True)
        tokens = trainer.train_data.tokens = CountingTokens(trainer.train_data.tokens)
        eval_tokens = trainer.valid_data.tokens = CountingTokens(trainer.valid_data.tokens)
        result = trainer.fit()  # evaluates once, at the end
        seq_length = trainer.cfg.model.seq_length
        results[rank] = {"windows": tokens.windows_read(seq_length), "losses": result.losses,
                         "eval_windows": sorted(eval_tokens.windows_read(seq_length)), "eval": result.final_eval_loss}
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def test_a_data_parallel_rank_reads_only_its_rows_and_trains_as_one_process(tmp_path):
    cfg = tiny_config(tmp_path, save=None, train_iters=2, global_batch_size=8, micro_batch_size=2, eval_iters=3)
    cfg.moe.use_rts = False
    cfg.parallel.expert_parallel_size = 2
    results = mp.Manager().dict()
    mp.spawn(_dp_worker, args=(2, free_port(), cfg.to_dict(), results), nprocs=2, join=True)
    _, train, _ = load_training_data(cfg.data.data_path, tokenizer_type="byte", seq_length=cfg.model.seq_length,
                                     split=cfg.data.split, seed=cfg.training.seed, cache_dir=cfg.data.cache_dir)
    global_micro_batches = [train.next_windows(4).tolist() for _ in range(2 * 2)]  # 2 steps x 2 micro-batches
    for rank in (0, 1):
        assert results[rank]["windows"] == [w for batch in global_micro_batches for w in batch[2 * rank:2 * rank + 2]]
    # evaluation batches of 2 windows in order, dealt round-robin: rank 0 reads batches 0 and 2, rank 1
    # batch 1 and, for the padding round that pairs its collectives with rank 0's second, batch 0
    assert results[0]["eval_windows"] == [0, 1, 4, 5] and results[1]["eval_windows"] == [0, 1, 2, 3]
    single = Config.from_dict(cfg.to_dict())
    single.parallel.expert_parallel_size = None
    reference = Trainer(single, quiet=True).fit()
    torch.testing.assert_close(results[0]["losses"], reference.losses, rtol=1e-5, atol=1e-6)
    assert results[0]["eval"] == results[1]["eval"] == pytest.approx(reference.final_eval_loss, rel=1e-5)


CACHE_OPTIONS = {"vocab_size": 300, "seq_length": 16, "split": "80,20,0"}  # a BPE trained here, in the cache


def _cache_worker(corpus: str, cache_dir: str, log: str, start, results) -> None:
    """One rank: load raw text through the cache, its writes slowed so that the other rank surely waits."""
    import moetrain.data.loader as loader

    write_prepared = loader.write_prepared

    def slow_logged_write(*args, **kwargs):
        with open(log, "a") as f:
            f.write(f"{os.getpid()}\n")
        time.sleep(1.0)
        write_prepared(*args, **kwargs)

    loader.write_prepared = slow_logged_write
    start.wait()
    tokenizer, train, validation = load_training_data([corpus], cache_dir=cache_dir, **CACHE_OPTIONS)
    results[os.getpid()] = (tokenizer.to_json(), np.asarray(train.tokens).tolist(),
                            np.asarray(validation.tokens).tolist())


def test_ranks_tokenize_into_one_cache_written_once_without_a_collective(tmp_path):
    context = multiprocessing.get_context("spawn")
    with context.Manager() as manager:
        results, start = manager.dict(), manager.Barrier(2)
        args = (write_corpus(tmp_path), str(tmp_path / "cache"), str(tmp_path / "writes.log"), start, results)
        ranks = [context.Process(target=_cache_worker, args=args) for _ in range(2)]
        for rank in ranks:
            rank.start()
        for rank in ranks:
            rank.join(timeout=300)
            assert rank.exitcode == 0
        first, second = results.values()
    assert first == second  # the same tokenizer and the same ids on both ranks
    assert len((tmp_path / "writes.log").read_text().split()) == 1  # one writer; the other read its cache
    assert not list((tmp_path / "cache").glob("*.lock")) and not list((tmp_path / "cache").glob("*.tmp*"))


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_a_killed_writers_partial_cache_and_lock_are_not_used(tmp_path):
    corpus, cache = write_corpus(tmp_path), tmp_path / "cache"
    tokenizer, train, _ = load_training_data([corpus], cache_dir=str(cache), **CACHE_OPTIONS)
    expected = (tokenizer.to_json(), np.array(train.tokens))
    (idx,) = cache.glob("*.idx")
    prefix = str(idx)[:-len(".idx")]
    # killed while writing: the .bin half written, no .idx yet, a temporary file left, its lock still there
    bin_file = Path(prefix + ".bin")
    full_size = bin_file.stat().st_size
    bin_file.write_bytes(bin_file.read_bytes()[: bin_file.stat().st_size // 2])
    idx.unlink()
    Path(prefix + ".bin.tmp123").write_bytes(b"\x00" * 10)
    Path(prefix + ".lock").write_text(json.dumps({"pid": _dead_pid(), "host": socket.gethostname()}))
    tokenizer, train, _ = load_training_data([corpus], cache_dir=str(cache), **CACHE_OPTIONS)
    assert tokenizer.to_json() == expected[0] and np.array_equal(np.array(train.tokens), expected[1])
    assert idx.is_file() and bin_file.stat().st_size == full_size
    assert not Path(prefix + ".lock").exists()


def test_a_middle_pipeline_stage_reads_no_tokens_and_the_pipeline_trains_as_one_process(tmp_path):
    cfg = tiny_config(tmp_path, save=None, train_iters=2, global_batch_size=6, micro_batch_size=2)
    cfg.model.num_layers = 3
    cfg.moe.use_rts = False
    cfg.parallel.pipeline_parallel_size = 3
    results = mp.Manager().dict()
    mp.spawn(_dp_worker, args=(3, free_port(), cfg.to_dict(), results), nprocs=3, join=True)
    assert results[1]["windows"] == results[1]["eval_windows"] == []  # the middle stage: neither tokens nor targets
    assert results[0]["windows"] == results[2]["windows"] and len(results[0]["windows"]) == 2 * 6
    # the 2 evaluation batches (padded with batch 0 to the 3 micro-batches of a schedule run), each read once
    assert results[0]["eval_windows"] == results[2]["eval_windows"] == [0, 1, 2, 3]
    single = Config.from_dict(cfg.to_dict())
    single.parallel.pipeline_parallel_size = 1
    reference = Trainer(single, quiet=True).fit()
    torch.testing.assert_close(results[2]["losses"], reference.losses, rtol=1e-5, atol=1e-6)
    assert all(results[rank]["eval"] == pytest.approx(reference.final_eval_loss, rel=1e-5) for rank in range(3))
