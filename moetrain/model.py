"""GPT decoder whose FFN blocks are MoE layers every N-th layer.

Two styles: "gpt" (Megatron/GPT-3: learned positions, LayerNorm, GELU, biases) and "llama"
(Mixtral: RoPE, RMSNorm, SwiGLU, no biases). Expert counts may differ per MoE layer
(Pyramid-MoE) and MoE layers may carry a residual dense MLP (PR-MoE).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moetrain.config import ModelConfig, MoEConfig
from moetrain.moe import MLP, MoE


@dataclass
class ModelOutput:
    logits: Tensor
    lm_loss: Tensor | None  # mean next-token cross entropy, when targets are given
    aux_loss: Tensor  # sum of l_aux over MoE layers (unscaled)
    z_loss: Tensor  # sum of router z-losses over MoE layers (unscaled)


def rope_tables(seq_length: int, head_dim: int, theta: float) -> tuple[Tensor, Tensor]:
    """cos and signed sin of the rotary angles over a whole head, [T, head_dim]: (cos, cos) and (-sin, sin)
    per (first half, second half), so apply_rope is two full-width products instead of four half-width ones."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    angles = torch.outer(torch.arange(seq_length, dtype=torch.float32), inv_freq)
    cos, sin = angles.cos(), angles.sin()
    return torch.cat([cos, cos], dim=-1), torch.cat([-sin, sin], dim=-1)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate pairs (first half, second half) of each head, the Llama/Hugging Face layout:
    (x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin) = x * cos + (x2, x1) * signed sin."""
    half = x.shape[-1] // 2
    swapped = torch.cat([x[..., half:], x[..., :half]], dim=-1)
    return x * cos.to(x.dtype) + swapped * sin.to(x.dtype)


def make_norm(cfg: ModelConfig) -> nn.Module:
    """LayerNorm for the GPT style, RMSNorm for the Llama style."""
    if cfg.style == "gpt":
        return nn.LayerNorm(cfg.hidden_size, eps=cfg.norm_eps)
    return RMSNorm(cfg.hidden_size, eps=cfg.norm_eps)


class RMSNorm(nn.Module):
    """x / rms(x) * weight, as nn.RMSNorm (same parameter), with a hand-written backward: on a CPU, autograd
    through F.rms_norm's pieces takes ~1.7x as long (BENCHMARKS.md, "Training throughput")."""

    def __init__(self, hidden_size: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size))

    def forward(self, x: Tensor) -> Tensor:
        # The function picks its own precision; autocast would lower its statistics to 16 bits.
        with torch.autocast(x.device.type, enabled=False):
            return _RMSNormFunction.apply(x, self.weight, self.eps)


def _at_least_fp32(t: Tensor) -> Tensor:
    return t.float() if t.element_size() < 4 else t


class _RMSNormFunction(torch.autograd.Function):
    """Keeps x and the per-row 1 / rms for backward; statistics in fp32 even for 16-bit inputs."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, eps: float) -> Tensor:
        wide = _at_least_fp32(x)
        inv_rms = torch.rsqrt(torch.linalg.vecdot(wide, wide).div_(x.shape[-1]).add_(eps)).unsqueeze(-1)
        ctx.save_for_backward(x, weight, inv_rms)
        return (wide * inv_rms).mul_(weight).to(x.dtype)

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        x, weight, inv_rms = ctx.saved_tensors
        normed = _at_least_fp32(x) * inv_rms
        grad_out = _at_least_fp32(grad_out)
        grad_weight = (grad_out * normed).reshape(-1, x.shape[-1]).sum(0)
        grad_normed = grad_out * weight
        # d/dx of x * inv_rms: (g - normed * mean(g * normed)) * inv_rms, per row
        mean_dot = torch.linalg.vecdot(grad_normed, normed).div_(x.shape[-1]).unsqueeze(-1)
        grad_x = torch.addcmul(grad_normed, normed, mean_dot, value=-1).mul_(inv_rms)
        return grad_x.to(x.dtype), grad_weight.to(weight.dtype), None


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.num_heads = cfg.num_attention_heads
        self.head_dim = cfg.hidden_size // cfg.num_attention_heads
        self.use_rope = cfg.style == "llama"
        bias = cfg.style == "gpt"
        self.qkv = nn.Linear(cfg.hidden_size, 3 * cfg.hidden_size, bias=bias)
        self.proj = nn.Linear(cfg.hidden_size, cfg.hidden_size, bias=bias)
        self.dropout = cfg.attention_dropout

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor] | None) -> Tensor:
        batch, seq, _ = x.shape
        q, k, v = self.qkv(x).view(batch, seq, 3, self.num_heads, self.head_dim).unbind(2)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        if rope is not None:
            cos, sin = rope[0][:seq], rope[1][:seq]
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                             dropout_p=self.dropout if self.training else 0.0)
        return self.proj(out.transpose(1, 2).reshape(batch, seq, -1))  # -1: local heads under TP


class Block(nn.Module):
    """Pre-norm transformer block; the FFN is a dense MLP or an MoE layer."""

    def __init__(self, cfg: ModelConfig, moe_cfg: MoEConfig, num_experts: int) -> None:
        super().__init__()
        self.norm1, self.norm2 = make_norm(cfg), make_norm(cfg)
        self.attn = Attention(cfg)
        activation = "gelu" if cfg.style == "gpt" else "swiglu"
        bias = cfg.style == "gpt"
        if num_experts > 1:
            self.ffn: nn.Module = MoE(
                cfg.hidden_size, num_experts=num_experts, k=moe_cfg.topk,
                capacity_factor=moe_cfg.train_capacity_factor,
                eval_capacity_factor=moe_cfg.eval_capacity_factor,
                min_capacity=moe_cfg.min_capacity, use_residual=moe_cfg.mlp_type == "residual",
                noisy_gate_policy=moe_cfg.noisy_gate_policy, drop_tokens=moe_cfg.drop_tokens,
                use_rts=moe_cfg.use_rts, top2_2nd_expert_sampling=moe_cfg.top2_2nd_expert_sampling,
                ffn_hidden_size=moe_cfg.expert_ffn_size(cfg),
                activation=activation, ffn_bias=bias, score_func=moe_cfg.score_func,
                drop_policy=moe_cfg.drop_policy, expert_bias=moe_cfg.expert_bias,
                expert_bias_update_rate=moe_cfg.expert_bias_update_rate,
                num_shared_experts=moe_cfg.num_shared_experts, init_std=cfg.init_method_std)
        else:
            self.ffn = MLP(cfg.hidden_size, cfg.ffn_size(), activation, bias=bias)
        self.dropout = nn.Dropout(cfg.hidden_dropout)

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor] | None,
                with_z_loss: bool = False) -> tuple[Tensor, ...]:
        """(x, l_aux), or with `with_z_loss` (x, l_aux, z_loss); the losses are None for a dense FFN."""
        x = x + self.dropout(self.attn(self.norm1(x), rope))
        if isinstance(self.ffn, MoE):
            moe = self.ffn(self.norm2(x), with_z_loss=True)
            x, losses = x + self.dropout(moe.output), (moe.l_aux, moe.z_loss)
        else:
            x, losses = x + self.dropout(self.ffn(self.norm2(x))), (None, None)
        return (x, *losses) if with_z_loss else (x, losses[0])


class GPT(nn.Module):
    def __init__(self, cfg: ModelConfig, moe_cfg: MoEConfig) -> None:
        super().__init__()
        if cfg.vocab_size < 1:
            raise ValueError("ModelConfig.vocab_size is unset; set it from the tokenizer")
        self.cfg, self.moe_cfg = cfg, moe_cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.pos_emb = nn.Embedding(cfg.seq_length, cfg.hidden_size) if cfg.style == "gpt" else None
        self.drop = nn.Dropout(cfg.hidden_dropout)
        experts = moe_cfg.experts_per_layer(cfg.num_layers)
        self.blocks = nn.ModuleList(Block(cfg, moe_cfg, e) for e in experts)
        self.norm = make_norm(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight
        if cfg.style == "llama":
            cos, sin = rope_tables(cfg.seq_length, cfg.hidden_size // cfg.num_attention_heads,
                                   cfg.rope_theta)
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)
        self._init_weights()

    def _init_weights(self) -> None:
        """Normal(0, std) everywhere; output projections scaled by 1/sqrt(2 L) (GPT-2/Megatron)."""
        std = self.cfg.init_method_std
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, 0.0, std)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)
        scaled = std / math.sqrt(2 * self.cfg.num_layers)
        for name, param in self.named_parameters():
            if name.endswith(("attn.proj.weight", "fc2.weight", "experts.w2")):
                nn.init.normal_(param, 0.0, scaled)

    def moe_layers(self) -> list[tuple[int, MoE]]:
        return [(i, b.ffn) for i, b in enumerate(self.blocks) if isinstance(b.ffn, MoE)]

    def forward(self, input_ids: Tensor, targets: Tensor | None = None) -> ModelOutput:
        if input_ids.shape[1] > self.cfg.seq_length:
            raise ValueError(f"sequence of {input_ids.shape[1]} tokens exceeds seq_length {self.cfg.seq_length}")
        x, aux, z = self.run_blocks(self.embed(input_ids), self.blocks)
        logits = self.lm_head(self.norm(x))
        lm_loss = None
        if targets is not None:
            lm_loss = F.cross_entropy(logits.float().view(-1, logits.shape[-1]), targets.view(-1))
        return ModelOutput(logits, lm_loss, aux, z)

    def embed(self, input_ids: Tensor) -> Tensor:
        x = self.tok_emb(input_ids)
        if self.pos_emb is not None:
            x = x + self.pos_emb(torch.arange(input_ids.shape[1], device=input_ids.device))
        return self.drop(x)

    def run_blocks(self, x: Tensor, blocks) -> tuple[Tensor, Tensor, Tensor]:
        """x through `blocks`, with the summed (unscaled) aux and z losses of their MoE layers.

        Shared with the pipeline stages (moetrain.parallel.pipeline), which run a run of blocks each.
        """
        rope = (self.rope_cos, self.rope_sin) if self.cfg.style == "llama" else None
        aux_terms, z_terms = [], []
        for block in blocks:
            x, l_aux, z_loss = block(x, rope, with_z_loss=True)
            if l_aux is not None:
                aux_terms.append(l_aux)
                z_terms.append(z_loss)
        zero = x.new_zeros((), dtype=torch.float32)
        aux = torch.stack(aux_terms).sum() if aux_terms else zero
        z = torch.stack(z_terms).sum() if z_terms else zero
        return x, aux, z

    def update_expert_biases(self) -> None:
        """Aux-loss-free balancing: call after each optimizer step."""
        for _, moe in self.moe_layers():
            moe.update_expert_bias()

    def parameter_counts(self) -> dict[str, int]:
        """Total parameters and parameters active per token (the k routed experts of E)."""
        total = sum(p.numel() for p in self.parameters())
        inactive = 0
        for _, moe in self.moe_layers():
            per_expert = sum(p.numel() for p in moe.experts.parameters()) // moe.num_local_experts
            inactive += per_expert * (moe.num_experts - moe.k)
        return {"total": total, "active": total - inactive}

    @torch.no_grad()
    def generate(self, input_ids: Tensor, max_new_tokens: int, temperature: float = 1.0,
                 top_k: int | None = None, eos_id: int | None = None) -> Tensor:
        """Sample continuations (eval mode); temperature 0 means greedy."""
        for _ in range(max_new_tokens):
            context = input_ids[:, -self.cfg.seq_length:]
            logits = self(context).logits[:, -1, :].float()
            if temperature <= 0:
                next_id = logits.argmax(dim=-1, keepdim=True)
            else:
                logits = logits / temperature
                if top_k:
                    kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]
                    logits = logits.masked_fill(logits < kth, -math.inf)
                next_id = torch.multinomial(F.softmax(logits, dim=-1), 1)
            input_ids = torch.cat([input_ids, next_id], dim=1)
            if eos_id is not None and bool((next_id == eos_id).all()):
                break
        return input_ids
