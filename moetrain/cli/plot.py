"""`moetrain plot`: loss and expert-load PNGs from a run's metrics.jsonl."""

from __future__ import annotations

import argparse
import os
import sys

SUMMARY = "write loss and expert-load PNGs from a run's metrics.jsonl"


def configure(parser: argparse.ArgumentParser) -> None:
    parser.description = ("``moetrain plot --save DIR``: read DIR/metrics.jsonl, write the PNGs into DIR, print "
                          "their paths.")
    parser.add_argument("--save", required=True, help="save directory of a training run (holds metrics.jsonl)")


def run(args: argparse.Namespace) -> int:
    from moetrain.plot import plot_metrics
    from moetrain.train.metrics import METRICS_FILE

    try:
        paths = plot_metrics(os.path.join(args.save, METRICS_FILE), args.save)
    except (FileNotFoundError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    for path in paths:
        print(path)
    return 0
