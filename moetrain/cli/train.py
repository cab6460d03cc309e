"""`moetrain train`: pre-train a Mixture-of-Experts GPT from Megatron-style flags and a DeepSpeed JSON."""

from __future__ import annotations

import argparse

SUMMARY = "pre-train an MoE GPT (no options: a small model on the built-in corpus)"


def configure(parser: argparse.ArgumentParser) -> None:
    from moetrain.config import TRAIN_DESCRIPTION, add_train_args

    parser.description, parser.allow_abbrev = TRAIN_DESCRIPTION, False
    add_train_args(parser)


def run(args: argparse.Namespace) -> int:
    from moetrain.config import config_from_namespace
    from moetrain.train.trainer import train

    train(config_from_namespace(args))
    return 0
