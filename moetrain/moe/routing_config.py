"""RoutingConfig: every routing option of an MoE layer, once, checked when it is built.

The command line reaches it through `MoEConfig.routing()` (moetrain/config/sections.py: a field of the
same name there declares the flag); `Router(hidden_size, num_experts, routing)` and
`MoE(hidden_size, num_experts=..., routing=...)` read it; DeepSpeed's flat `MoE(..., k=2, capacity_factor=...)`
builds one from its keywords. A new routing option is one field here (with its check in `__post_init__` if
it needs one), the MoEConfig field that carries its flag, and its use in the router.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from moetrain.moe.balance import BALANCE_TYPES

NOISY_GATE_POLICIES = (None, "Jitter", "RSample")
SCORE_FUNCS = ("softmax", "sigmoid")
DROP_POLICIES = ("position", "probs", "random", "unordered")
ROUTER_DTYPES = {"fp32": torch.float32, "fp64": torch.float64}
DEEPSPEED_LOSS = "deepspeed"  # the load-balancing "type" of DeepSpeed's l_aux, used when none is chosen


@dataclass(frozen=True)
class RoutingConfig:
    """How an MoE layer routes its tokens. DeepSpeed-MoE's gate arguments come first, with its names and
    defaults; `noisy_gate_policy`, `use_rts` and `top2_2nd_expert_sampling` are read by TopKRouter (DeepSpeed's
    gate) only. `load_balancing_type` and `load_balancing_coeffs` become tuples: one type per loss, DeepSpeed's
    l_aux ('deepspeed') when none is given, coefficient 1 each when none are given."""

    k: int = 1
    capacity_factor: float = 1.0  # in training
    eval_capacity_factor: float = 1.0
    min_capacity: int = 4
    noisy_gate_policy: str | None = None  # None | 'Jitter' (input jitter, eps 1e-2) | 'RSample' (Gumbel, top-1)
    drop_tokens: bool = True
    use_rts: bool = True  # top-1 keeps a random selection of the tokens over capacity
    top2_2nd_expert_sampling: bool = True
    score_func: str = "softmax"
    drop_policy: str | None = None  # None: DeepSpeed's choice for k
    expert_bias: bool = False  # aux-loss-free balancing (DeepSeek-V3)
    expert_bias_update_rate: float = 1e-3
    load_balancing_type: Sequence[str] | str | None = None
    load_balancing_coeffs: Sequence[float] | None = None
    num_groups: int | None = None  # group-limited routing (DeepSeek-V2/V3)
    group_topk: int | None = None
    pre_softmax: bool = False
    topk_scaling_factor: float | None = None
    input_jitter_eps: float | None = None
    router_dtype: str = "fp32"
    pad_expert_input_to_capacity: bool = False

    def __post_init__(self) -> None:
        if self.noisy_gate_policy == "None":  # DeepSpeed accepts the string too
            object.__setattr__(self, "noisy_gate_policy", None)
        types = self.load_balancing_type
        types = (DEEPSPEED_LOSS,) if types is None else (types,) if isinstance(types, str) else tuple(types)
        coeffs = (1.0,) * len(types) if self.load_balancing_coeffs is None else tuple(self.load_balancing_coeffs)
        object.__setattr__(self, "load_balancing_type", types)
        object.__setattr__(self, "load_balancing_coeffs", coeffs)
        self._check()

    def _check(self) -> None:
        """One-line errors for values out of range and options that cannot work together (those Megatron-Core
        refuses too); what depends on a layer's expert count is `check_experts`."""
        k, types = self.k, self.load_balancing_type
        if k < 1:
            raise ValueError(f"--topk must be at least 1, got k={k}")
        for name in ("capacity_factor", "eval_capacity_factor"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}; use e.g. 1.0 or 1.25")
        if self.min_capacity < 0:
            raise ValueError(f"min_capacity must be >= 0, got {self.min_capacity}")
        if self.noisy_gate_policy not in NOISY_GATE_POLICIES:
            raise ValueError(f"unknown noisy_gate_policy {self.noisy_gate_policy!r}; use None, 'Jitter' or 'RSample'")
        if self.drop_policy not in (None, *DROP_POLICIES):
            raise ValueError(f"unknown drop_policy {self.drop_policy!r}; choose one of {DROP_POLICIES}")
        if self.score_func not in SCORE_FUNCS:
            raise ValueError(f"unknown score_func {self.score_func!r}; choose one of {SCORE_FUNCS}")
        if self.router_dtype not in ROUTER_DTYPES:
            raise ValueError(f"unknown router dtype {self.router_dtype!r}; choose one of {', '.join(ROUTER_DTYPES)}")
        for name in types:
            if name not in (*BALANCE_TYPES, DEEPSPEED_LOSS):
                raise ValueError(f"unknown load-balancing type {name!r}; choose from {', '.join(BALANCE_TYPES)}")
        if len(set(types)) != len(types):
            raise ValueError(f"load-balancing types {list(types)} repeat one; give each type once")
        if len(self.load_balancing_coeffs) != len(types):
            raise ValueError(f"{len(self.load_balancing_coeffs)} load-balancing coefficients for {len(types)} types "
                             f"{list(types)}; give one coefficient per type")
        if (self.num_groups is None) != (self.group_topk is None):
            raise ValueError("group-limited routing needs both --moe-router-num-groups and --moe-router-group-topk")
        if self.num_groups is not None:
            if not 1 <= self.group_topk <= self.num_groups:
                raise ValueError(f"--moe-router-group-topk {self.group_topk} must be between 1 and the "
                                 f"{self.num_groups} groups; lower it or add groups")
            if "sinkhorn" in types:
                raise ValueError("sinkhorn routing ignores groups; drop --moe-router-num-groups or use another "
                                 "load-balancing type")
        if "sinkhorn" in types and k != 1:
            raise ValueError(f"sinkhorn routing is top-1 only (got top-{k}); use --moe-router-topk 1 or aux_loss")
        if "sinkhorn" in types and self.expert_bias:
            raise ValueError("sinkhorn routing does not use the expert bias; drop --moe-router-enable-expert-bias")
        if self.pre_softmax and self.score_func != "softmax":
            raise ValueError("--moe-router-pre-softmax applies to softmax scores; drop it or use softmax")
        if self.pre_softmax and k == 1 and self.expert_bias:
            raise ValueError("--moe-router-pre-softmax with top-1 and the expert bias weighs a choice the bias "
                             "made by its unbiased probability; drop the pre-softmax or the expert bias")
        if self.topk_scaling_factor is not None and not self.topk_scaling_factor > 0:
            raise ValueError(f"--moe-router-topk-scaling-factor must be positive, got {self.topk_scaling_factor}")
        if self.input_jitter_eps is not None and not 0 <= self.input_jitter_eps < 1:
            raise ValueError(f"--moe-input-jitter-eps must be in [0, 1), got {self.input_jitter_eps}")
        if self.pad_expert_input_to_capacity and not self.drop_tokens:
            raise ValueError("--moe-pad-expert-input-to-capacity needs a capacity to pad to; drop "
                             "--disable-moe-token-dropping (dropless routing has none)")

    def check_experts(self, num_experts: int, layer: int | None = None) -> None:
        """One-line errors for a layer of `num_experts` experts (model layer `layer`, when known) this routing
        cannot serve."""
        k, where = self.k, "" if layer is None else f" of layer {layer}"
        if k > num_experts:
            raise ValueError(f"--topk {k} exceeds the {num_experts} experts{where} "
                             f"(k={k} > num_experts={num_experts}); lower the top-k or add experts")
        if self.num_groups is not None:
            if num_experts % self.num_groups:
                raise ValueError(f"--moe-router-num-groups {self.num_groups} does not divide the {num_experts} "
                                 "experts; use a divisor of the expert count")
            reachable = self.group_topk * (num_experts // self.num_groups)
            if k > reachable:
                raise ValueError(f"top-{k} exceeds the {reachable} experts of the {self.group_topk} chosen groups; "
                                 "raise --moe-router-group-topk or lower the top-k")

    @property
    def dtype(self) -> torch.dtype:
        """The router's compute dtype."""
        return ROUTER_DTYPES[self.router_dtype]

    @property
    def sinkhorn(self) -> bool:
        """Sinkhorn routing (Megatron-Core): top-1 chosen on doubly normalised scores in training."""
        return "sinkhorn" in self.load_balancing_type
