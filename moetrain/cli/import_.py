"""`moetrain import`: a Hugging Face model or a Megatron-DeepSpeed MoE checkpoint into a moetrain checkpoint."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from moetrain.data import Tokenizer

SUMMARY = "convert a Hugging Face model or a Megatron-DeepSpeed MoE checkpoint into a checkpoint"


def configure(parser: argparse.ArgumentParser) -> None:
    from moetrain.config import add_model_args, add_moe_args

    parser.description = ("Convert a Hugging Face model directory or a Megatron-DeepSpeed MoE checkpoint into a "
                          "moetrain checkpoint that `moetrain train --load` fine-tunes and `moetrain generate` "
                          "samples from.")
    parser.allow_abbrev = False
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--from-hf", metavar="DIR", help="local transformers model directory (Llama, Mistral, "
                                                         "Mixtral, Qwen2-MoE, ERNIE-4.5-MoE, Qwen3-MoE, OLMoE, "
                                                         "GLM-4.5-MoE)")
    source.add_argument("--from-deepspeed", metavar="DIR", help="Megatron-DeepSpeed checkpoint directory")
    parser.add_argument("--out", required=True, help="moetrain checkpoint directory to create")
    deepspeed = parser.add_argument_group(
        "DeepSpeed checkpoints", "the model and MoE flags below override the Megatron args stored in the checkpoint")
    parser.add_argument("--trust-checkpoint", action="store_true",
                        help="allow a full unpickle of the checkpoint: Megatron stores RNG states (numpy objects) "
                             "beside the weights, a pytorch_model.bin may hold objects, and unpickling can run "
                             "code from the file")
    deepspeed.add_argument("--tokenizer", metavar="FILE", help="tokenizers JSON the model was trained with")
    deepspeed.add_argument("--vocab-file", help="or GPT-2's vocab.json ...")
    deepspeed.add_argument("--merge-file", help="... and merges.txt")
    add_model_args(parser)
    add_moe_args(parser)


def _deepspeed_tokenizer(args: argparse.Namespace) -> Tokenizer:
    from moetrain.data import Tokenizer, build_tokenizer

    if args.tokenizer:
        return Tokenizer.load(args.tokenizer)
    if args.vocab_file or args.merge_file:
        return build_tokenizer("gpt2", vocab_file=args.vocab_file, merge_file=args.merge_file)
    raise ValueError("a DeepSpeed checkpoint carries no tokenizer; pass --tokenizer tokenizer.json or GPT-2's "
                     "--vocab-file and --merge-file")


def run(args: argparse.Namespace) -> int:
    from moetrain.config import given_fields
    from moetrain.interop.checkpoint import train_command

    overrides = given_fields(args)
    if args.from_hf:
        if overrides or args.tokenizer or args.vocab_file:
            raise ValueError("--from-hf takes everything from the model directory; drop the DeepSpeed options")
        from moetrain.interop.hf import import_hf

        cfg, path = import_hf(args.from_hf, args.out, trust_checkpoint=args.trust_checkpoint)
    else:
        from moetrain.interop.deepspeed import import_deepspeed

        cfg, path = import_deepspeed(args.from_deepspeed, args.out, _deepspeed_tokenizer(args),
                                     trust_checkpoint=args.trust_checkpoint, overrides=overrides)
    print(f"wrote {path}; fine-tune it with\n  {train_command(args.out, cfg)}")
    return 0
