"""The MoE layer, split along its data flow: router -> dispatcher -> experts -> combine."""

from moetrain.moe.deepspeed_compat import from_deepspeed_state_dict
from moetrain.moe.dispatcher import DispatchPlan, TokenDispatcher
from moetrain.moe.experts import (
    ACTIVATIONS,
    MLP,
    ExpertBlocks,
    GroupedExperts,
    ModuleExperts,
    grouped_gemm_backend,
    grouped_mm,
)
from moetrain.moe.layer import MoE, MoEOutput
from moetrain.moe.router import Router, RoutingDecision, TopKRouter, expert_capacity
from moetrain.moe.routing_config import DROP_POLICIES, NOISY_GATE_POLICIES, SCORE_FUNCS, RoutingConfig
from moetrain.moe.stats import RoutingStats

__all__ = [
    "ACTIVATIONS", "DROP_POLICIES", "NOISY_GATE_POLICIES", "SCORE_FUNCS", "DispatchPlan", "ExpertBlocks",
    "GroupedExperts", "MLP", "MoE", "MoEOutput", "ModuleExperts", "Router", "RoutingConfig", "RoutingDecision",
    "RoutingStats", "TokenDispatcher", "TopKRouter", "expert_capacity", "from_deepspeed_state_dict",
    "grouped_gemm_backend", "grouped_mm",
]
