"""`moetrain generate`: sample text from a checkpoint."""

from __future__ import annotations

import argparse

SUMMARY = "sample text from a checkpoint"


def configure(parser: argparse.ArgumentParser) -> None:
    from moetrain.cli import non_negative_float

    parser.description = __doc__
    parser.add_argument("--load", required=True, help="checkpoint directory (a --save directory)")
    parser.add_argument("--prompt", default="", help="text to continue")
    parser.add_argument("--max-new-tokens", type=int, default=100)
    parser.add_argument("--temperature", type=non_negative_float, default=0.8, help="0 = greedy")
    parser.add_argument("--top-k", type=int, default=50)
    parser.add_argument("--num-samples", type=int, default=1)
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--device", default="auto", help="auto (default): cuda when available, else cpu")
    parser.add_argument("--record-routing", default=None, metavar="DIR",
                        help="write every generation forward's expert choices here (phase generate)")
    parser.add_argument("--replay-routing", default=None, metavar="DIR",
                        help="route every generation forward as recorded here by --record-routing")


def run(args: argparse.Namespace) -> int:
    import torch

    from moetrain.checkpoint import load_model
    from moetrain.train.monitor.routing_record import record_or_replay_generation
    from moetrain.train.run import resolve_device

    device = resolve_device(args.device)
    model, tokenizer, _ = load_model(args.load, device)
    if args.record_routing is not None and args.record_routing == args.replay_routing:
        raise ValueError(f"--record-routing and --replay-routing are both {args.record_routing}: record into "
                         "another directory")
    record_or_replay_generation(model, args.record_routing, args.replay_routing, args.seed)
    torch.manual_seed(args.seed)
    prompt_ids = tokenizer.encode(args.prompt) or [tokenizer.eos_id]
    for i in range(args.num_samples):
        ids = torch.tensor([prompt_ids], device=device)
        out = model.generate(ids, args.max_new_tokens, args.temperature, args.top_k, tokenizer.eos_id)
        if args.num_samples > 1:
            print(f"--- sample {i + 1}")
        print(args.prompt + tokenizer.decode(out[0, len(prompt_ids):].tolist()))
    return 0
