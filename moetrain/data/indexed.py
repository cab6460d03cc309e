"""Tokenize once, train many times: the prepared PREFIX.bin / PREFIX.idx format (Megatron's idea), memory-mapped.

PREFIX.bin  token ids, little-endian uint16 (vocab < 65536) or uint32, each document followed by eos.
PREFIX.idx  header `<8sIIQQ` (magic, version, dtype code, vocab size, number of documents), then
            number of documents + 1 little-endian int64 token offsets: document i is bin[offsets[i]:offsets[i+1]].
PREFIX.tokenizer.json  the tokenizer that produced the ids.
"""

import os
import struct
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import BinaryIO

import numpy as np

from moetrain.data.corpus import DataPaths, read_documents
from moetrain.data.encode import write_token_ids
from moetrain.data.errors import DataError
from moetrain.data.megatron import MegatronDataset, is_megatron_index, megatron_dtype, write_megatron_index
from moetrain.data.tokenizer import Tokenizer

MAGIC = b"MOETIDX\x00"
FORMAT_VERSION = 1
_HEADER = struct.Struct("<8sIIQQ")
_DTYPES = {1: np.dtype("<u2"), 2: np.dtype("<u4")}
_OFFSET_DTYPE = np.dtype("<i8")


def _dtype_code(vocab_size: int) -> int:
    """The narrowest id type that holds every id: uint16 halves disk and page cache for small vocabularies."""
    return 1 if vocab_size < 2**16 else 2


def _files(prefix: str) -> tuple[Path, Path, Path]:
    return Path(prefix + ".bin"), Path(prefix + ".idx"), Path(prefix + ".tokenizer.json")


def prepared_prefix(path: str | os.PathLike) -> str | None:
    """PREFIX when `path` names a prepared dataset (PREFIX, PREFIX.bin or PREFIX.idx), else None."""
    path = str(path)
    for prefix in (path, path.removesuffix(".bin"), path.removesuffix(".idx")):
        bin_file, idx_file, _ = _files(prefix)
        if bin_file.is_file() and idx_file.is_file():
            return prefix
    return None


def _write_atomically(path: Path, write) -> None:
    """Writes through a temporary file and renames it, so a crash or a concurrent writer never leaves half a file."""
    temporary = path.with_name(f"{path.name}.tmp{os.getpid()}")
    try:
        with open(temporary, "wb") as out:
            write(out)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def write_prepared(documents: Iterable[str], output_prefix: str | os.PathLike, tokenizer: Tokenizer, *,
                   workers: int | None = None) -> None:
    """Tokenizes `documents` once into PREFIX.bin/.idx/.tokenizer.json, an eos after every document."""
    dtype_code = _dtype_code(tokenizer.vocab_size)

    def write_index(out, lengths: np.ndarray) -> None:
        offsets = np.concatenate([[0], np.cumsum(lengths)])
        out.write(_HEADER.pack(MAGIC, FORMAT_VERSION, dtype_code, tokenizer.vocab_size, len(offsets) - 1))
        out.write(offsets.astype(_OFFSET_DTYPE).tobytes())

    _write_dataset(documents, str(output_prefix), tokenizer, _DTYPES[dtype_code], write_index, append_eos=True,
                   workers=workers)


def write_megatron(documents: Iterable[str], output_prefix: str | os.PathLike, tokenizer: Tokenizer, *,
                   append_eod: bool = False, workers: int | None = None) -> None:
    """Tokenizes `documents` into Megatron's PREFIX.bin/.idx (one sequence per document, uint16 or int32 ids as
    Megatron picks them), loadable by Megatron-LM and Megatron-DeepSpeed; PREFIX.tokenizer.json rides along
    for moetrain."""
    dtype = megatron_dtype(tokenizer.vocab_size)
    _write_dataset(documents, str(output_prefix), tokenizer, dtype,
                   lambda out, lengths: write_megatron_index(out, dtype, lengths), append_eos=append_eod,
                   workers=workers)


def _write_dataset(documents: Iterable[str], prefix: str, tokenizer: Tokenizer, dtype: np.dtype,
                   write_index: Callable[[BinaryIO, np.ndarray], object], *, append_eos: bool, workers: int) -> None:
    """PREFIX.bin (the ids), PREFIX.tokenizer.json, then PREFIX.idx from the document lengths, each written
    atomically; the .idx comes last, so its presence means the dataset is complete."""
    bin_file, idx_file, tokenizer_file = _files(prefix)
    bin_file.parent.mkdir(parents=True, exist_ok=True)
    lengths = []

    def write_tokens(out) -> None:
        lengths.append(write_token_ids(out, documents, tokenizer, dtype, append_eos=append_eos, workers=workers))
        if not lengths[0].sum():
            raise DataError(f"no tokens to write to '{prefix}'; give non-empty inputs")

    _write_atomically(bin_file, write_tokens)
    _write_atomically(tokenizer_file, lambda out: out.write(tokenizer.to_json().encode("utf-8")))
    _write_atomically(idx_file, lambda out: write_index(out, lengths[0]))


def prepare_data(inputs: DataPaths, output_prefix: str | os.PathLike, tokenizer: Tokenizer) -> None:
    """Tokenizes .txt/.jsonl files or directories into the prepared format at `output_prefix`."""
    write_prepared(read_documents(inputs), output_prefix, tokenizer)


class IndexedDataset:
    """A prepared dataset, memory-mapped: opening it costs nothing beyond one validating pass over the ids."""

    def __init__(self, prefix: str | os.PathLike):
        self.prefix = prepared_prefix(prefix) or str(prefix)
        bin_file, idx_file, tokenizer_file = _files(self.prefix)
        for file in (idx_file, bin_file, tokenizer_file):
            if not file.is_file():
                raise DataError(f"prepared data file '{file}' not found; create it with "
                                f"`moetrain prepare-data --input ... --output-prefix {self.prefix}`")
        redo = "re-create it with moetrain prepare-data"

        idx_size = idx_file.stat().st_size
        if idx_size < _HEADER.size:
            raise DataError(f"index file '{idx_file}' is truncated ({idx_size} bytes); {redo}")
        with open(idx_file, "rb") as index:
            magic, version, dtype_code, vocab_size, num_documents = _HEADER.unpack(index.read(_HEADER.size))
        if magic != MAGIC:
            raise DataError(f"'{idx_file}' is not a moetrain index file (bad magic {magic!r}); {redo}")
        if version != FORMAT_VERSION:
            raise DataError(f"index file '{idx_file}' has format version {version}, this moetrain reads "
                            f"version {FORMAT_VERSION}; {redo}")
        if dtype_code not in _DTYPES:
            raise DataError(f"index file '{idx_file}' has unknown token dtype code {dtype_code}; {redo}")
        if num_documents == 0:
            raise DataError(f"index file '{idx_file}' lists no documents; {redo} from non-empty inputs")
        expected_size = _HEADER.size + (num_documents + 1) * _OFFSET_DTYPE.itemsize
        if idx_size != expected_size:
            raise DataError(f"index file '{idx_file}' is truncated or corrupt ({idx_size} bytes, header implies "
                            f"{expected_size}); {redo}")
        self.offsets = np.memmap(idx_file, dtype=_OFFSET_DTYPE, mode="r", offset=_HEADER.size,
                                 shape=(num_documents + 1,))
        if self.offsets[0] != 0 or np.any(np.diff(self.offsets) <= 0):  # every document has at least its eos
            raise DataError(f"index file '{idx_file}' has corrupt document offsets; {redo}")

        dtype = _DTYPES[dtype_code]
        num_tokens = int(self.offsets[-1])
        bin_size = bin_file.stat().st_size
        if bin_size != num_tokens * dtype.itemsize:
            raise DataError(f"token file '{bin_file}' has {bin_size // dtype.itemsize} tokens but its index lists "
                            f"{num_tokens} (truncated or from another run); {redo}")
        self.tokens = np.memmap(bin_file, dtype=dtype, mode="r", shape=(num_tokens,))

        self.tokenizer = Tokenizer.load(tokenizer_file)
        self.vocab_size: int = vocab_size
        if self.tokenizer.vocab_size != vocab_size:
            raise DataError(f"tokenizer '{tokenizer_file}' has {self.tokenizer.vocab_size} tokens but index "
                            f"'{idx_file}' was written for {vocab_size}; {redo}")
        largest = int(self.tokens.max())
        if largest >= vocab_size:
            raise DataError(f"token file '{bin_file}' holds token id {largest}, outside the tokenizer's vocab size "
                            f"{vocab_size} (prepared with another tokenizer?); {redo}")

    @property
    def num_documents(self) -> int:
        return len(self.offsets) - 1

    def document_starts(self, documents: Iterable[int]) -> np.ndarray:
        """Token offset where each document begins; `num_documents` gives the end of the token stream."""
        return np.asarray(self.offsets[np.asarray(list(documents), dtype=np.int64)])

    def document(self, index: int) -> np.ndarray:
        """Token ids of document `index`, ending with its eos."""
        if not 0 <= index < self.num_documents:
            raise IndexError(f"document {index} out of range; '{self.prefix}' has {self.num_documents} documents")
        return self.tokens[self.offsets[index]:self.offsets[index + 1]]


def open_prefix(prefix: str | os.PathLike) -> "IndexedDataset | MegatronDataset":
    """A prepared prefix of either format, told apart by the magic at the start of its .idx file."""
    idx_file = Path(str(prefix) + ".idx")
    return MegatronDataset(prefix) if idx_file.is_file() and is_megatron_index(idx_file) else IndexedDataset(prefix)
