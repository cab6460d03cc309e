"""Causal self-attention: grouped-query heads, QK-norm, RoPE over all or part of each head.

One module for every layout the open MoE models use: Llama/Mixtral (one key/value head per query head or
grouped), Qwen3 and GLM-4.5 (RMSNorm of each query and key head), OLMoE (RMSNorm over the whole query and
key projections), GLM-4.5 (RoPE over the first half of each head only).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from moetrain.comm import copy_to_group
from moetrain.fused import fused_kernels
from moetrain.fused import rope as fused_rope
from moetrain.main_grad import Linear
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
    if fused_kernels(x.device):  # one fused kernel per direction (moetrain.fused), the same rotation
        return fused_rope(x, cos, sin)
    half = x.shape[-1] // 2
    swapped = torch.cat([x[..., half:], x[..., :half]], dim=-1)
    return x * cos.to(x.dtype) + swapped * sin.to(x.dtype)


class CausalAttention(nn.Module):
    """What every attention layout shares: the causal core (dropout, selective recomputation) and the output
    projection `proj`, applied to [B, heads, T, d] queries, keys and values."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.dropout = cfg.attention_dropout
        self.recompute_core = cfg.recompute_granularity == "selective"

    def attend(self, q: Tensor, k: Tensor, v: Tensor, rope: tuple[Tensor, Tensor] | None,
               scale: float | None = None) -> Tensor:
        """Queries and keys (RoPE applied here when `rope` is given), values -> the output projection."""
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
        width = v.shape[-1]
        if width != q.shape[-1]:  # MLA: the fused kernels need one head width (else a 3x slower fallback on a
            wide = max(width, q.shape[-1])  # CPU); zero columns change no score and no output kept
            q, k, v = (F.pad(t, (0, wide - t.shape[-1])) for t in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=k.shape[1] != q.shape[1],
                                             dropout_p=self.dropout if self.training else 0.0)
        return out[..., :width]


class Attention(CausalAttention):
    """Causal self-attention over `num_heads` query heads sharing `kv_heads` key/value heads. The fused `qkv`
    holds the query rows, then the key rows, then the value rows; under tensor parallelism a rank holds whole
    heads of each part, and the forward takes the local head counts from those rows."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__(cfg)
        self.num_heads, self.kv_heads, self.head_dim = cfg.num_attention_heads, cfg.kv_heads(), cfg.head_dim()
        bias = cfg.style == "gpt"
        q_width, kv_width = self.num_heads * self.head_dim, self.kv_heads * self.head_dim
        self.qkv = Linear(cfg.hidden_size, q_width + 2 * kv_width, bias=bias or cfg.add_qkv_bias)
        self.proj = Linear(q_width, cfg.hidden_size, bias=bias)
        self.qk_norm = cfg.qk_norm
        widths = {"head": (self.head_dim, self.head_dim), "projection": (q_width, kv_width)}.get(cfg.qk_norm)
        self.q_norm, self.k_norm = (RMSNorm(w, cfg.norm_eps) for w in widths) if widths else (None, None)

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


class LatentAttention(CausalAttention):
    """Multi-head Latent Attention (DeepSeek-V2): each token's keys and values come up from one RMS-normed
    latent of --kv-lora-rank dimensions (`kv_down` -> `kv_norm` -> `kv_up`), queries from a low-rank path
    (`q_down` -> `q_norm` -> `q_up`) or one projection (`q_proj`). A query/key head is --qk-head-dim
    dimensions without position, then --qk-pos-emb-head-dim rotated by RoPE, the key's rotated part shared by
    all heads (it comes from `kv_down` beside the latent); values are --v-head-dim wide. Softmax scale
    1/sqrt(qk-head-dim + qk-pos-emb-head-dim), times yarn's mscale(factor, mscale_all_dim)^2 under yarn
    scaling (DeepSeek-V3). Tensor parallelism splits `q_up` / `q_proj` and `kv_up` by whole heads and `proj`
    by rows; the down projections and norms stay whole, and the shared rotary key's gradient is summed over the
    ranks (`shared_key_group`), as each uses it for its own heads."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__(cfg)
        heads, hidden = cfg.num_attention_heads, cfg.hidden_size
        self.nope_dim, self.rope_dim, self.v_dim = cfg.qk_head_dim, cfg.qk_pos_emb_head_dim, cfg.v_head_dim
        self.latent_dim = cfg.kv_lora_rank
        query_width = heads * (self.nope_dim + self.rope_dim)
        self.low_rank_query = bool(cfg.q_lora_rank)
        if self.low_rank_query:
            self.q_down = Linear(hidden, cfg.q_lora_rank, bias=False)
            self.q_norm = RMSNorm(cfg.q_lora_rank, cfg.norm_eps)
            self.q_up = Linear(cfg.q_lora_rank, query_width, bias=False)
        else:
            self.q_proj = Linear(hidden, query_width, bias=False)
        self.kv_down = Linear(hidden, self.latent_dim + self.rope_dim, bias=False)
        self.kv_norm = RMSNorm(self.latent_dim, cfg.norm_eps)
        self.kv_up = Linear(self.latent_dim, heads * (self.nope_dim + self.v_dim), bias=False)
        self.proj = Linear(heads * self.v_dim, hidden, bias=False)
        self.shared_key_group: dist.ProcessGroup | None = None  # tensor parallelism: the ranks sharing k_rope
        self.scale = (self.nope_dim + self.rope_dim) ** -0.5
        if cfg.rope_scaling == "yarn" and cfg.mscale_all_dim:
            self.scale *= yarn_mscale(cfg.rope_scaling_factor, cfg.mscale_all_dim) ** 2

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor] | None) -> Tensor:
        batch, seq, _ = x.shape
        q = self.q_up(self.q_norm(self.q_down(x))) if self.low_rank_query else self.q_proj(x)
        q = q.view(batch, seq, -1, self.nope_dim + self.rope_dim).transpose(1, 2)  # -1: local heads under TP
        q_nope, q_rope = q.split([self.nope_dim, self.rope_dim], dim=-1)
        latent, k_rope = self.kv_down(x).split([self.latent_dim, self.rope_dim], dim=-1)
        kv = self.kv_up(self.kv_norm(latent)).view(batch, seq, -1, self.nope_dim + self.v_dim).transpose(1, 2)
        k_nope, v = kv.split([self.nope_dim, self.v_dim], dim=-1)
        cos, sin = rope[0][:seq], rope[1][:seq]
        k_rope = copy_to_group(k_rope, self.shared_key_group)  # each rank's heads use it: gradients summed
        q_rope, k_rope = apply_rope(q_rope, cos, sin), apply_rope(k_rope.unsqueeze(1), cos, sin)
        q = torch.cat([q_nope, q_rope], dim=-1)
        k = torch.cat([k_nope, k_rope.expand(-1, k_nope.shape[1], -1, -1)], dim=-1)
        return self.attend(q, k, v, None, self.scale)


def make_attention(cfg: ModelConfig) -> CausalAttention:
    return LatentAttention(cfg) if cfg.multi_latent_attention else Attention(cfg)
