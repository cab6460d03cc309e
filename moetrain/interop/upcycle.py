"""Sparse upcycling (Komatsuzaki et al. 2022): a dense checkpoint -> an MoE checkpoint that starts where it was.

Every chosen layer's FFN is copied into each of its experts; attention, norms and embeddings are kept.
With k >= 2 the top-k weights are renormalised to sum to 1 and every expert computes the same function,
so the upcycled model computes the dense model's output whatever the router says: its step-0 loss equals
the dense model's (as long as no token is dropped: use dropless routing or enough capacity). A residual
MoE (PR-MoE) gets the FFN as its dense branch too, and keeps that property. Top-1 is refused: DeepSpeed's
top-1 weights the expert output by its gate probability (1/E for a fresh router), which would shrink
every FFN output at step 0.

Granular upcycling (Megatron-Core's --moe-upcycling-granularity G, He et al. 2024) splits the dense FFN's
hidden units into G equal pieces before copying: expert e holds piece e mod G, so every G consecutive experts
make one whole FFN (a virtual expert), and the experts are G times narrower at equal active parameters. The
router gives the G experts of a virtual expert the same row, so a top-k that is a multiple of G takes whole
virtual experts; their renormalised weights sum to 1/G each, which a factor G on each expert's output
projection makes up. Step 0 again computes the dense model's output.

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
            router_init_std: float = 0.02, expert_noise: float = 0.0, seed: int = 1234,
            granularity: int = 1) -> tuple[Config, str]:
    """Write the MoE version of the dense checkpoint in `dense_dir` to `out_dir`; return its config and path.

    `moe` gives the MoE layout (experts, interval, top-k, routing); `expert_noise` adds Gaussian noise of that
    many standard deviations of each copied matrix to every expert's copy; `granularity` G cuts the FFN into G
    pieces, one per expert (the expert width defaults to the FFN width / G).
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
    _check_granularity(granularity, moe, cfg, router_init)
    if moe.expert_ffn_hidden_size is None and granularity > 1:
        moe.expert_ffn_hidden_size = cfg.model.ffn_size() // granularity
    if moe.expert_ffn_size(cfg.model) * granularity != cfg.model.ffn_size():
        raise ValueError(f"--moe-ffn-hidden-size {moe.expert_ffn_hidden_size} differs from the dense FFN width "
                         f"{cfg.model.ffn_size()} / granularity {granularity}; experts are pieces of the dense FFN, "
                         "drop the flag")
    cfg.moe = moe
    cfg.validate()

    with torch.random.fork_rng(devices=[]):  # seeded, without touching the caller's random state
        torch.manual_seed(seed)
        moe_model = GPT(cfg.model, cfg.moe)  # fresh router (and PR-MoE coefficient) weights
        state = _upcycled_state(moe_model, dense_model.state_dict(), router_init, router_init_std, expert_noise,
                                granularity)
    return cfg, save_model_checkpoint(out_dir, cfg, state, tokenizer)


def _check_granularity(granularity: int, moe: MoEConfig, cfg: Config, router_init: str) -> None:
    if granularity < 1:
        raise ValueError(f"--granularity must be at least 1, got {granularity}")
    if granularity == 1:
        return
    if cfg.model.ffn_size() % granularity:
        raise ValueError(f"--granularity {granularity} does not divide the dense FFN width {cfg.model.ffn_size()}")
    if moe.topk % granularity or any(count % granularity for count in moe.num_experts):
        raise ValueError(f"--granularity {granularity} must divide --topk {moe.topk} and every expert count "
                         f"{moe.num_experts}: a token takes whole FFNs of {granularity} pieces")
    if moe.topk == 2 and moe.top2_2nd_expert_sampling:
        raise ValueError("granular upcycling with top-2 needs --disable-moe-top2-2nd-expert-sampling: a sampled "
                         "second expert need not be the other piece of the first one's FFN")
    if router_init == "zeros" or moe.mlp_type == "residual":
        raise ValueError("granular upcycling needs --router-init random and no residual MoE: a zero router ties "
                         "pieces of different FFNs")


def _upcycled_state(moe_model: GPT, dense: dict[str, Tensor], router_init: str, router_init_std: float,
                    expert_noise: float, granularity: int = 1) -> dict[str, Tensor]:
    """moe_model's state dict with the dense weights copied in: shared parts as they are, each FFN into its experts
    (in `granularity` pieces, expert e holding piece e mod G, its output projection scaled by G)."""
    state = moe_model.state_dict()
    for name in state:
        if name in dense:  # embeddings, attention, norms, the FFN of layers that stay dense
            state[name] = dense[name]
    for i, layer in moe_model.moe_layers():
        ffn = f"blocks.{i}.ffn."
        fc1, fc2, b1 = dense[ffn + "fc1.weight"], dense[ffn + "fc2.weight"], dense.get(ffn + "fc1.bias")
        fused = 2 if layer.experts.w1.shape[-1] == 2 * layer.experts.w2.shape[1] else 1  # swiglu: [gate; up]
        pieces = {"experts.w1": _pieces(fc1, granularity, fused), "experts.w2": _pieces(fc2.t(), granularity, 1),
                  "experts.b1": None if b1 is None else _pieces(b1, granularity, fused)}
        for name, per_piece in pieces.items():
            if per_piece is not None:
                per_expert = [per_piece[e % granularity] for e in range(layer.num_experts)]
                stacked = torch.stack([p.t() if name == "experts.w1" else p for p in per_expert])
                if name == "experts.w2":
                    stacked = stacked * granularity
                state[ffn + name] = _noised(stacked, expert_noise if stacked.dim() == 3 else 0.0)
        if ffn + "fc2.bias" in dense:
            state[ffn + "experts.b2"] = _noised(dense[ffn + "fc2.bias"].expand(layer.num_experts, -1).clone(), 0.0)
        if layer.use_residual:
            for name in ("fc1.weight", "fc2.weight", "fc1.bias", "fc2.bias"):
                if ffn + name in dense:
                    state[ffn + "mlp." + name] = dense[ffn + name]
        router = state[ffn + "router.wg.weight"]
        virtual = router[::granularity]  # one row per whole FFN, shared by its pieces
        rows = torch.zeros_like(virtual) if router_init == "zeros" else torch.randn_like(virtual) * router_init_std
        state[ffn + "router.wg.weight"] = rows.repeat_interleave(granularity, dim=0)
    return state


def _pieces(rows: Tensor, granularity: int, fused: int) -> list[Tensor]:
    """The G pieces of a weight's (or bias's) rows, each of the `fused` stacked parts ([gate; up]) cut alike."""
    parts = [part.chunk(granularity) for part in rows.chunk(fused)]
    return [torch.cat([part[g] for part in parts]) for g in range(granularity)]


def _noised(stacked: Tensor, noise: float) -> Tensor:
    """Every expert's copy plus N(0, (noise * std of the copy)^2) when noise > 0."""
    if noise > 0:
        stacked = stacked + torch.randn_like(stacked) * noise * stacked[0].float().std()
    return stacked
