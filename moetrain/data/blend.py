"""Blended data (`--data-path 0.3 A 0.7 B`): each batch's sequences drawn from several prefixes by weight.

Megatron's BlendedDataset semantics: sample n goes to the source whose drawn share lags its weight most
(weight * max(n, 1) - drawn, ties to the first), so the blend is deterministic, needs no random numbers and
tracks the weights within one sequence at every point; each source walks its own seeded permutation.
The position is each source's position plus the counts drawn, so a resumed run continues exactly.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch

from moetrain.data.errors import DataError

if TYPE_CHECKING:
    from moetrain.data.loader import TokenBatches

ALL_ROWS, NO_ROWS = slice(None), slice(0, 0)  # rows of a batch to read: all of them, none (only advance)
_BLEND_FIX = "give --data-path as PREFIX ... or as WEIGHT PREFIX pairs, like '0.3 data/a 0.7 data/b'"


def _weight(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


def parse_blend(paths: Sequence[str]) -> tuple[list[str], list[float] | None]:
    """Megatron's --data-path list: paths alone (weights None) or WEIGHT PATH pairs (weights normalised)."""
    paths = [str(path) for path in paths]
    if len(paths) < 2 or _weight(paths[0]) is None or os.path.exists(paths[0]):
        return paths, None
    if len(paths) % 2:
        raise DataError(f"--data-path has {len(paths)} entries, an odd count for WEIGHT PREFIX pairs; {_BLEND_FIX}")
    weights = [_weight(text) for text in paths[0::2]]
    for text, weight in zip(paths[0::2], weights):
        if weight is None or not math.isfinite(weight) or weight <= 0:
            raise DataError(f"--data-path weight '{text}' is not a positive number; {_BLEND_FIX}")
    total = sum(weights)
    return paths[1::2], [weight / total for weight in weights]


def blend_assignment(weights: Sequence[float], drawn: Sequence[int], count: int) -> tuple[np.ndarray, np.ndarray]:
    """Sources of the next `count` samples after `drawn` per source, and the counts after them."""
    drawn, samples = [int(n) for n in drawn], int(sum(drawn))
    sources = []
    for sample in range(samples, samples + count):  # plain floats: a few sources, so faster than numpy here
        lags = [weight * max(sample, 1) - n for weight, n in zip(weights, drawn)]
        source = lags.index(max(lags))
        drawn[source] += 1
        sources.append(source)
    return np.asarray(sources, dtype=np.int64), np.asarray(drawn, dtype=np.int64)


class BlendedBatches:
    """Batches whose rows come from several TokenBatches in proportion to `weights`; TokenBatches' interface."""

    def __init__(self, sources: Sequence[TokenBatches], weights: Sequence[float]):
        if len({source.seq_length for source in sources}) != 1:
            raise DataError("every prefix of a blend must be cut at the same --seq-length")
        self.sources, self.weights = list(sources), list(weights)
        self.seq_length = self.sources[0].seq_length
        self._drawn = [0] * len(self.sources)

    @property
    def num_tokens(self) -> int:
        return sum(source.num_tokens for source in self.sources)

    @property
    def samples_drawn(self) -> int:
        """Training sequences the whole job has drawn so far: the global index of the next sample."""
        return sum(self._drawn)

    def _rows(self, sources: np.ndarray, windows: list[np.ndarray],
              rows: slice = ALL_ROWS) -> tuple[torch.Tensor, torch.Tensor]:
        """Assemble `rows` of a batch in sample order, reading only those: row i comes from sources[i], and
        each source's windows (one per row it feeds) are taken in turn."""
        kept = np.zeros(len(sources), dtype=bool)
        kept[rows] = True
        sequences = np.empty((int(kept.sum()), self.seq_length + 1), dtype=np.int64)
        for k, source in enumerate(self.sources):
            feeds = sources == k
            if (mine := kept[feeds]).any():
                sequences[feeds[kept]] = source.sequences(windows[k][mine])
        tensor = torch.from_numpy(sequences)
        return tensor[:, :-1].contiguous(), tensor[:, 1:].contiguous()

    def next_batch(self, batch_size: int, rows: slice = ALL_ROWS) -> tuple[torch.Tensor, torch.Tensor]:
        """As TokenBatches.next_batch: every rank advances every source by the whole batch, reads its `rows`."""
        if batch_size < 1:
            raise DataError(f"batch size must be at least 1, got {batch_size}")
        sources, drawn = blend_assignment(self.weights, self._drawn, batch_size)
        windows = [source.next_windows(int((sources == k).sum())) for k, source in enumerate(self.sources)]
        self._drawn = drawn.tolist()
        return self._rows(sources, windows, rows)

    def eval_batch_sizes(self, batch_size: int, num_batches: int) -> list[int]:
        """As TokenBatches.eval_batch_sizes; always `num_batches` of `batch_size` (a short source wraps round)."""
        if batch_size < 1 or num_batches < 1:
            raise DataError(f"eval batch size and count must be at least 1, got {batch_size} and {num_batches}")
        return [batch_size] * num_batches

    def eval_batches(self, batch_size: int, indices: Sequence[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """As TokenBatches.eval_batches: the same blend from the start, each source's windows in order
        (wrapping round a short source); batch i's rows are samples i * batch_size on."""
        samples = (max(indices, default=-1) + 1) * batch_size  # up to the end of the last batch asked for
        sources, _ = blend_assignment(self.weights, [0] * len(self.sources), samples)
        batches = []
        for start in (i * batch_size for i in indices):
            taken = np.bincount(sources[:start], minlength=len(self.sources))  # each source's windows before it
            chunk = sources[start:start + batch_size]
            windows = [(taken[k] + np.arange(np.count_nonzero(chunk == k))) % source.num_windows
                       for k, source in enumerate(self.sources)]
            batches.append(self._rows(chunk, windows))
        return batches

    def drawn(self) -> dict[str, int]:
        """Training sequences drawn so far, by source."""
        return {source.source: count for source, count in zip(self.sources, self._drawn)}

    def state_dict(self) -> dict:
        return {"blend": [source.state_dict() for source in self.sources], "drawn": list(self._drawn),
                "weights": list(self.weights)}

    def load_state_dict(self, state: dict) -> None:
        if "blend" not in state or len(state["blend"]) != len(self.sources) \
                or not np.allclose(state["weights"], self.weights):
            saw = f"weights {state['weights']}" if "blend" in state else "one prefix"
            raise DataError(f"cannot resume: the checkpoint's data was a blend with {saw}, this run's has weights "
                            f"{self.weights}; resume with the same --data-path")
        for source, source_state in zip(self.sources, state["blend"]):
            source.load_state_dict(source_state)
        self._drawn = list(state["drawn"])

