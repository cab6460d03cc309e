"""`moetrain export`: write a checkpoint as a Hugging Face transformers model directory."""

from __future__ import annotations

import argparse

SUMMARY = "write a checkpoint as a Hugging Face transformers model (needs the hf extra)"


def configure(parser: argparse.ArgumentParser) -> None:
    parser.description = ("Write a moetrain checkpoint as a Hugging Face transformers model directory "
                          "(config.json, safetensors, tokenizer).")
    parser.allow_abbrev = False
    parser.add_argument("--load", required=True, help="moetrain checkpoint directory")
    parser.add_argument("--format", choices=("hf",), default="hf", help="output format (default: hf)")
    parser.add_argument("--out", required=True, help="new or empty output directory")
    parser.add_argument("--dropless", action="store_true",
                        help="export a model trained with capacity dropping or top-2 second-expert sampling with "
                             "plain dropless top-k routing (its outputs then differ where moetrain drops or samples)")


def run(args: argparse.Namespace) -> int:
    from moetrain.interop.hf import export_hf

    architecture = export_hf(args.load, args.out, dropless=args.dropless)
    print(f"wrote {args.out} ({architecture}); load it with "
          f"transformers.AutoModelForCausalLM.from_pretrained({args.out!r})")
    return 0
