"""Megatron's indexed dataset (`MMIDIDX`), read memory-mapped and written, so Megatron corpora load unchanged.

PREFIX.idx  b"MMIDIDX\\x00\\x00", version <Q (1), dtype code <B, sequence count S <Q, document count D <Q,
            then S int32 sequence lengths, S int64 byte pointers into .bin, D int64 document indices
            (document i is sequences document_indices[i] .. document_indices[i+1]; the first entry is 0).
            Megatron-LM's multimodal datasets append S int8 sequence modes.
PREFIX.bin  the sequences' token ids back to back, in the dtype the code names.

The ids carry no tokenizer: it comes from --tokenizer-type and its files, as in Megatron.
"""

import os
import struct
from collections.abc import Iterable
from pathlib import Path
from typing import BinaryIO

import numpy as np

from moetrain.data.errors import DataError

MAGIC = b"MMIDIDX\x00\x00"
VERSION = 1
_HEADER = struct.Struct("<9sQBQQ")
# Megatron's dtype codes. 6 and 7 are floats (Megatron-LM reads 7 as float32, Megatron-DeepSpeed as
# float64): no tokenizer writes them, so they are refused rather than guessed.
DTYPES = {1: np.dtype("u1"), 2: np.dtype("i1"), 3: np.dtype("<i2"), 4: np.dtype("<i4"), 5: np.dtype("<i8"),
          8: np.dtype("<u2")}
_FLOAT_CODES = (6, 7)
_CHECK_CHUNK = 1 << 20  # sequences validated per step: bounded memory for any index size


def is_megatron_index(idx_file: str | os.PathLike) -> bool:
    with open(idx_file, "rb") as index:
        return index.read(len(MAGIC)) == MAGIC


def _check_pointers(lengths: np.ndarray, pointers: np.ndarray, itemsize: int, idx_file: Path) -> int:
    """Pointers must tile .bin contiguously from 0 (as every Megatron writer lays them); returns the bytes used."""
    position = 0
    for start in range(0, len(lengths), _CHECK_CHUNK):
        sizes = lengths[start:start + _CHECK_CHUNK].astype(np.int64) * itemsize
        if sizes.size and sizes.min() < 0:
            raise DataError(f"index file '{idx_file}' has a negative sequence length; the file is corrupt, "
                            "re-run Megatron's preprocess_data.py or moetrain prepare-data")
        expected = position + np.concatenate([[0], np.cumsum(sizes[:-1])])
        if not np.array_equal(pointers[start:start + _CHECK_CHUNK], expected):
            raise DataError(f"index file '{idx_file}' has sequence pointers that do not follow its lengths "
                            "(corrupt, or not written by Megatron); re-run preprocessing")
        position += int(sizes.sum())
    return position


class MegatronDataset:
    """A Megatron `MMIDIDX` prefix, memory-mapped: opening it reads the index arrays only, never the tokens."""

    def __init__(self, prefix: str | os.PathLike):
        self.prefix = str(prefix)
        self.bin_file, self.idx_file = Path(self.prefix + ".bin"), Path(self.prefix + ".idx")
        redo = "re-run Megatron's preprocess_data.py (or moetrain prepare-data --output-format megatron)"
        for file in (self.idx_file, self.bin_file):
            if not file.is_file():
                raise DataError(f"Megatron data file '{file}' not found; {redo}")
        idx_size = self.idx_file.stat().st_size
        if idx_size < _HEADER.size:
            raise DataError(f"index file '{self.idx_file}' is truncated ({idx_size} bytes); {redo}")
        with open(self.idx_file, "rb") as index:
            magic, version, code, num_sequences, num_indices = _HEADER.unpack(index.read(_HEADER.size))
        if magic != MAGIC:
            raise DataError(f"'{self.idx_file}' is not a Megatron index file (bad magic {magic!r}); {redo}")
        if version != VERSION:
            raise DataError(f"index file '{self.idx_file}' has version {version}; Megatron's format is version "
                            f"{VERSION}; {redo}")
        if code in _FLOAT_CODES:
            raise DataError(f"index file '{self.idx_file}' stores floating-point values (dtype code {code}), not "
                            f"token ids; {redo} with a tokenizer")
        if code not in DTYPES:
            raise DataError(f"index file '{self.idx_file}' has unknown dtype code {code} (Megatron's are 1-8); "
                            f"{redo}")
        self.dtype = DTYPES[code]
        expected = _HEADER.size + num_sequences * 12 + num_indices * 8
        if idx_size == expected + num_sequences and num_sequences:
            raise DataError(f"index file '{self.idx_file}' is a multimodal dataset (it has sequence modes); "
                            "moetrain trains on text only: give a text-only prefix")
        if idx_size != expected:
            raise DataError(f"index file '{self.idx_file}' is truncated or corrupt ({idx_size} bytes, its header "
                            f"implies {expected}); {redo}")
        self.sequence_lengths = np.memmap(self.idx_file, np.dtype("<i4"), "r", _HEADER.size, (num_sequences,))
        self.sequence_pointers = np.memmap(self.idx_file, np.dtype("<i8"), "r", _HEADER.size + num_sequences * 4,
                                           (num_sequences,))
        self.document_indices = np.memmap(self.idx_file, np.dtype("<i8"), "r", _HEADER.size + num_sequences * 12,
                                          (num_indices,))
        if num_indices < 2 or self.document_indices[0] != 0 or self.document_indices[-1] != num_sequences \
                or np.any(np.diff(self.document_indices) < 0):
            raise DataError(f"index file '{self.idx_file}' has corrupt document indices (they must rise from 0 to "
                            f"the sequence count {num_sequences}); {redo}")
        used = _check_pointers(self.sequence_lengths, self.sequence_pointers, self.dtype.itemsize, self.idx_file)
        bin_size = self.bin_file.stat().st_size
        if bin_size != used:
            state = "is truncated" if bin_size < used else "is longer than its index says"
            raise DataError(f"token file '{self.bin_file}' {state} ({bin_size} bytes, '{self.idx_file}' points to "
                            f"{used}); the .bin and .idx are from different runs, {redo}")
        if used == 0:
            raise DataError(f"Megatron prefix '{self.prefix}' holds no tokens; {redo} from non-empty inputs")
        self.tokens = np.memmap(self.bin_file, self.dtype, "r", shape=(used // self.dtype.itemsize,))

    @property
    def num_documents(self) -> int:
        return len(self.document_indices) - 1

    def document_starts(self, documents: Iterable[int]) -> np.ndarray:
        """Token offset where each document begins; `num_documents` gives the end of the token stream."""
        sequences = self.document_indices[np.asarray(list(documents), dtype=np.int64)]
        ends = np.full(len(sequences), len(self.tokens), dtype=np.int64)
        inside = sequences < len(self.sequence_pointers)
        ends[inside] = self.sequence_pointers[sequences[inside]] // self.dtype.itemsize
        return ends

    def document(self, index: int) -> np.ndarray:
        start, end = self.document_starts([index, index + 1])
        return self.tokens[start:end]


def megatron_dtype(vocab_size: int) -> np.dtype:
    """Megatron's choice: uint16 below 65500 ids, int32 above."""
    return DTYPES[8] if vocab_size < 65500 else DTYPES[4]


def write_megatron_index(out: BinaryIO, dtype: np.dtype, document_lengths: np.ndarray) -> None:
    """The .idx of one sequence per document (preprocess_data.py without --split-sentences)."""
    code = next(code for code, known in DTYPES.items() if known == dtype)
    lengths = np.asarray(document_lengths, dtype=np.int64)
    pointers = np.concatenate([[0], np.cumsum(lengths[:-1])]) * dtype.itemsize
    out.write(_HEADER.pack(MAGIC, VERSION, code, len(lengths), len(lengths) + 1))
    out.write(lengths.astype("<i4").tobytes())
    out.write(pointers.astype("<i8").tobytes())
    out.write(np.arange(len(lengths) + 1, dtype="<i8").tobytes())
