"""Sparse upcycling (Komatsuzaki et al. 2022): a dense checkpoint -> an MoE checkpoint that starts where it was.

Every chosen layer's FFN is copied into each of its experts; attention, norms and embeddings are kept.
With k >= 2 the top-k weights are renormalised to sum to 1 and every expert computes the same function,
so the upcycled model computes the dense model's output whatever the router says: its step-0 loss equals
the dense model's (as long as no token is dropped: use dropless routing or enough capacity). A residual
MoE (PR-MoE) gets the FFN as its dense branch too, and keeps that property. Top-1 is refused: DeepSpeed's
top-1 weights the expert output by its gate probability (1/E for a fresh router), which would shrink
every FFN output at step 0.

The router starts at zero (every expert equally likely; the first choice goes to the lowest index until the
router learns) or small random values; optional noise on each copy breaks the experts' symmetry, at the price of
the exact start.
"""

from __future__ import annotations

import torch
from torch import Tensor

from moetrain.checkpoint import load_model
from moetrain.config import Config, MoEConfig
from moetrain.interop.checkpoint import check_new_checkpoint_dir, save_model_checkpoint
from moetrain.model import GPT

ROUTER_INITS = ("zeros", "random")


def upcycle(dense_dir: str, out_dir: str, moe: MoEConfig, *, router_init: str = "random",
            router_init_std: float = 0.02, expert_noise: float = 0.0, seed: int = 1234) -> tuple[Config, str]:
    """Write the MoE version of the dense checkpoint in `dense_dir` to `out_dir`; return its config and path.

    `moe` gives the MoE layout (experts, interval, top-k, routing); `expert_noise` adds Gaussian noise of that
    many standard deviations of each copied matrix to every expert's copy.
    """
    if router_init not in ROUTER_INITS:
        raise ValueError(f"router init {router_init!r} is not one of {', '.join(ROUTER_INITS)}")
    if expert_noise < 0 or router_init_std < 0:
        raise ValueError("--expert-noise and --router-init-std must be non-negative")
    check_new_checkpoint_dir(out_dir)
    dense_model, tokenizer, cfg = load_model(dense_dir)
    if cfg.moe.is_moe:
        raise ValueError(f"{dense_dir} holds an MoE model (experts {cfg.experts_per_layer()}); upcycle a dense one")
    if not moe.is_moe:
        raise ValueError("--num-experts must be at least 2 for an MoE model")
    if moe.topk < 2:
        raise ValueError("upcycling needs --topk 2 or more: top-1 gating scales the copied FFN by its gate "
                         "probability (1/E at the start), so the MoE model would not start from the dense one")
    if moe.num_shared_experts:
        raise ValueError("upcycling copies the dense FFN into the routed experts; shared experts would add it a "
                         "second time, drop --num-shared-experts")
    if moe.expert_ffn_size(cfg.model) != cfg.model.ffn_size():
        raise ValueError(f"--moe-ffn-hidden-size {moe.expert_ffn_hidden_size} differs from the dense FFN width "
                         f"{cfg.model.ffn_size()}; experts are copies of the dense FFN, drop the flag")
    cfg.moe = moe
    cfg.validate()

    with torch.random.fork_rng(devices=[]):  # seeded, without touching the caller's random state
        torch.manual_seed(seed)
        moe_model = GPT(cfg.model, cfg.moe)  # fresh router (and PR-MoE coefficient) weights
        state = _upcycled_state(moe_model, dense_model.state_dict(), router_init, router_init_std, expert_noise)
    return cfg, save_model_checkpoint(out_dir, cfg, state, tokenizer)


def _upcycled_state(moe_model: GPT, dense: dict[str, Tensor], router_init: str, router_init_std: float,
                    expert_noise: float) -> dict[str, Tensor]:
    """moe_model's state dict with the dense weights copied in: shared parts as they are, each FFN into its experts."""
    state = moe_model.state_dict()
    for name in state:
        if name in dense:  # embeddings, attention, norms, the FFN of layers that stay dense
            state[name] = dense[name]
    for i, layer in moe_model.moe_layers():
        ffn = f"blocks.{i}.ffn."
        fc1, fc2 = dense[ffn + "fc1.weight"], dense[ffn + "fc2.weight"]
        copies = {"experts.w1": fc1.t(), "experts.w2": fc2.t(), "experts.b1": dense.get(ffn + "fc1.bias"),
                  "experts.b2": dense.get(ffn + "fc2.bias")}
        for name, value in copies.items():
            if value is not None:
                state[ffn + name] = _copies(value, layer.num_experts, expert_noise if value.dim() == 2 else 0.0)
        if layer.use_residual:
            for name in ("fc1.weight", "fc2.weight", "fc1.bias", "fc2.bias"):
                if ffn + name in dense:
                    state[ffn + "mlp." + name] = dense[ffn + name]
        router = state[ffn + "router.wg.weight"]
        state[ffn + "router.wg.weight"] = torch.zeros_like(router) if router_init == "zeros" else \
            torch.randn_like(router) * router_init_std
    return state


def _copies(weight: Tensor, num_experts: int, noise: float) -> Tensor:
    """`num_experts` copies of weight, stacked; each plus N(0, (noise * std(weight))^2) when noise > 0."""
    stacked = weight.unsqueeze(0).repeat(num_experts, *([1] * weight.dim()))
    if noise > 0:
        stacked += torch.randn_like(stacked) * noise * weight.float().std()
    return stacked
