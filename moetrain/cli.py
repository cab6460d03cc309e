"""`moetrain` command line: train, prepare-data, generate, plot, eval, lm-eval, export, import, upcycle."""

from __future__ import annotations

import sys

USAGE = """usage: moetrain COMMAND [options]

commands:
  train          pre-train an MoE GPT (no options: a small model on the built-in corpus)
  prepare-data   tokenize text/JSONL once into the memory-mapped .bin/.idx format
  generate       sample text from a checkpoint
  plot           write loss and expert-load PNGs from a run's metrics.jsonl
  eval           held-out perplexity and zero-shot tasks (local JSONL files) of checkpoints, as a table
  lm-eval        lm-evaluation-harness's command line with model "moetrain" (needs the lm-eval extra)
  export         write a checkpoint as a Hugging Face transformers model (needs the hf extra)
  import         convert a Hugging Face model or a Megatron-DeepSpeed MoE checkpoint into a checkpoint
  upcycle        turn a dense checkpoint into an MoE one whose experts start as copies of the FFN
  consolidate    merge a sharded (multi-process) checkpoint into a single-process one

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


def _eval(argv: list[str]) -> int:
    from moetrain.evaluation import eval_main

    return eval_main(argv)


def _lm_eval(argv: list[str]) -> int:
    try:
        from moetrain.evaluation.harness import harness_main
    except ImportError as error:
        print(f"moetrain lm-eval: error: {error}", file=sys.stderr)
        return 1
    return harness_main(argv)


def _consolidate(argv: list[str]) -> int:
    from moetrain.checkpoint import consolidate_main

    return consolidate_main(argv)


def _interop(name: str):
    """export / import / upcycle, from moetrain.interop.cli."""
    def run(argv: list[str]) -> int:
        from moetrain.interop import cli

        return getattr(cli, f"{name}_main")(argv)
    return run


COMMANDS = {"train": _train, "prepare-data": _prepare, "generate": _generate, "plot": _plot, "eval": _eval,
            "lm-eval": _lm_eval, "export": _interop("export"), "import": _interop("import"),
            "upcycle": _interop("upcycle"), "consolidate": _consolidate}


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        print(USAGE)
        if argv and argv[0] not in ("-h", "--help"):
            print(f"\nmoetrain: unknown command {argv[0]!r}", file=sys.stderr)
            sys.exit(2)
        sys.exit(0)
    from moetrain.checkpoint.storage import CheckpointError

    try:
        code = COMMANDS[argv[0]](argv[1:])
    except (ValueError, FileNotFoundError, CheckpointError) as error:
        # Bad input: one clear line, not a traceback (ConfigError, DataError, CheckpointError ...).
        print(f"moetrain {argv[0]}: error: {error}", file=sys.stderr)
        sys.exit(1)
    sys.exit(code)
