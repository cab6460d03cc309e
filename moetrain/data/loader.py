"""From data paths to resumable batches: resolve inputs to prepared datasets, split each, cut windows, blend."""

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

from moetrain.data.blend import ALL_ROWS, BlendedBatches, parse_blend
from moetrain.data.corpus import default_corpus, input_files, read_documents
from moetrain.data.errors import DataError
from moetrain.data.indexed import FORMAT_VERSION, IndexedDataset, prepared_prefix, write_prepared
from moetrain.data.megatron import MegatronDataset, is_megatron_index
from moetrain.data.tokenizer import Tokenizer, build_tokenizer, resolve_tokenizer_kind
from moetrain.filelock import PathLock


class TokenBatches:
    """(input_ids, target_ids) batches cut from one split's token stream, resumable to the exact batch.

    The stream is cut into non-overlapping windows of seq_length + 1 tokens (consecutive windows share
    one boundary token, so every token is a target exactly once per epoch). Training walks a permutation
    of the windows drawn from (seed, epoch); the position is just (epoch, cursor), so resuming is exact.
    """

    def __init__(self, tokens: np.ndarray, seq_length: int, *, seed: int = 1234, name: str = "train",
                 source: str | None = None, vocab_size: int | None = None, stream: int = 0):
        if seq_length < 1:
            raise DataError(f"--seq-length must be at least 1, got {seq_length}")
        if len(tokens) < seq_length + 1:
            raise DataError(f"{name} split has {len(tokens)} tokens, needs at least {seq_length + 1} "
                            "(seq_length + 1); add data or lower --seq-length")
        self.tokens = tokens
        self.seq_length = seq_length
        self.name = name
        self.source = source or name  # the file named in errors and in the drawn blend
        self.vocab_size = vocab_size
        self._stream = stream  # tells apart the prefixes of a blend, which share the seed
        self.num_windows = (len(tokens) - 1) // seq_length
        self._seed = seed
        self._epoch = 0
        self._cursor = 0
        self._order = self._permutation()

    @property
    def num_tokens(self) -> int:
        return len(self.tokens)

    @property
    def samples_drawn(self) -> int:
        """Training sequences the whole job has drawn so far: the global index of the next sample."""
        return self._epoch * self.num_windows + self._cursor

    def _permutation(self) -> np.ndarray:
        key = [self._seed, self._epoch] if self._stream == 0 else [self._seed, self._stream, self._epoch]
        return np.random.default_rng(key).permutation(self.num_windows)

    def sequences(self, windows: np.ndarray) -> np.ndarray:
        """Windows of seq_length + 1 ids as int64 [len(windows), seq_length + 1], each id checked against the
        vocabulary so that data from another tokenizer fails here instead of training silently on wrong ids."""
        positions = np.asarray(windows, dtype=np.int64)[:, None] * self.seq_length + np.arange(self.seq_length + 1)
        sequences = self.tokens[positions].astype(np.int64)
        if self.vocab_size is not None and sequences.size and \
                (sequences.max() >= self.vocab_size or sequences.min() < 0):
            bad = int(sequences.max() if sequences.max() >= self.vocab_size else sequences.min())
            raise DataError(f"'{self.source}' holds token id {bad}, outside the tokenizer's vocabulary of "
                            f"{self.vocab_size}; pass the tokenizer the data was prepared with (--tokenizer-type "
                            "and --vocab-file/--merge-file or --tokenizer-model)")
        return sequences

    def _batch(self, windows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        sequences = torch.from_numpy(self.sequences(windows))
        return sequences[:, :-1].contiguous(), sequences[:, 1:].contiguous()

    def next_windows(self, count: int) -> np.ndarray:
        """Indices of the next `count` training windows; crosses epochs freely."""
        windows = []
        while len(windows) < count:
            take = min(count - len(windows), self.num_windows - self._cursor)
            windows.extend(self._order[self._cursor:self._cursor + take])
            self._cursor += take
            if self._cursor == self.num_windows:
                self._epoch, self._cursor = self._epoch + 1, 0
                self._order = self._permutation()
        return np.asarray(windows, dtype=np.int64)

    def next_batch(self, batch_size: int, rows: slice = ALL_ROWS) -> tuple[torch.Tensor, torch.Tensor]:
        """The next `batch_size` training windows, of which only the contiguous `rows` are read from the
        dataset, as LongTensors [len(rows), seq_length]; crosses epochs freely.

        Under data parallelism every rank advances by the whole global batch (one sample order whatever
        the layout) and reads only its own rows; `NO_ROWS` reads nothing.
        """
        if batch_size < 1:
            raise DataError(f"batch size must be at least 1, got {batch_size}")
        return self._batch(self.next_windows(batch_size)[rows])

    def drawn(self) -> dict[str, int]:
        """Training sequences drawn so far, by source."""
        return {self.source: self.samples_drawn}

    def eval_batch_sizes(self, batch_size: int, num_batches: int) -> list[int]:
        """Rows of each evaluation batch, reading nothing: `num_batches` of `batch_size`. A split too short
        for that many windows gives what it holds; then the last batch may be smaller."""
        if batch_size < 1 or num_batches < 1:
            raise DataError(f"eval batch size and count must be at least 1, got {batch_size} and {num_batches}")
        windows = min(batch_size * num_batches, self.num_windows)
        return [min(batch_size, windows - start) for start in range(0, windows, batch_size)]

    def eval_batches(self, batch_size: int, indices: Sequence[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The evaluation batches at `indices` (of `eval_batch_sizes`), reading only those: batch i holds the
        windows from i * batch_size on, in order, so every call gives the same batches."""
        return [self._batch(np.arange(i * batch_size, min((i + 1) * batch_size, self.num_windows))) for i in indices]

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self._epoch, "cursor": self._cursor, "seed": self._seed,
                "seq_length": self.seq_length, "num_windows": self.num_windows}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Restores the position (and the seed it was drawn with) from `state_dict()` of the same data."""
        if "blend" in state:
            raise DataError(f"cannot resume {self.name} batches: the checkpoint's data was a blend of "
                            f"{len(state['blend'])} prefixes, this run has one; resume with the same --data-path")
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


Dataset = IndexedDataset | MegatronDataset


def _prepared_in_cache(data_path: list[str] | None, cache_dir: Path, tokenizer: Tokenizer | None, vocab_size: int,
                       text_key: str = "text") -> IndexedDataset:
    """Tokenizes raw inputs (or the default corpus) once into cache_dir, keyed by their content and the tokenizer.

    The key hashes the documents' source (the default corpus text, or each input file's bytes) and the
    tokenizer's JSON (or, for the BPE trained here when `tokenizer` is None, its vocabulary size), so an
    edited input or tokenizer never reuses stale ids.
    """
    if data_path is None:
        corpus = default_corpus()
        source = hashlib.sha256("\x00".join(corpus).encode("utf-8")).hexdigest()
        name, documents = "default-corpus", lambda: iter(corpus)
    else:
        source = [(file.suffix.lower(), _file_digest(file)) for file in input_files(data_path)]
        name, documents = "data", lambda: read_documents(data_path, text_key)
    trained = {"tokenizer": "bpe", "vocab_size": vocab_size}
    key = json.dumps({"format": FORMAT_VERSION, "python": sys.version_info[:2], "source": source, "text_key": text_key,
                      **(trained if tokenizer is None else
                         {"tokenizer": hashlib.sha256(tokenizer.to_json().encode("utf-8")).hexdigest()})})
    prefix = cache_dir / f"{name}-{hashlib.sha256(key.encode()).hexdigest()[:16]}"
    if prepared_prefix(prefix) is None:
        with _cache_writer(prefix):
            if prepared_prefix(prefix) is None:  # not written while this process waited for the lock
                write_prepared(documents(), prefix, tokenizer or build_tokenizer("bpe", texts=documents(),
                                                                                  vocab_size=vocab_size))
    return IndexedDataset(prefix)


def _cache_writer(prefix: Path) -> PathLock:
    """Held while this process writes a token cache: one writer per cache, however many ranks (or jobs)
    want it. The others wait on the lock file, not in a collective, so tokenizing a large input on one
    rank never runs into the process group's timeout; a killed writer's lock is taken over (its files
    are written to temporary names and renamed into place, .idx last, so a half-written cache is never
    read)."""
    prefix.parent.mkdir(parents=True, exist_ok=True)
    return PathLock(f"{prefix}.lock", name=f"the token cache '{prefix}'", advice="wait for it", timeout_s=math.inf,
                    on_wait=lambda refusal: print(f"waiting to tokenize: {refusal}", file=sys.stderr, flush=True))


def _open_prepared(prefix: str, named: Tokenizer | None) -> tuple[Dataset, Tokenizer]:
    """A moetrain prefix with its own tokenizer, or a Megatron prefix with the one the flags name (else the
    PREFIX.tokenizer.json that moetrain prepare-data leaves next to one)."""
    if not is_megatron_index(prefix + ".idx"):
        dataset = IndexedDataset(prefix)
        return dataset, dataset.tokenizer
    dataset = MegatronDataset(prefix)
    saved = Path(prefix + ".tokenizer.json")
    if named is None and not saved.is_file():
        raise DataError(f"Megatron prefix '{prefix}' holds token ids without their tokenizer; name the one it was "
                        "made with: --tokenizer-type GPT2BPETokenizer --vocab-file vocab.json --merge-file merges.txt, "
                        "HuggingFaceTokenizer --tokenizer-model DIR, or SentencePieceTokenizer --tokenizer-model FILE")
    return dataset, named or Tokenizer.load(saved)


def _open_sources(paths: list[str] | None, tokenizer_options: dict, cache_dir: Path,
                  text_key: str) -> tuple[list[Dataset], list[float] | None, Tokenizer]:
    """The datasets of a --data-path list, their blend weights (None: in proportion to size) and their tokenizer.

    Raw inputs alone become one cached dataset, as before blends existed; prepared prefixes (either format)
    are used as they are, and raw inputs next to them are tokenized with their tokenizer. Every source of a
    blend must share one tokenizer, or the ids would mean different things.
    """
    options = dict(tokenizer_options)
    kind, vocab_size = options.pop("kind"), options.pop("vocab_size")
    named = None if kind == "bpe" else build_tokenizer(kind, **options)
    paths, weights = parse_blend(paths) if paths else (None, None)
    prefixes = [prepared_prefix(path) for path in paths or []]
    if not any(prefixes) and weights is None:
        dataset = _prepared_in_cache(paths, cache_dir, named, vocab_size, text_key)
        return [dataset], None, dataset.tokenizer
    opened = {prefix: _open_prepared(prefix, named) for prefix in prefixes if prefix is not None}
    tokenizers = {prefix: tokenizer for prefix, (_, tokenizer) in opened.items()}
    tokenizer = next(iter(tokenizers.values()), named)
    if tokenizer is None:
        raise DataError("a weighted blend of raw inputs needs one tokenizer for all of them: pass --tokenizer-type "
                        "(byte, gpt2, ...), or prepare them first with moetrain prepare-data")
    for prefix, other in tokenizers.items():
        if other.to_json() != tokenizer.to_json():
            raise DataError(f"the prefixes '{next(iter(tokenizers))}' and '{prefix}' were tokenized differently; a "
                            "blend needs one tokenizer: prepare them again with the same one")
    datasets = [opened[prefix][0] if prefix is not None else
                _prepared_in_cache([path], cache_dir, tokenizer, vocab_size, text_key)
                for path, prefix in zip(paths, prefixes)]
    return datasets, weights, tokenizer


def _split_streams(dataset: Dataset, weights: tuple[float, float, float],
                   seq_length: int) -> tuple[np.ndarray, np.ndarray | None]:
    """Train and validation token streams: contiguous document ranges by weight, Megatron style.

    Too few documents for a validation split of seq_length + 1 tokens: the tail of the whole token
    stream (its weight's share, at least seq_length + 1 tokens) is held out instead, with a warning.
    """
    fractions = np.cumsum(weights) / sum(weights)
    bounds = [0, *(round(fraction * dataset.num_documents) for fraction in fractions)]
    starts = dataset.document_starts(bounds)
    train, validation = dataset.tokens[starts[0]:starts[1]], dataset.tokens[starts[1]:starts[2]]
    if weights[1] == 0:
        return train, None
    if len(validation) >= seq_length + 1:
        return train, validation
    held_out = max(math.ceil(len(dataset.tokens) * weights[1] / sum(weights)), seq_length + 1)
    if held_out + seq_length + 1 > len(dataset.tokens):
        raise DataError(f"'{dataset.prefix}' has {len(dataset.tokens)} tokens, too few for a training and a "
                        f"validation split of seq_length + 1 = {seq_length + 1} tokens each; add data, lower "
                        "--seq-length, or use --split 100,0,0 (no validation)")
    warnings.warn(f"the validation split of '{dataset.prefix}' holds {bounds[2] - bounds[1]} of "
                  f"{dataset.num_documents} documents ({len(validation)} tokens, fewer than seq_length + 1 = "
                  f"{seq_length + 1}); holding out the last {held_out} tokens of the token stream for validation "
                  "instead", stacklevel=4)
    return dataset.tokens[:len(dataset.tokens) - held_out], dataset.tokens[len(dataset.tokens) - held_out:]


def _batches(streams: list[np.ndarray], datasets: list[Dataset], weights: list[float] | None, name: str, *,
             seq_length: int, seed: int, vocab_size: int) -> TokenBatches | BlendedBatches:
    """One source: its TokenBatches; several: their blend, by `weights` or else in proportion to their tokens."""
    if len(streams) == 1:
        return TokenBatches(streams[0], seq_length, seed=seed, name=name, source=datasets[0].prefix,
                            vocab_size=vocab_size)
    sources = [TokenBatches(stream, seq_length, seed=seed, name=f"{name} split of '{dataset.prefix}'",
                            source=dataset.prefix, vocab_size=vocab_size, stream=k + 1)
               for k, (stream, dataset) in enumerate(zip(streams, datasets))]
    if weights is None:
        weights = [len(stream) / sum(map(len, streams)) for stream in streams]
    return BlendedBatches(sources, weights)


def _as_list(paths: Sequence[str] | str | None) -> list[str] | None:
    return ([str(paths)] if isinstance(paths, (str, os.PathLike)) else [str(p) for p in paths]) if paths else None


def load_training_data(data_path: Sequence[str] | str | None, *, tokenizer_type: str | None = None,
                       vocab_file: str | None = None, merge_file: str | None = None,
                       tokenizer_model: str | None = None, vocab_size: int = 4096, seq_length: int,
                       split: str = "98,2,0", seed: int = 1234, cache_dir: str | None = None, text_key: str = "text",
                       train_data_path: Sequence[str] | None = None, valid_data_path: Sequence[str] | None = None,
                       ) -> tuple[Tokenizer, TokenBatches | BlendedBatches, TokenBatches | BlendedBatches | None]:
    """Tokenizer, training batches and validation batches (None when nothing is held out for validation).

    `data_path` is None for the default corpus, or Megatron's list: paths, or WEIGHT PATH pairs (a blend,
    each prefix split by `split` on its own). A path is a prepared prefix (moetrain's, whose saved tokenizer
    wins, or Megatron's MMIDIDX, read with the tokenizer the options name), or raw inputs (.txt, .jsonl,
    .parquet, .arrow, a datasets.save_to_disk directory), tokenized once and cached under `cache_dir`
    (default ~/.cache/moetrain). `train_data_path` / `valid_data_path` instead give each split its own
    list, used whole.
    """
    weights = parse_split(split)
    tokenizer_options = {"kind": resolve_tokenizer_kind(tokenizer_type, vocab_file, merge_file),
                         "vocab_file": vocab_file, "merge_file": merge_file, "tokenizer_model": tokenizer_model,
                         "vocab_size": vocab_size}
    cache = Path(cache_dir) if cache_dir is not None else Path.home() / ".cache" / "moetrain"
    batches = {"seq_length": seq_length, "seed": seed}
    data_path, train_data_path, valid_data_path = map(_as_list, (data_path, train_data_path, valid_data_path))
    if train_data_path is None:
        if valid_data_path is not None:
            raise DataError("--valid-data-path goes with --train-data-path; give both, or --data-path with --split")
        datasets, blend, tokenizer = _open_sources(data_path, tokenizer_options, cache, text_key)
        streams = [_split_streams(dataset, weights, seq_length) for dataset in datasets]
        batches["vocab_size"] = tokenizer.vocab_size
        train = _batches([train for train, _ in streams], datasets, blend, "train", **batches)
        has_validation = streams[0][1] is not None
        validation = _batches([valid for _, valid in streams], datasets, blend, "validation",
                              **batches) if has_validation else None
        return tokenizer, train, validation
    if data_path is not None:
        raise DataError("give --data-path (split by --split) or --train-data-path/--valid-data-path, not both")
    datasets, blend, tokenizer = _open_sources(train_data_path, tokenizer_options, cache, text_key)
    batches["vocab_size"] = tokenizer.vocab_size
    train = _batches([dataset.tokens for dataset in datasets], datasets, blend, "train", **batches)
    if valid_data_path is None:
        return tokenizer, train, None
    valid_sets, valid_blend, valid_tokenizer = _open_sources(valid_data_path, tokenizer_options, cache, text_key)
    if valid_tokenizer.to_json() != tokenizer.to_json():
        raise DataError("--valid-data-path was tokenized differently from --train-data-path; prepare both with the "
                        "same tokenizer")
    return tokenizer, train, _batches([dataset.tokens for dataset in valid_sets], valid_sets, valid_blend,
                                      "validation", **batches)
