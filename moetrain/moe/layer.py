"""The MoE layer: router -> dispatcher -> experts -> combine, plus shared experts and PR-MoE.

A drop-in for `deepspeed.moe.layer.MoE`: same constructor arguments, same defaults, same
`(output, l_aux, exp_counts)` result. The routing arguments become one `RoutingConfig`.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from moetrain.moe.dispatcher import TokenDispatcher
from moetrain.moe.experts import MLP, GroupedExperts, ModuleExperts
from moetrain.moe.router import Router, TopKRouter
from moetrain.moe.routing_config import RoutingConfig
from moetrain.moe.routing_noise import noise_for
from moetrain.moe.stats import RoutingStats


class MoEOutput(NamedTuple):
    """Everything one forward of the layer produces."""

    output: Tensor  # same shape and dtype as the input
    l_aux: Tensor  # scalar float32: load-balancing loss
    z_loss: Tensor  # scalar float32: router z-loss (ST-MoE), unscaled
    exp_counts: Tensor  # [E] int64: assignments per expert before dropping


class MoE(nn.Module):
    """Mixture-of-Experts FFN.

    Two ways to build it: `MoE(hidden_size, num_experts=8, routing=RoutingConfig(k=2, ...))`, or DeepSpeed's
    flat keywords `MoE(hidden_size, expert, num_experts=8, ep_size=1, k=2, capacity_factor=1.25, ...)`: every
    keyword not named below is a `RoutingConfig` field (DeepSpeed's gate arguments, then moetrain's and
    Megatron-Core's routing options: score function, drop policy, expert bias, load-balancing types, groups,
    pre-softmax, top-k scaling, input jitter, router dtype, padding to capacity), and builds the config.

    With `expert=None` the experts are built in as stacked weights of width `ffn_hidden_size`
    (default 4 * hidden_size) and run as grouped GEMMs; any other `nn.Module` mapping
    [n, hidden] -> [n, hidden] is deep-copied once per expert. Beyond DeepSpeed: `num_shared_experts`
    (dense experts every token goes through), `shared_expert_ffn_size` and `shared_expert_gate` (Qwen2-MoE's
    sigmoid-gated shared expert), `router` (a `Router` subclass, built with the routing, or an instance, whose
    own routing the layer then follows), `ep_group` (expert-parallel process group), `dp_group` (for
    global_aux_loss), `layer_index` (the layer's place in the model, which keys its routing noise). With
    `expert_bias` call `update_expert_bias()` after each optimizer step. `forward(x, with_z_loss=True)` returns
    an `MoEOutput` that carries the router z-loss too; routing statistics accumulate in `routing_stats`
    (training) and `eval_routing_stats` (eval mode).

    Precision: the router computes in float32 whatever the autocast state; the experts in the
    autocast dtype (else their parameters' dtype). On one device the forward and backward never
    wait for the host (no `.item()`-like synchronisation), so they compile into one graph.
    """

    def __init__(
        self,
        hidden_size: int,
        expert: nn.Module | None = None,
        num_experts: int = 1,
        ep_size: int = 1,
        *,
        routing: RoutingConfig | None = None,
        use_residual: bool = False,
        ffn_hidden_size: int | None = None,
        activation: str = "gelu",
        ffn_bias: bool = False,
        num_shared_experts: int = 0,
        router: Router | type[Router] | None = None,
        ep_group: dist.ProcessGroup | None = None,
        init_std: float = 0.02,
        shared_expert_ffn_size: int | None = None,
        shared_expert_gate: bool = False,
        dp_group: dist.ProcessGroup | None = None,
        layer_index: int = 0,
        **routing_options: Any,
    ) -> None:
        super().__init__()
        if num_experts < 1:
            raise ValueError(f"num_experts must be >= 1, got {num_experts}")
        if ep_size < 1 or num_experts % ep_size:
            raise ValueError(
                f"num_experts={num_experts} is not divisible by ep_size={ep_size}; "
                f"use a multiple of {ep_size} experts or a smaller ep_size"
            )
        if ep_size > 1 and ep_group is None:
            raise ValueError(
                f"ep_size={ep_size} needs ep_group, the process group of the {ep_size} ranks that "
                "share this layer's experts"
            )
        if ep_group is not None and dist.get_world_size(ep_group) != ep_size:
            raise ValueError(
                f"ep_group has {dist.get_world_size(ep_group)} ranks but ep_size={ep_size}; "
                "pass the group of ep_size ranks that share this layer's experts"
            )
        if isinstance(router, Router):
            if routing is not None or routing_options:
                raise TypeError("a Router instance routes by its own RoutingConfig; drop routing= and the "
                                f"routing keywords {sorted(routing_options)}")
            self.router = router
        else:
            if routing is not None and routing_options:
                raise TypeError(f"routing= and the routing keywords {sorted(routing_options)} both given; "
                                "pass one RoutingConfig, or its fields as keywords")
            routing = routing if routing is not None else RoutingConfig(**routing_options)
            self.router = (router or TopKRouter)(hidden_size, num_experts, routing)
        self.hidden_size = hidden_size
        self.num_experts = num_experts
        self.ep_size = ep_size
        self.num_local_experts = num_experts // ep_size
        self.first_expert = 0  # global index of this rank's first expert (set by shard_experts)
        self.layer_index = layer_index
        ffn_hidden_size = ffn_hidden_size or 4 * hidden_size
        self.dispatcher = TokenDispatcher(num_experts, ep_group)
        if expert is None:
            self.experts = GroupedExperts(self.num_local_experts, hidden_size, ffn_hidden_size,
                                          activation, bias=ffn_bias, init_std=init_std)
        else:
            self.experts = ModuleExperts(expert, self.num_local_experts)
        self.router.balance_group = dp_group
        if shared_expert_ffn_size is None and num_shared_experts:
            shared_expert_ffn_size = num_shared_experts * ffn_hidden_size
        self.shared_experts = (
            MLP(hidden_size, shared_expert_ffn_size, activation, bias=ffn_bias) if shared_expert_ffn_size else None
        )
        if shared_expert_gate and self.shared_experts is None:
            raise ValueError("shared_expert_gate needs a shared expert; set num_shared_experts or "
                             "shared_expert_ffn_size")
        # Qwen2-MoE: the shared expert's output scaled by sigmoid(x . w), one gate value per token
        self.shared_expert_gate = nn.Linear(hidden_size, 1, bias=False) if shared_expert_gate else None
        self.balance_losses: dict[str, Tensor] = {}  # the last forward's, per load-balancing type
        self.use_residual = use_residual
        if use_residual:
            # PR-MoE: a dense MLP beside the experts, mixed in by a learned two-way coefficient.
            self.mlp = expert if expert is not None else MLP(hidden_size, ffn_hidden_size,
                                                             activation, bias=ffn_bias)
            self.coefficient = nn.Linear(hidden_size, 2)
        self.routing_stats = RoutingStats(num_experts)  # training forwards
        self.eval_routing_stats = RoutingStats(num_experts)  # eval-mode forwards

    def forward(self, hidden_states: Tensor, *, with_z_loss: bool = False, token_mask: Tensor | None = None,
                routing_key: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor] | MoEOutput:
        """DeepSpeed's (output, l_aux, exp_counts); with `with_z_loss` an `MoEOutput` that adds
        the router z-loss. `token_mask` (hidden_states.shape[:-1], False for padding) keeps
        padding out of routing: its rows get no routed experts, and statistics, losses and
        capacity are those of the other rows alone. `routing_key` (moetrain.moe.routing_noise.routing_key)
        keys the routing noise by global token position; without it the noise comes from torch's RNG
        as DeepSpeed draws it."""
        if hidden_states.shape[-1] != self.hidden_size:
            raise ValueError(
                f"MoE input has hidden size {hidden_states.shape[-1]} but the layer was built "
                f"for {self.hidden_size}; build MoE(hidden_size={hidden_states.shape[-1]}, ...)"
            )
        x = hidden_states.reshape(-1, self.hidden_size)
        # sequences run along the second-to-last dimension ([B, T, d]; [S, d] is one sequence)
        seq = hidden_states.shape[-2] if hidden_states.dim() > 1 else 1
        batch_shape = (x.shape[0] // max(seq, 1), seq)
        mask = None if token_mask is None else token_mask.reshape(-1).to(device=x.device, dtype=torch.bool)
        noise = noise_for(routing_key, self.layer_index, batch_shape[1])
        decision = self.router(x, batch_shape, mask, noise)
        rows, plan = self.dispatcher.dispatch(x, decision)
        expert_rows = self.experts(rows, plan.blocks, plan.weights)
        output = self.dispatcher.combine(expert_rows, plan, x.shape[0]).to(x.dtype)
        if self.shared_experts is not None:
            shared = self.shared_experts(x)
            if self.shared_expert_gate is not None:
                shared = shared * torch.sigmoid(self.shared_expert_gate(x))
            output = output + shared
        output = output.reshape(hidden_states.shape)
        if self.use_residual:
            residual = self.mlp(hidden_states)
            if isinstance(residual, tuple):
                residual = residual[0]
            coef = F.softmax(self.coefficient(hidden_states), dim=-1)
            output = output * coef[..., 0:1] + residual * coef[..., 1:]
        kept_counts = torch.zeros_like(decision.exp_counts).index_add_(
            0, decision.expert_indices.flatten(), decision.kept.flatten().long())
        stats = self.routing_stats if self.training else self.eval_routing_stats
        stats.record(decision.exp_counts, kept_counts, self._ranks_visited(decision.expert_indices, mask))
        if decision.token_entropy is not None:
            stats.record_entropy(decision.token_entropy, mask)
        self.balance_losses = {name: loss.detach() for name, loss in (decision.balance_losses or {}).items()}
        if self.training and self.balance_losses:
            stats.record_balance(torch.stack(list(self.balance_losses.values())))
        if with_z_loss:
            return MoEOutput(output, decision.l_aux, decision.z_loss, decision.exp_counts)
        return output, decision.l_aux, decision.exp_counts

    def _ranks_visited(self, indices: Tensor, mask: Tensor | None) -> Tensor | None:
        """[S] expert-parallel ranks each token's choices go to (None on one rank; 0 for padding):
        the number group-limited routing bounds when its groups align with the ranks."""
        if self.ep_size == 1:
            return None
        owner = torch.div(indices, self.num_local_experts, rounding_mode="floor")
        visits = torch.zeros(indices.shape[0], self.ep_size, dtype=torch.bool, device=indices.device)
        visits = visits.scatter_(1, owner, True).sum(1)
        return visits if mask is None else visits * mask

    def shard_experts(self, ep_rank: int, ep_group: dist.ProcessGroup | None,
                      split_tokens: bool = False) -> None:
        """Keep this rank's experts of the layer and exchange tokens over `ep_group`.

        Applied from outside (see moetrain.parallel), usually to a layer still on the meta device: only the
        kept experts are then materialised, with the single-process run's keyed initial weights.
        """
        ep_size = dist.get_world_size(ep_group) if ep_group is not None else 1
        if self.num_experts % ep_size:
            raise ValueError(f"num_experts={self.num_experts} is not divisible by the expert-parallel "
                             f"size {ep_size}; use a multiple of {ep_size} experts")
        self.ep_size, self.num_local_experts = ep_size, self.num_experts // ep_size
        self.first_expert = ep_rank * self.num_local_experts
        self.experts.keep(self.first_expert, self.first_expert + self.num_local_experts)
        self.dispatcher = TokenDispatcher(self.num_experts, ep_group, split_tokens)

    @property
    def routing(self) -> RoutingConfig:
        return self.router.routing

    @property
    def k(self) -> int:
        """Experts each token is routed to."""
        return self.router.routing.k

    def update_expert_bias(self) -> None:
        """Aux-loss-free balancing step (no-op unless built with expert_bias=True)."""
        self.router.update_expert_bias()
