"""GPT decoder whose FFN blocks are MoE layers every N-th layer.

Two styles: "gpt" (Megatron/GPT-3: learned positions, LayerNorm, GELU, biases) and "llama"
(Mixtral: RoPE, RMSNorm, SwiGLU, no biases). Expert counts may differ per MoE layer
(Pyramid-MoE) and MoE layers may carry a residual dense MLP (PR-MoE).
"""

from __future__ import annotations

import contextlib
import hashlib
import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from functools import cached_property
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.distributed.tensor import DTensor
from torch.utils.checkpoint import checkpoint

from moetrain.attention import Attention, LatentAttention, make_attention, rope_tables
from moetrain.config import ModelConfig, MoEConfig
from moetrain.lm_loss import linear_cross_entropy, plain_cross_entropy
from moetrain.moe import MLP, MoE
from moetrain.moe.experts import GroupedExperts
from moetrain.moe.stats import RoutingStats
from moetrain.norm import RMSNorm, normed_and_residual


@dataclass
class ModelOutput:
    """What a forward gives: the LM head's input and weight rather than the [B, T, V] logits, so the LM
    loss never materialises them (moetrain.lm_loss); `logits` computes them on first use (sampling,
    scoring, distillation)."""

    hidden: Tensor  # the final norm's output, [B, T, hidden]
    head_weight: Tensor | None  # the LM head's weight, [V, hidden]; None: `hidden` are the logits already
    lm_loss: Tensor | None  # mean next-token cross entropy, when targets are given
    aux_loss: Tensor  # sum of l_aux over MoE layers (unscaled)
    z_loss: Tensor  # sum of router z-losses over MoE layers (unscaled)
    routing_key: Tensor | None = None  # the forward's routing key (a distillation teacher keys its noise by it)
    vocab_size: int | None = None  # the head's rows that are tokens (the rest pad it); None: all

    @cached_property
    def logits(self) -> Tensor:
        """[B, T, vocab]: the padding rows of the head are computed (an aligned GEMM) but never shown."""
        if self.head_weight is None:
            return self.hidden
        return F.linear(self.hidden, self.head_weight)[..., :self.vocab_size]

    def loss_of(self, targets: Tensor) -> Tensor:
        """Mean next-token cross entropy against `targets`, a chunk of rows at a time."""
        if self.head_weight is None:
            return plain_cross_entropy(self.hidden, targets)
        return linear_cross_entropy(self.hidden, self.head_weight, targets, classes=self.vocab_size)


class TPSplit(NamedTuple):
    """How tensor parallelism splits one linear (Megatron): by output rows or by input columns."""

    style: str  # "column": each rank keeps whole heads / FFN columns; "row": matching inputs, outputs summed;
    # "head_norm": a norm every rank holds whole and applies to its own heads, its gradient summed over ranks;
    # "shared_key": MLA, whose rotary key every rank computes whole and uses for its own heads (summed likewise)
    parts: tuple[int, ...] = (1,)  # relative sizes of fused projections (q|k|v, gate|up), split part by part


def tied_weights(cfg: ModelConfig) -> dict[str, str]:
    """Parameters that are another parameter's tensor: name -> the name it is tied to (stored under)."""
    return {"lm_head.weight": "tok_emb.weight"} if cfg.tie_embeddings else {}


def make_norm(cfg: ModelConfig) -> nn.Module:
    """LayerNorm for the GPT style, RMSNorm for the Llama style."""
    if cfg.style == "gpt":
        return nn.LayerNorm(cfg.hidden_size, eps=cfg.norm_eps)
    return RMSNorm(cfg.hidden_size, eps=cfg.norm_eps)


class Block(nn.Module):
    """Pre-norm transformer block; the FFN is a dense MLP or an MoE layer."""

    def __init__(self, cfg: ModelConfig, moe_cfg: MoEConfig, num_experts: int, layer_index: int = 0) -> None:
        super().__init__()
        self.norm1, self.norm2 = make_norm(cfg), make_norm(cfg)
        self.attn = make_attention(cfg)
        activation = "gelu" if cfg.style == "gpt" else "swiglu"
        bias = cfg.style == "gpt"
        if num_experts > 1:
            self.ffn: nn.Module = MoE(
                cfg.hidden_size, num_experts=num_experts, routing=moe_cfg.routing(),
                use_residual=moe_cfg.mlp_type == "residual", ffn_hidden_size=moe_cfg.expert_ffn_size(cfg),
                activation=activation, ffn_bias=bias, num_shared_experts=moe_cfg.num_shared_experts,
                init_std=cfg.init_method_std, shared_expert_ffn_size=moe_cfg.shared_expert_ffn_size,
                shared_expert_gate=moe_cfg.shared_expert_gate, layer_index=layer_index)
        else:
            self.ffn = MLP(cfg.hidden_size, cfg.ffn_size(), activation, bias=bias)
        self.dropout = nn.Dropout(cfg.hidden_dropout)

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor] | None, token_mask: Tensor | None = None,
                routing_key: Tensor | None = None) -> tuple[Tensor, Tensor | None, Tensor | None]:
        """(x, l_aux, z_loss); the two router losses are None for a dense FFN. `token_mask` [B, T]
        (False for padding) keeps padding out of the MoE layer's routing; `routing_key` keys its noise."""
        normed, x = normed_and_residual(self.norm1, x)
        x = x + self.dropout(self.attn(normed, rope))
        normed, x = normed_and_residual(self.norm2, x)
        if isinstance(self.ffn, MoE):
            moe = self.ffn(normed, with_z_loss=True, token_mask=token_mask, routing_key=routing_key)
            return x + self.dropout(moe.output), moe.l_aux, moe.z_loss
        return x + self.dropout(self.ffn(normed)), None, None


def _run_units(blocks: list[Block], x: Tensor, rope: tuple[Tensor, Tensor] | None, token_mask: Tensor | None,
               routing_key: Tensor | None = None) -> tuple[Tensor, list[Tensor], list[Tensor]]:
    """x through `blocks`; the aux and z losses of their MoE layers."""
    aux, z = [], []
    for block in blocks:
        x, l_aux, z_loss = block(x, rope, token_mask, routing_key)
        if l_aux is not None:
            aux.append(l_aux)
            z.append(z_loss)
    return x, aux, z


def recomputed(fn, blocks: list[Block], *args):
    """`fn(blocks, *args)` keeping only its inputs for backward, which runs it again (torch's non-reentrant
    checkpoint, which replays the CPU and device RNG: dropout, unkeyed routing noise; keyed routing noise
    is a function of its arguments). The replay must not count
    twice what a forward records, so the routing statistics and every buffer (an aux-free router's
    pending load) the replay changes are put back as the original forward left them."""
    calls = 0

    def run(*inputs):
        nonlocal calls
        calls += 1
        if calls == 1:
            return fn(blocks, *inputs)
        with _recorded_state_kept(blocks):
            return fn(blocks, *inputs)

    return checkpoint(run, *args, use_reentrant=False)


@contextlib.contextmanager
def _recorded_state_kept(blocks: list[Block]):
    """Restore, on exit, the buffers and routing statistics of `blocks` to their values on entry."""
    modules = [m for block in blocks for m in block.modules()]
    saved = [(b, b.clone()) for m in modules for b in m.buffers(recurse=False)]
    stats = [(s, {name: t.clone() for name, t in vars(s).items() if isinstance(t, Tensor)})
             for m in modules for s in vars(m).values() if isinstance(s, RoutingStats)]
    try:
        yield
    finally:
        with torch.no_grad():
            for buffer, value in saved:
                buffer.copy_(value)
            for stat, counts in stats:
                for name, value in counts.items():
                    getattr(stat, name).copy_(value)


class LayerStack(nn.Module):
    """Blocks keyed by their index in the whole model, so a pipeline stage keeps the names ("blocks.5.attn...")."""

    def __init__(self, blocks: dict[int, Block]) -> None:
        super().__init__()
        for index, block in blocks.items():
            self.add_module(str(index), block)

    def __getitem__(self, index: int) -> Block:
        return self._modules[str(index)]

    def __iter__(self) -> Iterator[Block]:
        return iter(self._modules.values())

    def __len__(self) -> int:
        return len(self._modules)

    def items(self) -> list[tuple[int, Block]]:
        return [(int(index), block) for index, block in self._modules.items()]


_SCALED_OUTPUTS = ("attn.proj.weight", "fc2.weight", "experts.w2")  # std / sqrt(2 L)


def _keyed_normal(seed: int, key: tuple, shape: torch.Size | tuple[int, ...], std: float) -> Tensor:
    """Normal(0, std) values of `shape` from a CPU generator seeded by (seed, key): the same on every rank
    and device, whatever else was drawn before."""
    digest = hashlib.blake2b(repr((seed, *key)).encode(), digest_size=8).digest()
    generator = torch.Generator().manual_seed(int.from_bytes(digest, "little") >> 1)
    return torch.empty(shape, device="cpu").normal_(0.0, std, generator=generator)


class GPT(nn.Module):
    """The decoder: embeddings, blocks, final norm and LM head. A pipeline stage is a GPT over a range of
    layers (`pipeline_stage`): only the first holds the embeddings, only the last the norm and head.

    The model declares what parallelism may split (`tp_plan`), which weights are tied (`tied_parameters`)
    and, through MoE.shard_experts, how experts are kept; moetrain.parallel decides the layout.
    """

    def __init__(self, cfg: ModelConfig, moe_cfg: MoEConfig, *, seed: int | None = None) -> None:
        """Built on the `meta` device and, unless the default device is `meta` (a model to shard first,
        then `materialize`), materialised on the default device with the keyed initial weights of `seed`
        (None: a seed drawn from torch's default generator, so `torch.manual_seed(s); GPT(...)` repeats)."""
        super().__init__()
        if cfg.vocab_size < 1:
            raise ValueError("ModelConfig.vocab_size is unset; set it from the tokenizer")
        self.cfg, self.moe_cfg = cfg, moe_cfg
        self.init_seed = seed if seed is not None else int(torch.randint(2**62, (), device="cpu"))
        target = torch.get_default_device()
        with torch.device("meta"):
            self.tok_emb = nn.Embedding(cfg.padded_vocab_size(), cfg.hidden_size)
            self.pos_emb = nn.Embedding(cfg.positions(), cfg.hidden_size) if cfg.style == "gpt" else None
            self.drop = nn.Dropout(cfg.hidden_dropout)
            experts = moe_cfg.experts_per_layer(cfg.num_layers)
            self.blocks = LayerStack({i: Block(cfg, moe_cfg, e, i) for i, e in enumerate(experts)})
            self.norm = make_norm(cfg)
            self.lm_head = nn.Linear(cfg.hidden_size, cfg.padded_vocab_size(), bias=False)
            if cfg.tie_embeddings:
                self.lm_head.weight = self.tok_emb.weight
            if cfg.style == "llama":
                self.register_buffer("rope_cos", torch.empty(cfg.positions(), cfg.rotary_dim()), persistent=False)
                self.register_buffer("rope_sin", torch.empty(cfg.positions(), cfg.rotary_dim()), persistent=False)
        if target.type != "meta":
            self.materialize(target)

    def init_rules(self) -> dict[str, tuple[str, float]]:
        """How each parameter starts: ("normal", std) or ("fill", value). Normal(0, init_method_std)
        everywhere, output projections scaled by 1/sqrt(2 L) (GPT-2/Megatron), biases 0, norms 1."""
        std = self.cfg.init_method_std
        scaled = std / math.sqrt(2 * self.cfg.num_layers)
        rules = {}
        for module_name, module in self.named_modules():
            for short, _ in module.named_parameters(recurse=False):
                name = f"{module_name}.{short}" if module_name else short
                if isinstance(module, (nn.LayerNorm, RMSNorm)):
                    rules[name] = ("fill", 1.0 if short == "weight" else 0.0)
                elif short in ("bias", "b1", "b2"):
                    rules[name] = ("fill", 0.0)
                else:
                    rules[name] = ("normal", scaled if name.endswith(_SCALED_OUTPUTS) else std)
        return rules

    @torch.no_grad()
    def materialize(self, device: torch.device | str, pieces: Mapping[str, tuple] | None = None) -> None:
        """Allocate this model's (meta) tensors on `device`, ties kept, and give them their initial values.

        Every parameter's values come from generators keyed by (init_seed, its global name [, the global
        expert index of a stacked expert weight]), so a rank holding only a piece of a parameter produces
        exactly that piece of the single-process model's. `pieces` (moetrain.parallel.pieces.model_pieces of
        a sharded model: local name -> (global name, tensor, piece)) says which piece; None: all whole.
        Peak extra memory: one whole non-expert parameter (a tensor-parallel or ZeRO-3 piece is cut from
        it); of a stacked expert weight only this rank's experts are drawn.
        """
        self._allocate(torch.device(device))
        rules, ties = self.init_rules(), self.tied_parameters()
        stacked = {f"{name}.{short}" for name, module in self.named_modules() if isinstance(module, GroupedExperts)
                   for short, _ in module.named_parameters(recurse=False)}
        for name, param in self.named_parameters(remove_duplicate=False):
            kind, value = rules[name]
            param = param.to_local() if isinstance(param, DTensor) else param  # a ZeRO-3 shard: its piece says which
            if kind == "fill":
                param.fill_(value)
                continue
            global_name, piece = (pieces[name][0], pieces[name][2]) if pieces else (name, None)
            key = ties.get(global_name, global_name)
            dim, index = (piece.dim, piece.index) if piece is not None else (None, None)
            if name in stacked:  # experts [E, ...]: each expert its own generator, so a rank draws only its own
                experts = index if dim == 0 else range(param.shape[0])
                for local, expert in enumerate(experts):
                    param[local].copy_(_keyed_normal(self.init_seed, (key, expert), param.shape[1:], value))
                continue
            shape = piece.shape if piece is not None else param.shape
            full = _keyed_normal(self.init_seed, (key,), shape, value)
            if key in ("tok_emb.weight", "lm_head.weight"):  # rows padding the vocabulary: zero, never predicted
                full[self.cfg.vocab_size:] = 0
            param.copy_(full if dim is None else full.index_select(dim, torch.tensor(index, dtype=torch.long)))
        self._init_buffers()

    def _allocate(self, device: torch.device) -> None:
        """Module.to_empty, keeping shared tensors shared (to_empty gives each use its own Parameter)."""
        made: dict[int, Tensor] = {}
        for module in self.modules():
            for slots in (module._parameters, module._buffers):
                for short, tensor in slots.items():
                    if tensor is None or not tensor.is_meta:
                        continue
                    if id(tensor) not in made:
                        empty = torch.empty_like(tensor, device=device)
                        made[id(tensor)] = (nn.Parameter(empty, requires_grad=tensor.requires_grad)
                                            if isinstance(tensor, nn.Parameter) else empty)
                    slots[short] = made[id(tensor)]

    def _init_buffers(self) -> None:
        """RoPE tables computed; every other buffer (an aux-free router's bias and pending load) and the
        routing statistics start at zero."""
        for module in self.modules():
            for _, buffer in module.named_buffers(recurse=False):
                buffer.zero_()
        if self.cfg.style == "llama":
            cos, sin = rope_tables(self.cfg, self.cfg.rotary_dim())
            self.rope_cos.copy_(cos)
            self.rope_sin.copy_(sin)
        for _, moe in self.moe_layers():
            moe.routing_stats, moe.eval_routing_stats = RoutingStats(moe.num_experts), RoutingStats(moe.num_experts)

    def pipeline_stage(self, layers: range) -> GPT:
        """This model cut to `layers`: built on the meta device and materialised after the cut (or whole), so
        every stage starts from the single-process weights.

        The stage shares this model's modules and names; the embeddings go with layer 0, the norm and head
        with the last layer. A weight tied across stages (the embedding and LM head) becomes the last
        stage's own copy, whose gradient is summed with the first stage's (moetrain.parallel.pipeline).
        """
        if not (0 <= layers.start < layers.stop <= self.cfg.num_layers and layers.step == 1):
            raise ValueError(f"pipeline stage layers {layers} are not a run of the {self.cfg.num_layers} layers")
        first, last = layers.start == 0, layers.stop == self.cfg.num_layers
        stage = GPT.__new__(GPT)
        nn.Module.__init__(stage)
        stage.cfg, stage.moe_cfg, stage.init_seed = self.cfg, self.moe_cfg, self.init_seed
        stage.tok_emb, stage.pos_emb, stage.drop = (self.tok_emb, self.pos_emb, self.drop) if first else (None,) * 3
        stage.blocks = LayerStack({i: self.blocks[i] for i in layers})
        stage.norm, stage.lm_head = (self.norm, self.lm_head) if last else (None, None)
        held = dict(stage.named_parameters(remove_duplicate=False))
        for alias, stored in stage.tied_parameters().items():
            if alias in held and stored not in held:
                module_name, _, param_name = alias.rpartition(".")
                tied = held[alias]
                setattr(stage.get_submodule(module_name), param_name,
                        nn.Parameter(tied.detach().clone(), requires_grad=tied.requires_grad))
        if self.cfg.style == "llama":
            stage.register_buffer("rope_cos", self.rope_cos, persistent=False)
            stage.register_buffer("rope_sin", self.rope_sin, persistent=False)
        return stage

    def tied_parameters(self) -> dict[str, str]:
        """Tied weights: parameter name -> the name of the parameter it shares a tensor with. In a pipeline
        stage the two may sit on different stages; checkpoints store a tied tensor once."""
        return tied_weights(self.cfg)

    def tp_plan(self) -> dict[str, TPSplit]:
        """The linears tensor parallelism splits: each attention's q|k|v (by column, whole heads and key/value
        heads) and output projection (by row), and each dense MLP (fc1 by column, fc2 by row); routed experts
        are not split. Per-head QK norms stay whole on every rank."""
        plan = {}
        for name, module in self.named_modules():
            if isinstance(module, Attention):
                plan[f"{name}.qkv"], plan[f"{name}.proj"] = TPSplit("column", module.qkv_parts()), TPSplit("row")
                if module.qk_norm == "head":
                    plan[f"{name}.q_norm"] = plan[f"{name}.k_norm"] = TPSplit("head_norm")
            elif isinstance(module, LatentAttention):
                query = "q_up" if module.low_rank_query else "q_proj"
                plan[f"{name}.{query}"], plan[f"{name}.kv_up"] = TPSplit("column"), TPSplit("column")
                plan[f"{name}.proj"], plan[name] = TPSplit("row"), TPSplit("shared_key")
            elif isinstance(module, MLP):
                fused = (1, 1) if module.activation == "swiglu" else (1,)
                plan[f"{name}.fc1"], plan[f"{name}.fc2"] = TPSplit("column", fused), TPSplit("row")
        return plan

    def moe_layers(self) -> list[tuple[int, MoE]]:
        """(index in the whole model, layer) of each MoE layer this model (or stage) holds."""
        return [(i, b.ffn) for i, b in self.blocks.items() if isinstance(b.ffn, MoE)]

    def forward(self, input_ids: Tensor, targets: Tensor | None = None, token_mask: Tensor | None = None,
                routing_key: Tensor | None = None) -> ModelOutput:
        """`token_mask` [B, T] (False for padding) keeps padded positions out of MoE routing; `routing_key`
        (moetrain.moe.routing_noise.routing_key, from the trainer) keys the routing noise by global token
        position, so every layout and micro-batch split routes alike (without it: torch's RNG)."""
        if input_ids.shape[1] > self.cfg.positions():
            raise ValueError(f"sequence of {input_ids.shape[1]} tokens exceeds seq_length {self.cfg.seq_length} and "
                             f"max_position_embeddings {self.cfg.positions()}")
        hidden, aux, z = self.forward_stage(input_ids, token_mask, routing_key)
        output = ModelOutput(hidden, self.lm_head.weight, None, aux, z, routing_key, self.cfg.vocab_size)
        if targets is not None:
            output.lm_loss = output.loss_of(targets)
        return output

    def forward_stage(self, x: Tensor, token_mask: Tensor | None = None,
                      routing_key: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """Token ids (or a later stage's hidden states) -> hidden states for the next stage (the last
        stage: the final norm's output, the LM head's input), with the summed (unscaled) aux and z
        losses of this model's MoE layers."""
        if self.tok_emb is not None:
            x = self.embed(x)
        x, aux, z = self.run_blocks(x, token_mask, routing_key)
        if self.norm is not None:
            x = self.norm(x)
        return x, aux, z

    def embed(self, input_ids: Tensor) -> Tensor:
        x = self.tok_emb(input_ids)
        if self.pos_emb is not None:
            x = x + self.pos_emb(torch.arange(input_ids.shape[1], device=input_ids.device))
        return self.drop(x)

    def run_blocks(self, x: Tensor, token_mask: Tensor | None = None,
                   routing_key: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """x through the blocks, with the summed (unscaled) aux and z losses of their MoE layers; under full
        recomputation the units of `recompute_units` keep only their input for backward."""
        rope = (self.rope_cos, self.rope_sin) if self.cfg.style == "llama" else None
        aux_terms, z_terms = [], []
        for blocks, recompute in self.recompute_units():
            if recompute:
                x, aux, z = recomputed(_run_units, blocks, x, rope, token_mask, routing_key)
            else:
                x, aux, z = _run_units(blocks, x, rope, token_mask, routing_key)
            aux_terms += aux
            z_terms += z
        zero = x.new_zeros((), dtype=torch.float32)
        aux = torch.stack(aux_terms).sum() if aux_terms else zero
        z = torch.stack(z_terms).sum() if z_terms else zero
        return x, aux, z

    def recompute_units(self) -> list[tuple[list[Block], bool]]:
        """This model's blocks in runs, each with whether full recomputation checkpoints it (Megatron's
        methods: uniform, every run of `recompute_num_layers` blocks; block, the first that many blocks
        of the stage one by one, the rest not). No recomputation outside training with gradients."""
        blocks, cfg = list(self.blocks), self.cfg
        if cfg.recompute_granularity != "full" or not (self.training and torch.is_grad_enabled()):
            return [(blocks, False)] if blocks else []
        n = cfg.recompute_num_layers
        if cfg.recompute_method == "block":
            return [([b], True) for b in blocks[:n]] + ([(blocks[n:], False)] if blocks[n:] else [])
        return [(blocks[i:i + n], True) for i in range(0, len(blocks), n)]

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
