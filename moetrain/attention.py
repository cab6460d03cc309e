"""Causal self-attention: grouped-query heads, QK-norm, RoPE over all or part of each head.

One module for every layout the open MoE models use: Llama/Mixtral (one key/value head per query head or
grouped), Qwen3 and GLM-4.5 (RMSNorm of each query and key head), OLMoE (RMSNorm over the whole query and
key projections), GLM-4.5 (RoPE over the first half of each head only).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from moetrain.norm import RMSNorm

if TYPE_CHECKING:
    from moetrain.config import ModelConfig


def rope_tables(cfg: ModelConfig, rotary_dim: int) -> tuple[Tensor, Tensor]:
    """cos and signed sin of the rotary angles over the rotated dimensions, [positions, rotary_dim]: (cos, cos)
    and (-sin, sin) per (first half, second half), so apply_rope is two full-width products instead of four
    half-width ones. With --rope-scaling the frequencies are stretched and the tables scaled (yarn)."""
    inv_freq, magnitude = rope_frequencies(cfg, rotary_dim)
    angles = torch.outer(torch.arange(cfg.positions(), dtype=torch.float32), inv_freq)
    cos, sin = angles.cos() * magnitude, angles.sin() * magnitude
    return torch.cat([cos, cos], dim=-1), torch.cat([-sin, sin], dim=-1)


def yarn_mscale(factor: float, coefficient: float | None = 1.0) -> float:
    """YaRN's attention temperature: 0.1 * coefficient * ln(factor) + 1 (1 without stretching)."""
    return 1.0 if factor <= 1 else 0.1 * (coefficient or 0.0) * math.log(factor) + 1.0


def rope_frequencies(cfg: ModelConfig, rotary_dim: int) -> tuple[Tensor, float]:
    """The rotation frequency of each pair of dimensions, and the factor the cos/sin tables are scaled by.

    yarn (Peng et al. 2023): frequencies that turn fewer than --beta-slow times over the original context are
    divided by the factor, those turning more than --beta-fast times kept, a linear ramp between (over the
    whole dimensions the bounds land on); tables scaled by the ratio of the two mscales (DeepSeek) or by
    yarn_mscale(factor). llama3: wavelengths longer than original / --low-freq-factor divided by the factor,
    shorter than original / --high-freq-factor kept, a smooth blend between."""
    exponents = torch.arange(0, rotary_dim, 2, dtype=torch.float32) / rotary_dim
    inv_freq = 1.0 / cfg.rope_theta ** exponents
    factor, original = cfg.rope_scaling_factor, cfg.original_positions()
    if cfg.rope_scaling == "yarn":
        def pair_at(rotations: float) -> float:  # the pair index turning `rotations` times over the original context
            return rotary_dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(cfg.rope_theta))

        low, high = max(math.floor(pair_at(cfg.beta_fast)), 0), min(math.ceil(pair_at(cfg.beta_slow)), rotary_dim - 1)
        ramp = ((torch.arange(rotary_dim // 2, dtype=torch.float32) - low) / max(high - low, 1e-3)).clamp(0, 1)
        inv_freq = inv_freq / factor * ramp + inv_freq * (1 - ramp)
        if cfg.mscale and cfg.mscale_all_dim:
            return inv_freq, yarn_mscale(factor, cfg.mscale) / yarn_mscale(factor, cfg.mscale_all_dim)
        return inv_freq, yarn_mscale(factor)
    if cfg.rope_scaling == "llama3":
        wavelength = 2 * math.pi / inv_freq
        low, high = cfg.low_freq_factor, cfg.high_freq_factor
        smooth = ((original / wavelength - low) / (high - low)).clamp(0, 1)
        return inv_freq / factor * (1 - smooth) + inv_freq * smooth, 1.0
    return inv_freq, 1.0


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate pairs (first half, second half) of the first cos.shape[-1] dimensions of each head (all of them
    but for partial rotary), the Llama/Hugging Face layout, and keep the rest:
    (x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin) = x * cos + (x2, x1) * signed sin."""
    rotary = cos.shape[-1]
    if rotary < x.shape[-1]:
        return torch.cat([apply_rope(x[..., :rotary], cos, sin), x[..., rotary:]], dim=-1)
    half = x.shape[-1] // 2
    swapped = torch.cat([x[..., half:], x[..., :half]], dim=-1)
    return x * cos.to(x.dtype) + swapped * sin.to(x.dtype)


class Attention(nn.Module):
    """Causal self-attention over `num_heads` query heads sharing `kv_heads` key/value heads. The fused `qkv`
    holds the query rows, then the key rows, then the value rows; under tensor parallelism a rank holds whole
    heads of each part, and the forward takes the local head counts from those rows."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.num_heads, self.kv_heads, self.head_dim = cfg.num_attention_heads, cfg.kv_heads(), cfg.head_dim()
        bias = cfg.style == "gpt"
        q_width, kv_width = self.num_heads * self.head_dim, self.kv_heads * self.head_dim
        self.qkv = nn.Linear(cfg.hidden_size, q_width + 2 * kv_width, bias=bias or cfg.add_qkv_bias)
        self.proj = nn.Linear(q_width, cfg.hidden_size, bias=bias)
        self.qk_norm = cfg.qk_norm
        widths = {"head": (self.head_dim, self.head_dim), "projection": (q_width, kv_width)}.get(cfg.qk_norm)
        self.q_norm, self.k_norm = (RMSNorm(w, cfg.norm_eps) for w in widths) if widths else (None, None)
        self.dropout = cfg.attention_dropout
        self.recompute_core = cfg.recompute_granularity == "selective"

    def qkv_parts(self) -> tuple[int, int, int]:
        """Heads of the query, key and value parts of `qkv`, which tensor parallelism splits part by part."""
        return self.num_heads, self.kv_heads, self.kv_heads

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor] | None) -> Tensor:
        batch, seq, _ = x.shape
        qkv = self.qkv(x)
        local = qkv.shape[-1] // self.head_dim  # this rank's heads, all three parts (whole model: H + 2 G)
        local_kv = local * self.kv_heads // (self.num_heads + 2 * self.kv_heads)
        q, k, v = qkv.split([(local - 2 * local_kv) * self.head_dim, local_kv * self.head_dim,
                             local_kv * self.head_dim], dim=-1)
        if self.qk_norm == "projection":
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = (t.view(batch, seq, -1, self.head_dim).transpose(1, 2) for t in (q, k, v))
        if self.qk_norm == "head":
            q, k = self.q_norm(q), self.k_norm(k)
        return self.attend(q, k, v, rope)

    def attend(self, q: Tensor, k: Tensor, v: Tensor, rope: tuple[Tensor, Tensor] | None,
                scale: float | None = None) -> Tensor:
        """[B, heads, T, d] queries and keys (RoPE applied here), values -> the output projection."""
        batch, _, seq, _ = q.shape
        if rope is not None:
            cos, sin = rope[0][:seq], rope[1][:seq]
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if self.recompute_core and torch.is_grad_enabled():  # selective: keep q, k, v, not the core's buffers
            out = checkpoint(self._core, q, k, v, scale, use_reentrant=False)
        else:
            out = self._core(q, k, v, scale)
        return self.proj(out.transpose(1, 2).reshape(batch, seq, -1))  # -1: local heads under TP

    def _core(self, q: Tensor, k: Tensor, v: Tensor, scale: float | None) -> Tensor:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=k.shape[1] != q.shape[1],
                                              dropout_p=self.dropout if self.training else 0.0)
