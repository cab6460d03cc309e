"""`moetrain lm-eval`: lm-evaluation-harness's own command line, with the moetrain model registered."""

from __future__ import annotations

import sys

SUMMARY = "lm-evaluation-harness's command line with model \"moetrain\" (needs the lm-eval extra)"


def main(argv: list[str]) -> int:
    try:
        from moetrain.evaluation.harness import harness_main
    except ImportError as error:
        print(f"moetrain lm-eval: error: {error}", file=sys.stderr)
        return 1
    return harness_main(argv)
