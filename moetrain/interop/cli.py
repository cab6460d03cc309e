"""`moetrain export`, `moetrain import`, `moetrain upcycle`: argument parsing around moetrain.interop."""

from __future__ import annotations

import argparse

from moetrain.config import MoEConfig, add_model_args, add_moe_args
from moetrain.data import Tokenizer, build_tokenizer
from moetrain.interop.checkpoint import train_command


def _given_fields(namespace: argparse.Namespace) -> dict[str, object]:
    """The model/MoE flags given on the command line, as {"section.field": value}."""
    return {dest: value for dest, value in vars(namespace).items() if "." in dest}


def export_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="moetrain export", allow_abbrev=False,
                                     description="Write a moetrain checkpoint as a Hugging Face transformers model "
                                                 "directory (config.json, safetensors, tokenizer).")
    parser.add_argument("--load", required=True, help="moetrain checkpoint directory")
    parser.add_argument("--format", choices=("hf",), default="hf", help="output format (default: hf)")
    parser.add_argument("--out", required=True, help="new or empty output directory")
    parser.add_argument("--dropless", action="store_true",
                        help="export a model trained with capacity dropping or top-2 second-expert sampling with "
                             "plain dropless top-k routing (its outputs then differ where moetrain drops or samples)")
    args = parser.parse_args(argv)
    from moetrain.interop.hf import export_hf

    architecture = export_hf(args.load, args.out, dropless=args.dropless)
    print(f"wrote {args.out} ({architecture}); load it with "
          f"transformers.AutoModelForCausalLM.from_pretrained({args.out!r})")
    return 0


def _deepspeed_tokenizer(args: argparse.Namespace) -> Tokenizer:
    if args.tokenizer:
        return Tokenizer.load(args.tokenizer)
    if args.vocab_file or args.merge_file:
        return build_tokenizer("gpt2", vocab_file=args.vocab_file, merge_file=args.merge_file)
    raise ValueError("a DeepSpeed checkpoint carries no tokenizer; pass --tokenizer tokenizer.json or GPT-2's "
                     "--vocab-file and --merge-file")


def import_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="moetrain import", allow_abbrev=False,
                                     description="Convert a Hugging Face model directory or a Megatron-DeepSpeed MoE "
                                                 "checkpoint into a moetrain checkpoint that `moetrain train --load` "
                                                 "fine-tunes and `moetrain generate` samples from.")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--from-hf", metavar="DIR", help="local transformers model directory (Llama, Mistral, "
                                                         "Mixtral, Qwen2-MoE, ERNIE-4.5-MoE)")
    source.add_argument("--from-deepspeed", metavar="DIR", help="Megatron-DeepSpeed checkpoint directory")
    parser.add_argument("--out", required=True, help="moetrain checkpoint directory to create")
    deepspeed = parser.add_argument_group(
        "DeepSpeed checkpoints", "the model and MoE flags below override the Megatron args stored in the checkpoint")
    deepspeed.add_argument("--trust-checkpoint", action="store_true",
                           help="allow a full unpickle of the checkpoint: Megatron stores RNG states (numpy "
                                "objects) beside the weights, and unpickling can run code from the file")
    deepspeed.add_argument("--tokenizer", metavar="FILE", help="tokenizers JSON the model was trained with")
    deepspeed.add_argument("--vocab-file", help="or GPT-2's vocab.json ...")
    deepspeed.add_argument("--merge-file", help="... and merges.txt")
    add_model_args(parser)
    add_moe_args(parser)
    args = parser.parse_args(argv)
    overrides = _given_fields(args)
    if args.from_hf:
        if overrides or args.tokenizer or args.vocab_file or args.trust_checkpoint:
            raise ValueError("--from-hf takes everything from the model directory; drop the DeepSpeed options")
        from moetrain.interop.hf import import_hf

        cfg, path = import_hf(args.from_hf, args.out)
    else:
        from moetrain.interop.deepspeed import import_deepspeed

        cfg, path = import_deepspeed(args.from_deepspeed, args.out, _deepspeed_tokenizer(args),
                                     trust_checkpoint=args.trust_checkpoint, overrides=overrides)
    print(f"wrote {path}; fine-tune it with\n  {train_command(args.out, cfg)}")
    return 0


def upcycle_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="moetrain upcycle", allow_abbrev=False,
        description="Turn a dense checkpoint into an MoE one whose experts start as copies of the dense FFN (sparse "
                    "upcycling); MoE flags as for train, top-k defaults to 2.")
    parser.add_argument("--load", required=True, help="dense moetrain checkpoint directory")
    parser.add_argument("--out", required=True, help="MoE checkpoint directory to create")
    parser.add_argument("--router-init", choices=("zeros", "random"), default="random",
                        help="router weights: zeros (all experts equally likely) or N(0, std) (default: random)")
    parser.add_argument("--router-init-std", type=float, default=0.02, help="std of the random router (default: 0.02)")
    parser.add_argument("--expert-noise", type=float, default=0.0,
                        help="Gaussian noise on each expert copy, in standard deviations of the copied matrix, to "
                             "break the experts' symmetry (default: 0, an exact start)")
    parser.add_argument("--seed", type=int, default=1234, help="seed for the router and the noise")
    add_moe_args(parser)
    args = parser.parse_args(argv)
    moe = MoEConfig(topk=2)
    for dest, value in _given_fields(args).items():
        setattr(moe, dest.split(".")[1], value)
    from moetrain.interop.upcycle import upcycle

    cfg, path = upcycle(args.load, args.out, moe, router_init=args.router_init,
                        router_init_std=args.router_init_std, expert_noise=args.expert_noise, seed=args.seed)
    if moe.drop_tokens:
        print("note: capacity dropping is on; tokens over capacity skip the FFN, so the first steps can lose more "
              "than the dense model (--disable-moe-token-dropping gives an exact start)")
    print(f"wrote {path}; train it with\n  {train_command(args.out, cfg)}")
    return 0
