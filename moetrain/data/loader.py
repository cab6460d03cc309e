"""From data paths to resumable batches: resolve inputs to a prepared dataset, split it, cut windows."""

import hashlib
import json
import math
import os
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from moetrain.data import DataError
from moetrain.data.corpus import default_corpus, input_files, read_documents
from moetrain.data.indexed import FORMAT_VERSION, IndexedDataset, prepared_prefix, write_prepared
from moetrain.data.tokenizer import Tokenizer, build_tokenizer


class TokenBatches:
    """(input_ids, target_ids) batches cut from one split's token stream, resumable to the exact batch.

    The stream is cut into non-overlapping windows of seq_length + 1 tokens (consecutive windows share
    one boundary token, so every token is a target exactly once per epoch). Training walks a permutation
    of the windows drawn from (seed, epoch); the position is just (epoch, cursor), so resuming is exact.
    """

    def __init__(self, tokens: np.ndarray, seq_length: int, *, seed: int = 1234, name: str = "train"):
        if seq_length < 1:
            raise DataError(f"--seq-length must be at least 1, got {seq_length}")
        if len(tokens) < seq_length + 1:
            raise DataError(f"{name} split has {len(tokens)} tokens, needs at least {seq_length + 1} "
                            "(seq_length + 1); add data or lower --seq-length")
        self.tokens = tokens
        self.seq_length = seq_length
        self.name = name
        self.num_windows = (len(tokens) - 1) // seq_length
        self._seed = seed
        self._epoch = 0
        self._cursor = 0
        self._order = self._permutation()

    @property
    def num_tokens(self) -> int:
        return len(self.tokens)

    def _permutation(self) -> np.ndarray:
        return np.random.default_rng([self._seed, self._epoch]).permutation(self.num_windows)

    def _batch(self, windows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        positions = windows[:, None] * self.seq_length + np.arange(self.seq_length + 1)
        sequences = torch.from_numpy(self.tokens[positions].astype(np.int64))
        return sequences[:, :-1].contiguous(), sequences[:, 1:].contiguous()

    def next_batch(self, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The next `batch_size` training windows as LongTensors [batch_size, seq_length]; crosses epochs freely.

        Under data parallelism every rank draws the same global batch and keeps its own rows.
        """
        if batch_size < 1:
            raise DataError(f"batch size must be at least 1, got {batch_size}")
        windows = []
        while len(windows) < batch_size:
            take = min(batch_size - len(windows), self.num_windows - self._cursor)
            windows.extend(self._order[self._cursor:self._cursor + take])
            self._cursor += take
            if self._cursor == self.num_windows:
                self._epoch, self._cursor = self._epoch + 1, 0
                self._order = self._permutation()
        return self._batch(np.asarray(windows))

    def eval_batches(self, batch_size: int, num_batches: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The first `num_batches` x `batch_size` windows in order: the same batches on every call.

        A split too short for that many gives what it holds; then the last batch may be smaller.
        """
        if batch_size < 1 or num_batches < 1:
            raise DataError(f"eval batch size and count must be at least 1, got {batch_size} and {num_batches}")
        windows = np.arange(min(batch_size * num_batches, self.num_windows))
        return [self._batch(windows[start:start + batch_size]) for start in range(0, len(windows), batch_size)]

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self._epoch, "cursor": self._cursor, "seed": self._seed,
                "seq_length": self.seq_length, "num_windows": self.num_windows}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Restores the position (and the seed it was drawn with) from `state_dict()` of the same data."""
        if (state["seq_length"], state["num_windows"]) != (self.seq_length, self.num_windows):
            raise DataError(f"cannot resume {self.name} batches: the checkpoint saw {state['num_windows']} windows of "
                            f"{state['seq_length']} tokens, this data has {self.num_windows} of {self.seq_length}; "
                            "resume with the same data, split and --seq-length")
        self._seed, self._epoch, self._cursor = state["seed"], state["epoch"], state["cursor"]
        self._order = self._permutation()


def parse_split(split: str) -> tuple[float, float, float]:
    """Megatron-style "train,validation,test" weights, "98,2,0" or "98/2/0"; missing trailing weights are 0."""
    fix = (f"--split '{split}' must be up to three non-negative weights, train,validation,test with a positive "
           "train weight, like '98,2,0'")
    try:
        weights = [float(part) for part in split.replace("/", ",").split(",")]
    except ValueError:
        raise DataError(fix) from None
    if len(weights) > 3 or any(not math.isfinite(w) or w < 0 for w in weights) or weights[0] <= 0:
        raise DataError(fix)
    weights += [0.0] * (3 - len(weights))
    return weights[0], weights[1], weights[2]


def _file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while block := file.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def _prepared_in_cache(data_path: list[str] | None, tokenizer_options: dict, cache_dir: Path) -> IndexedDataset:
    """Tokenizes raw inputs (or the default corpus) once into cache_dir, keyed by their content and the settings.

    The key hashes the documents' source (the default corpus text, or each input file's bytes) and the
    tokenizer files' bytes, so an edited input never reuses stale ids.
    """
    if data_path is None:
        corpus = default_corpus()
        source = hashlib.sha256("\x00".join(corpus).encode("utf-8")).hexdigest()
        name, documents = "default-corpus", lambda: iter(corpus)
    else:
        source = [(file.suffix.lower(), _file_digest(file)) for file in input_files(data_path)]
        name, documents = "data", lambda: read_documents(data_path)
    tokenizer_files = [_file_digest(Path(file)) for file in (tokenizer_options["vocab_file"],
                                                             tokenizer_options["merge_file"])
                       if file is not None and Path(file).is_file()]
    key = json.dumps({"format": FORMAT_VERSION, "python": sys.version_info[:2], "source": source,
                      "tokenizer": tokenizer_options["kind"], "vocab_size": tokenizer_options["vocab_size"],
                      "tokenizer_files": tokenizer_files})
    prefix = cache_dir / f"{name}-{hashlib.sha256(key.encode()).hexdigest()[:16]}"
    if prepared_prefix(prefix) is None:
        texts = documents() if tokenizer_options["kind"] == "bpe" else None
        write_prepared(documents(), prefix, build_tokenizer(**tokenizer_options, texts=texts))
    return IndexedDataset(prefix)


def _open_dataset(data_path: list[str] | None, tokenizer_options: dict, cache_dir: Path) -> IndexedDataset:
    """A prepared prefix is used as is (its own tokenizer wins); anything else goes through the cache."""
    if data_path is not None:
        prefixes = [prepared_prefix(path) for path in data_path]
        if len(prefixes) == 1 and prefixes[0] is not None:
            return IndexedDataset(prefixes[0])
        if any(prefixes):
            raise DataError("give --data-path either one prepared prefix or raw .txt/.jsonl inputs; to combine "
                            "several, run moetrain prepare-data over all of them into one prefix")
    return _prepared_in_cache(data_path, tokenizer_options, cache_dir)


def _split_streams(dataset: IndexedDataset, weights: tuple[float, float, float],
                   seq_length: int) -> tuple[np.ndarray, np.ndarray | None]:
    """Train and validation token streams: contiguous document ranges by weight, Megatron style.

    Too few documents for a validation split of seq_length + 1 tokens: the tail of the whole token
    stream (its weight's share, at least seq_length + 1 tokens) is held out instead, with a warning.
    """
    fractions = np.cumsum(weights) / sum(weights)
    bounds = [0, *(round(fraction * dataset.num_documents) for fraction in fractions)]
    starts = dataset.offsets[bounds]
    train, validation = dataset.tokens[starts[0]:starts[1]], dataset.tokens[starts[1]:starts[2]]
    if weights[1] == 0:
        return train, None
    if len(validation) >= seq_length + 1:
        return train, validation
    held_out = max(math.ceil(len(dataset.tokens) * weights[1] / sum(weights)), seq_length + 1)
    if held_out + seq_length + 1 > len(dataset.tokens):
        raise DataError(f"the data has {len(dataset.tokens)} tokens, too few for a training and a validation "
                        f"split of seq_length + 1 = {seq_length + 1} tokens each; add data, lower "
                        "--seq-length, or use --split 100,0,0 (no validation)")
    warnings.warn(f"the validation split holds {bounds[2] - bounds[1]} of {dataset.num_documents} documents "
                  f"({len(validation)} tokens, fewer than seq_length + 1 = {seq_length + 1}); holding out the last "
                  f"{held_out} tokens of the token stream for validation instead", stacklevel=3)
    return dataset.tokens[:len(dataset.tokens) - held_out], dataset.tokens[len(dataset.tokens) - held_out:]


def load_training_data(data_path: Sequence[str] | str | None, *, tokenizer_type: str = "bpe",
                       vocab_file: str | None = None, merge_file: str | None = None, vocab_size: int = 4096,
                       seq_length: int,
                       split: str = "98,2,0", seed: int = 1234,
                       cache_dir: str | None = None) -> tuple[Tokenizer, TokenBatches, TokenBatches | None]:
    """Tokenizer, training batches and validation batches (None when the split gives validation no weight).

    `data_path` is None for the default corpus, one prepared prefix (PREFIX or PREFIX.bin; its saved
    tokenizer is used and the tokenizer options are ignored), or .txt/.jsonl files and directories.
    Anything not prepared is tokenized once and cached under `cache_dir` (default ~/.cache/moetrain).
    """
    weights = parse_split(split)
    tokenizer_options = {"kind": tokenizer_type, "vocab_file": vocab_file, "merge_file": merge_file,
                         "vocab_size": vocab_size}
    cache = Path(cache_dir) if cache_dir is not None else Path.home() / ".cache" / "moetrain"
    paths = [data_path] if isinstance(data_path, (str, os.PathLike)) else list(data_path or [])
    dataset = _open_dataset(paths or None, tokenizer_options, cache)
    train, validation = _split_streams(dataset, weights, seq_length)
    return (dataset.tokenizer,
            TokenBatches(train, seq_length, seed=seed, name="train"),
            TokenBatches(validation, seq_length, seed=seed, name="validation") if validation is not None else None)
