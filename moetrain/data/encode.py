"""Documents -> token ids on disk, in input order: in this process, or in N single-threaded worker processes.

By default (no --workers) this process encodes, and the tokenizer library spreads each batch over every core
by itself. `--workers N` means N processes, as in Megatron's preprocess_data.py; they would only fight
those threads, so each worker process encodes on one thread (TOKENIZERS_PARALLELISM=false,
inherited from the parent) a large chunk of text at a time, and writes its ids to a shard file beside the
output; the parent reads the documents, hands out the chunks and appends the finished shards in input order.
Only text goes to a worker and only the documents' lengths come back, so the pipes carry little.
"""

import contextlib
import multiprocessing
import os
import shutil
import sys
import tempfile
from collections import deque
from collections.abc import Iterable, Iterator
from itertools import chain
from pathlib import Path
from typing import BinaryIO

import numpy as np

from moetrain.data.tokenizer import Tokenizer

# Characters of text per batch encoded in this process (~0.3 M tokens): dozens of documents for the library's
# threads to share, with memory flat.
BATCH_CHARACTERS = 1 << 20
# Characters per worker's chunk (~0.3 M tokens, ~0.4 s on one thread): the chunk's fixed cost (its text through
# a pipe, one shard file, a few ms) stays near 1% of encoding it (at 1 << 18 it cost 20% more CPU per token
# on 2 cores: 1.62x from 1 to 2 workers against 1.91x now), and N workers finish within one chunk of each other.
WORKER_CHUNK_CHARACTERS = 1 << 20


def _chunks(documents: Iterable[str], characters: int) -> Iterator[list[str]]:
    """Consecutive documents, grouped until a group holds at least `characters` characters."""
    chunk, size = [], 0
    for document in documents:
        chunk.append(document)
        size += len(document)
        if size >= characters:
            yield chunk
            chunk, size = [], 0
    if chunk:
        yield chunk


def _encode_chunk(chunk: list[str], tokenizer: Tokenizer, dtype: np.dtype,
                  append_eos: bool) -> tuple[np.ndarray, np.ndarray]:
    """One chunk's ids back to back in `dtype` and each document's length (its eos included)."""
    encoded = [ids + [tokenizer.eos_id] if append_eos else ids for ids in tokenizer.encode_batch(chunk)]
    lengths = np.fromiter(map(len, encoded), dtype=np.int64, count=len(encoded))
    return np.fromiter(chain.from_iterable(encoded), dtype=dtype, count=int(lengths.sum())), lengths


_worker_tokenizer: Tokenizer | None = None


def _start_worker(tokenizer_json: str) -> None:
    global _worker_tokenizer
    _worker_tokenizer = Tokenizer.from_json(tokenizer_json)


def _encode_to_shard(chunk: list[str], dtype: np.dtype, append_eos: bool, shard: str) -> np.ndarray:
    """In a worker: encodes the chunk into the file `shard`; returns the documents' lengths."""
    ids, lengths = _encode_chunk(chunk, _worker_tokenizer, dtype, append_eos)
    ids.tofile(shard)
    return lengths


@contextlib.contextmanager
def _single_threaded_tokenizers() -> Iterator[None]:
    """TOKENIZERS_PARALLELISM=false while worker processes start, so each inherits one encoding thread (the
    tokenizers library then also skips its fork warning); the caller's setting comes back afterwards."""
    previous = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    try:
        yield
    finally:
        if previous is None:
            del os.environ["TOKENIZERS_PARALLELISM"]
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = previous


def _encode_here(out: BinaryIO, chunks: Iterable[list[str]], tokenizer: Tokenizer, dtype: np.dtype,
                 append_eos: bool) -> Iterator[np.ndarray]:
    for chunk in chunks:
        ids, lengths = _encode_chunk(chunk, tokenizer, dtype, append_eos)
        out.write(ids.tobytes())
        yield lengths


def _encode_in_workers(out: BinaryIO, chunks: Iterable[list[str]], tokenizer: Tokenizer, dtype: np.dtype,
                       append_eos: bool, workers: int) -> Iterator[np.ndarray]:
    def append_shard(shard: str, result) -> np.ndarray:
        lengths = result.get()
        with open(shard, "rb") as source:
            shutil.copyfileobj(source, out, 1 << 20)
        os.unlink(shard)
        return lengths

    context = multiprocessing.get_context("fork" if sys.platform == "linux" else "spawn")
    with tempfile.TemporaryDirectory(prefix=".shards", dir=Path(out.name).parent) as shards, \
            _single_threaded_tokenizers(), \
            context.Pool(workers, initializer=_start_worker, initargs=(tokenizer.to_json(),)) as pool:
        pending: deque = deque()  # (shard, result) in input order; two chunks per worker keep every worker busy
        for index, chunk in enumerate(chunks):
            shard = os.path.join(shards, f"{index}.bin")
            pending.append((shard, pool.apply_async(_encode_to_shard, (chunk, dtype, append_eos, shard))))
            if len(pending) >= 2 * workers:
                yield append_shard(*pending.popleft())
        while pending:
            yield append_shard(*pending.popleft())


def write_token_ids(out: BinaryIO, documents: Iterable[str], tokenizer: Tokenizer, dtype: np.dtype, *,
                    append_eos: bool, workers: int | None = None) -> np.ndarray:
    """Writes every document's ids (then eos if `append_eos`) to `out` in input order, the same bytes for any
    number of `workers` (None: this process, the library's threads); returns each document's length. Shards
    go to a temporary folder beside `out`."""
    if workers is None:
        lengths = list(_encode_here(out, _chunks(documents, BATCH_CHARACTERS), tokenizer, dtype, append_eos))
    else:
        chunks = _chunks(documents, WORKER_CHUNK_CHARACTERS)
        lengths = list(_encode_in_workers(out, chunks, tokenizer, dtype, append_eos, workers))
    return np.concatenate(lengths) if lengths else np.zeros(0, np.int64)
