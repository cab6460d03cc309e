"""`moetrain consolidate`: merge a sharded (multi-process) checkpoint into a single-process one."""

from __future__ import annotations

import argparse

SUMMARY = "merge a sharded (multi-process) checkpoint into a single-process one"


def configure(parser: argparse.ArgumentParser) -> None:
    from moetrain.train.consolidate import consolidate

    parser.description = consolidate.__doc__
    parser.add_argument("--load", required=True, help="checkpoint directory (a --save directory or an iter_* one)")
    parser.add_argument("--out", required=True, help="directory for the single-process checkpoint")


def run(args: argparse.Namespace) -> int:
    from moetrain.train.consolidate import consolidate

    print(f"consolidated into {consolidate(args.load, args.out)}")
    return 0
