"""`moetrain` command line: train, prepare-data, generate, plot."""

from __future__ import annotations

import sys

USAGE = """usage: moetrain COMMAND [options]

commands:
  train          pre-train an MoE GPT (no options: a small model on the built-in corpus)
  prepare-data   tokenize text/JSONL once into the memory-mapped .bin/.idx format
  generate       sample text from a checkpoint
  plot           write loss and expert-load PNGs from a run's metrics.jsonl

`moetrain COMMAND --help` lists a command's options."""


def _train(argv: list[str]) -> int:
    from moetrain.config import parse_train_args
    from moetrain.train.trainer import train

    train(parse_train_args(argv))
    return 0


def _prepare(argv: list[str]) -> int:
    from moetrain.data import prepare_data_main

    return prepare_data_main(argv)


def _generate(argv: list[str]) -> int:
    from moetrain.generate import generate_main

    return generate_main(argv)


def _plot(argv: list[str]) -> int:
    from moetrain.plot import plot_main

    return plot_main(argv)


COMMANDS = {"train": _train, "prepare-data": _prepare, "generate": _generate, "plot": _plot}


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        print(USAGE)
        if argv and argv[0] not in ("-h", "--help"):
            print(f"\nmoetrain: unknown command {argv[0]!r}", file=sys.stderr)
            sys.exit(2)
        sys.exit(0)
    from moetrain.train.checkpoint import CheckpointError

    try:
        code = COMMANDS[argv[0]](argv[1:])
    except (ValueError, FileNotFoundError, CheckpointError) as error:
        # Bad input: one clear line, not a traceback (ConfigError, DataError, CheckpointError ...).
        print(f"moetrain {argv[0]}: error: {error}", file=sys.stderr)
        sys.exit(1)
    sys.exit(code)
