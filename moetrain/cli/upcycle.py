"""`moetrain upcycle`: a dense checkpoint into an MoE one whose experts start as copies of the dense FFN."""

from __future__ import annotations

import argparse

SUMMARY = "turn a dense checkpoint into an MoE one whose experts start as copies of the FFN"


def configure(parser: argparse.ArgumentParser) -> None:
    from moetrain.config import add_moe_args

    parser.description = ("Turn a dense checkpoint into an MoE one whose experts start as copies of the dense FFN "
                          "(sparse upcycling); MoE flags as for train, top-k defaults to 2.")
    parser.allow_abbrev = False
    parser.add_argument("--load", required=True, help="dense moetrain checkpoint directory")
    parser.add_argument("--out", required=True, help="MoE checkpoint directory to create")
    parser.add_argument("--router-init", choices=("zeros", "random"), default="random",
                        help="router weights: zeros (all experts equally likely) or N(0, std) (default: random)")
    parser.add_argument("--router-init-std", type=float, default=0.02, help="std of the random router (default: 0.02)")
    parser.add_argument("--expert-noise", type=float, default=0.0,
                        help="Gaussian noise on each expert copy, in standard deviations of the copied matrix, to "
                             "break the experts' symmetry (default: 0, an exact start)")
    parser.add_argument("--granularity", "--moe-upcycling-granularity", type=int, default=1,
                        help="granular upcycling (Megatron-Core's): cut the dense FFN into G pieces, one per expert, "
                             "so experts are G times narrower; G must divide --topk and the expert counts "
                             "(default: 1, whole copies)")
    parser.add_argument("--seed", type=int, default=1234, help="seed for the router and the noise")
    add_moe_args(parser)


def run(args: argparse.Namespace) -> int:
    from moetrain.config import MoEConfig, given_fields
    from moetrain.interop.checkpoint import train_command
    from moetrain.interop.upcycle import upcycle

    moe = MoEConfig(topk=2)
    for dest, value in given_fields(args).items():
        setattr(moe, dest.split(".")[1], value)
    cfg, path = upcycle(args.load, args.out, moe, router_init=args.router_init,
                        router_init_std=args.router_init_std, expert_noise=args.expert_noise, seed=args.seed,
                        granularity=args.granularity)
    if moe.drop_tokens:
        print("note: capacity dropping is on; tokens over capacity skip the FFN, so the first steps can lose more "
              "than the dense model (--disable-moe-token-dropping gives an exact start)")
    print(f"wrote {path}; train it with\n  {train_command(args.out, cfg)}")
    return 0
