"""Each data-parallel rank reads only its own rows, in the job's one sample order; token caches are
written once, by whichever process takes their lock file, with no collective while it works."""

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
from tests.conftest import free_port, tiny_config


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
