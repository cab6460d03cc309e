"""`moetrain eval`: held-out perplexity and zero-shot tasks for one or more checkpoints, as a table and JSON.

    moetrain eval --load runs/moe runs/dense --task lambada=lambada.jsonl --task piqa=piqa.jsonl --ppl heldout.txt

One row per checkpoint, one column per task (its headline metric: accuracy, or exact match for short-answer
tasks), like Table 1 of the DeepSpeed-MoE paper; every metric and the MoE drop fraction go to the JSON file.
"""

from __future__ import annotations

import argparse
import json
import os

SUMMARY = "held-out perplexity and zero-shot tasks (local JSONL files) of checkpoints, as a table"


def _task_spec(text: str) -> tuple[str, str]:
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"expects NAME=PATH.jsonl, like lambada=data/lambada.jsonl; got {text!r}")
    return name, path


def configure(parser: argparse.ArgumentParser) -> None:
    parser.description = __doc__.splitlines()[0]
    parser.add_argument("--load", nargs="+", required=True, metavar="DIR",
                        help="checkpoint directories (--save directories of `moetrain train`), one table row each")
    parser.add_argument("--task", action="append", type=_task_spec, default=[], metavar="NAME=PATH",
                        help="a zero-shot task file (JSONL; formats in the README), repeatable")
    parser.add_argument("--ppl", nargs="+", metavar="PATH",
                        help="held-out .txt/.jsonl files or directories for per-token perplexity")
    parser.add_argument("--limit", type=int, help="use only the first N examples of each task and ppl document set")
    parser.add_argument("--batch-size", type=int, default=8, help="sequences per forward")
    parser.add_argument("--max-new-tokens", type=int, default=32, help="generation budget for short-answer tasks")
    parser.add_argument("--output", default="eval_results.json", help="where the JSON results go")
    parser.add_argument("--device", default="auto", help="auto (default): cuda when available, else cpu")
    parser.add_argument("--no-progress-bar", dest="progress", action="store_false")


def run(args: argparse.Namespace) -> int:
    from moetrain.checkpoint import load_model
    from moetrain.data import DataError, read_documents
    from moetrain.evaluation import LMScorer, evaluate_model, format_table, read_task
    from moetrain.train.run import resolve_device

    if not args.task and not args.ppl:
        raise DataError("nothing to evaluate; pass --task NAME=PATH.jsonl and/or --ppl PATH")
    if args.limit is not None and args.limit < 1:
        raise DataError(f"--limit must be at least 1, got {args.limit}")
    names = [name for name, _ in args.task]
    if len(set(names)) != len(names):
        raise DataError(f"task names must be unique, got {', '.join(names)}; name each --task differently")
    tasks = [read_task(name, path, args.limit) for name, path in args.task]
    ppl_texts = list(read_documents(args.ppl))[:args.limit] if args.ppl else None
    device = resolve_device(args.device)
    results = {}
    for load_dir in args.load:
        model, tokenizer, _ = load_model(load_dir, device)
        scorer = LMScorer(model, tokenizer, batch_size=args.batch_size, progress=args.progress)
        results[load_dir] = evaluate_model(scorer, tasks, ppl_texts, args.max_new_tokens)
    print(format_table(results))
    for load_dir, result in results.items():
        drops = {name: task["drop_fraction"] for name, task in result["tasks"].items()}
        if "perplexity" in result:
            drops = {"ppl": result["perplexity"]["drop_fraction"], **drops}
        if any(drops.values()):
            shown = ", ".join(f"{name} {100 * drop:.1f}%" for name, drop in drops.items())
            print(f"{load_dir}: MoE drop fraction in eval {shown}")
    output_dir = os.path.dirname(args.output)
    if output_dir:
        os.makedirs(output_dir, exist_ok=True)
    with open(args.output, "w", encoding="utf-8") as f:
        json.dump({"models": results}, f, indent=2)
    print(f"results: {args.output}")
    return 0
