"""Routing noise: torch's RNG (DeepSpeed's exact draws) or values keyed by where a token is.

A standalone MoE layer draws its routing noise (second-expert Gumbel noise, RTS scores, Jitter,
RSample) from torch's RNG in DeepSpeed's order, so seeded runs match DeepSpeed draw for draw. That
stream depends on the layout: each data-parallel rank and each micro-batch draws its own. Training
instead passes a *routing key* (`routing_key`): every draw is then a stateless hash of (seed,
iteration, layer, stream, global token position, column), so any DP / EP / TP / PP layout and any
micro-batch split routes each token exactly as one process does, and a recomputed forward draws the
same values for free. The hash is integer tensor arithmetic on the tokens' device: no host sync, no
generator state, and it compiles into the graph.

Keys are 32-bit: integers stay in [0, 2^32) inside int64 tensors and every product stays below 2^63,
so nothing overflows on any backend. Global positions must stay below 2^32 (tokens in one global batch).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

MASK32 = 0xFFFFFFFF
# what a draw is for: separate streams, so one layer's RTS scores and input jitter are unrelated
JITTER, RTS, GUMBEL = 1, 2, 3
_TRAIN, _EVAL = 0, 1
_TEACHER = 0x5EAC4E12  # folded into a student's key for its distillation teacher


def f32(value: float) -> float:
    """The float32 nearest to `value` (ties to even), as a Python float: float32 arithmetic on the
    host in plain Python, which torch.compile folds into constants."""
    if value == 0 or not math.isfinite(value):
        return value
    mantissa, exponent = math.frexp(value)
    return math.ldexp(round(mantissa * 2 ** 24), exponent - 24)


def _mul32(x, constant: int):
    """x * constant mod 2^32 for x in [0, 2^32), in two 16-bit halves of the constant so that no
    product reaches 2^63 (a Python int or an int64 tensor alike)."""
    low, high = constant & 0xFFFF, constant >> 16
    return (x * low + (((x * high) & 0xFFFF) << 16)) & MASK32


def mix32(x):
    """A bijective 32-bit integer hash with full avalanche (Wellons' 'lowbias32' constants), on a
    Python int or an int64 tensor of values in [0, 2^32)."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def _combine(*parts: int) -> int:
    """One 32-bit key from integers of any size (each folded to 32 bits, then chained through mix32)."""
    key = 0
    for part in parts:
        part &= (1 << 64) - 1  # negative ints as their 64-bit pattern
        key = mix32(key ^ mix32((part ^ (part >> 32)) & MASK32))
    return key


def routing_key(seed: int, iteration: int, first_sample: int, device: torch.device | str,
                *, training: bool = True) -> Tensor:
    """The int64 [2] tensor a model forward takes to draw keyed routing noise: the hash of (seed,
    iteration, train or eval) and the global index of the forward's first sample in its step's
    global batch (its rows are that sample and the ones after it). To a GPU from pinned memory without
    blocking: a pageable copy would make the host wait for the work already queued."""
    step = _combine(seed, iteration, _TRAIN if training else _EVAL)
    key = torch.tensor([step, first_sample], dtype=torch.long)
    if torch.device(device).type == "cuda":
        return key.pin_memory().to(device, non_blocking=True)
    return key.to(device)


def teacher_routing_key(key: Tensor) -> Tensor:
    """A distillation teacher's key for the student forward keyed by `key`: the same token positions,
    draws unrelated to the student's (its layer indices repeat the student's)."""
    return torch.stack([mix32(key[0] ^ _TEACHER), key[1]])


def first_sample(micro_batch: int, micro_batch_size: int, dp_rank: int, dp: int) -> int:
    """Global index of the first row a data-parallel rank's `micro_batch`-th micro-batch holds: each
    micro-batch of the step is a global micro-batch of `micro_batch_size * dp` rows, rank r's rows
    start at r * micro_batch_size."""
    return (micro_batch * dp + dp_rank) * micro_batch_size


def uniform_from_bits(bits: Tensor) -> Tensor:
    """32-bit hashes -> float32 in (0, 1): the top 23 bits m as (2m + 1) / 2^24, exact in float32,
    never 0 or 1 (so log(u) and log(-log(u)) are finite)."""
    return ((bits >> 9) * 2 + 1).to(torch.float32) * 2.0 ** -24


class RoutingNoise:
    """Torch's RNG, drawn as DeepSpeed draws (torch.distributions.Uniform / Gumbel): the mode of a
    layer used without a routing key."""

    keyed = False

    def uniform(self, shape: torch.Size, low: float, high: float, device: torch.device, stream: int) -> Tensor:
        """U[low, high) of `shape` ([tokens, columns]); `stream` says what the draw is for."""
        scale = f32(f32(high) - f32(low))
        return torch.rand(shape, device=device).mul_(scale).add_(f32(low))

    def gumbel(self, shape: torch.Size, device: torch.device, stream: int = GUMBEL) -> Tensor:
        """Standard Gumbel noise of `shape`, as torch.distributions.Gumbel(0, 1) draws it."""
        finfo = torch.finfo(torch.float32)
        uniform = self.uniform(shape, finfo.tiny, 1 - finfo.eps, device, stream)
        return uniform.log_().neg_().log_().neg_()


TORCH_NOISE = RoutingNoise()


class KeyedNoise(RoutingNoise):
    """Noise for the rows of one forward: row s is the token at global position
    `key[1] * seq_len + s`; its draw in column j hashes (key[0], layer, stream, position, j)."""

    keyed = True

    def __init__(self, key: Tensor, layer: int, seq_len: int) -> None:
        self.key, self.layer, self.seq_len = key, layer, seq_len

    def first_position(self) -> Tensor:
        """0-d int64: the global position of the forward's first token (its rows follow it)."""
        return self.key[1] * self.seq_len

    def bits(self, shape: torch.Size, device: torch.device, stream: int) -> Tensor:
        """[tokens, columns] int64 hashes in [0, 2^32)."""
        rows, cols = shape
        key = self.key.to(device)
        base = mix32(key[0] ^ _combine(self.layer, stream))
        positions = key[1] * self.seq_len + torch.arange(rows, device=device)
        per_token = mix32(base ^ (positions & MASK32))
        per_column = mix32(torch.arange(cols, device=device) + 0x9E3779B9)
        return mix32(per_token.unsqueeze(1) ^ per_column)

    def uniform(self, shape: torch.Size, low: float, high: float, device: torch.device, stream: int) -> Tensor:
        scale = f32(f32(high) - f32(low))
        return uniform_from_bits(self.bits(shape, device, stream)).mul_(scale).add_(f32(low))

    def gumbel(self, shape: torch.Size, device: torch.device, stream: int = GUMBEL) -> Tensor:
        return uniform_from_bits(self.bits(shape, device, stream)).log_().neg_().log_().neg_()


def noise_for(key: Tensor | None, layer: int, seq_len: int) -> RoutingNoise:
    """Keyed noise for a forward given a routing key, else torch's RNG (the DeepSpeed-exact mode)."""
    return TORCH_NOISE if key is None else KeyedNoise(key, layer, seq_len)
