"""Does an MoE reach a dense model's validation loss in fewer steps? And PR-MoE vs standard MoE.

The models (default: dense, moe32, prmoe with pyramid [16, 32]) train with moetrain's own `Trainer` (its
`train_step()` and `evaluate()`, the code `moetrain train` runs) on the built-in default corpus, with the same seed, the
same batches in the same order, the same tokens per step and the same LR schedule.

Default model: byte tokens (vocabulary 256 + eos, 6.46M training tokens), 4 layers, hidden 32, FFN 128,
4 heads, seq 128, batch 16, 6000 steps (12.3M tokens, 1.9 epochs), lr 2e-3 cosine. A small vocabulary
keeps the parameter budget out of the embedding, and a small model runs enough steps per minute to
leave the early phase in which every model is limited by steps, not capacity: the claim under test
is about a dense model that more data no longer helps much and an MoE that it still does. The
earlier defaults are `--hidden 64 --iters 3000 --eval-interval 100` (session 3) and `--tokenizer bpe
--hidden 128 --iters 1000 --eval-interval 50 --pyramid 4 8 --variants dense,moe,moe32,prmoe`
(sessions 1-2); BENCHMARKS.md has all three. The variants:

  dense   GPT style, every FFN a dense MLP
  moe     the same model dims; every other FFN (Megatron-DeepSpeed layout, `--expert-interval 2`)
          an MoE of 8 experts of the dense FFN's shape, top-1, dropless. Each token runs exactly
          one expert, so the active parameters and FLOPs per token equal the dense model's
          (plus the 8 x h router), while the FFN parameters of those layers grow 8x.
  prmoe   PR-MoE (DeepSpeed-MoE): pyramid `--pyramid` experts over the two MoE layers + a residual
          dense MLP beside the experts (`--mlp-type residual`): fewer total parameters than moe,
          but each token runs the residual MLP and one expert in an MoE layer.
  fg<E>x<k>[s<S>][i<N>]
          fine-grained experts (DeepSeekMoE): E experts of width ffn / (k + S), top-k with the
          weights renormalised over the k choices (k >= 2), S always-on shared experts of the same
          width, MoE every N-th layer (default `--expert-interval`). Each token runs exactly one
          dense FFN's width per MoE layer, so active parameters equal the dense model's (plus the
          routers). E.g. fg16x2 (16 half-width experts, top-2), fg16x2i1 (the same in every layer),
          fg32x4, fg32x3s1.
  moe<E>[i<N>]
          moe with E experts instead of `--experts` (e.g. moe16, moe32): same active parameters,
          more total ones; with i<N> MoE every N-th layer instead of `--expert-interval` (moe32i1:
          every layer).

Why dropless rather than capacity factor 1.25: moetrain's dispatcher never pads to a capacity, so
dropless top-1 costs exactly the dense FFN's FLOPs, keeps the "same active parameters" comparison
exact (with drops, dropped tokens skip the FFN), and on one device there is no all-to-all whose
size a capacity would bound. `--capacity-factor 1.25` runs the DeepSpeed recipe instead.

Validation loss (`trainer.evaluate()`, the same fixed held-out batches for every model) is logged
every `--eval-interval` steps. Reported: where each MoE's curve first reaches the dense model's
final validation loss (linear interpolation between evaluations), as a fraction of the steps.

    python benchmarks/moe_vs_dense.py            # dense, moe32, prmoe; 6000 steps each, two at a time
                                                 # (--jobs 2): about 17 min on two quiet cores
    python benchmarks/moe_vs_dense.py --quick    # 150 steps each, about a minute
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import re
import time
from concurrent.futures import ProcessPoolExecutor

import torch

from moetrain.config import Config
from moetrain.train.trainer import Trainer

# fg<E>x<k>[s<S>][i<N>]: E fine-grained experts, top-k, S shared experts, MoE every N-th layer
FINE_GRAINED = re.compile(r"fg(?P<experts>\d+)x(?P<k>\d+)(?:s(?P<shared>\d+))?(?:i(?P<interval>\d+))?")

# moe<E>[i<N>]: the moe variant with E experts (dense-FFN-shaped, top-1), MoE every N-th layer
MORE_EXPERTS = re.compile(r"moe(?P<experts>\d+)(?:i(?P<interval>\d+))?")


def make_config(args, variant: str) -> Config:
    cfg = Config()
    m, moe, tc = cfg.model, cfg.moe, cfg.training
    m.style, m.num_layers, m.hidden_size = "gpt", args.layers, args.hidden
    m.num_attention_heads, m.seq_length, m.ffn_hidden_size = args.heads, args.seq, args.ffn
    cfg.data.tokenizer_type, cfg.data.vocab_size = args.tokenizer, args.vocab
    tc.micro_batch_size, tc.train_iters = args.batch, args.iters
    tc.lr, tc.min_lr, tc.lr_decay_style = args.lr, args.lr / 10, args.lr_decay_style
    tc.lr_warmup_iters = max(1, args.iters // 20)
    tc.eval_iters, tc.eval_interval = args.eval_batches, args.eval_interval
    tc.save, tc.device, tc.progress_bar, tc.seed = None, "cpu", False, args.seed
    moe.expert_interval, moe.topk = args.expert_interval, 1
    if args.capacity_factor is None:
        moe.drop_tokens = False
    else:
        moe.drop_tokens = True
        moe.train_capacity_factor = moe.eval_capacity_factor = args.capacity_factor
    if variant == "dense":
        moe.num_experts = [1]
    elif variant == "moe":
        moe.num_experts = [args.experts]
    elif variant == "prmoe":
        moe.num_experts, moe.mlp_type = list(args.pyramid), "residual"
    elif variant == "moe2h":  # same active FFN work as dense: top-2 of experts half the dense width
        moe.num_experts, moe.topk, moe.top2_2nd_expert_sampling = [args.experts], 2, False
        moe.expert_ffn_hidden_size = m.ffn_size() // 2
    elif (many := MORE_EXPERTS.fullmatch(variant)) is not None:  # moe with E experts instead of --experts
        moe.num_experts = [int(many["experts"])]
        if many["interval"]:
            moe.expert_interval = int(many["interval"])
    elif (fine := FINE_GRAINED.fullmatch(variant)) is not None:
        # Fine-grained experts (DeepSeekMoE): E experts of width ffn / (k + S), top-k with weights
        # renormalised over the k choices, plus S always-on shared experts of the same width, so
        # each token runs exactly one dense FFN's width in every MoE layer.
        experts, k = int(fine["experts"]), int(fine["k"])
        shared = int(fine["shared"] or 0)
        if k < 2:
            raise SystemExit(f"{variant}: fine-grained variants need k >= 2 (top-1 is not renormalised)")
        if m.ffn_size() % (k + shared):
            raise SystemExit(f"{variant}: ffn size {m.ffn_size()} is not divisible by k + shared = {k + shared}")
        moe.num_experts, moe.topk, moe.top2_2nd_expert_sampling = [experts], k, False
        moe.expert_ffn_hidden_size = m.ffn_size() // (k + shared)
        moe.num_shared_experts = shared
        if fine["interval"]:
            moe.expert_interval = int(fine["interval"])
    else:
        raise SystemExit(f"unknown variant {variant!r}; use dense, moe, prmoe, moe2h, moe<E> or fg<E>x<k>[s<S>][i<N>]")
    moe.score_func = args.score_func
    moe.aux_loss_coeff = args.aux_coeff
    return cfg


def train(args, variant: str) -> dict:
    cfg = make_config(args, variant)
    trainer = Trainer(cfg, quiet=True)
    counts = trainer.model.parameter_counts()
    print(f"\n[{variant}] experts per layer {cfg.experts_per_layer()}, mlp_type {cfg.moe.mlp_type}, "
          f"params {counts['total'] / 1e6:.2f}M total, {counts['active'] / 1e6:.2f}M active per token", flush=True)
    curve: list[tuple[int, float]] = []
    train_losses: list[float] = []
    start = time.perf_counter()
    eval_seconds = 0.0
    while trainer.iteration < args.iters:
        step = trainer.train_step()
        train_losses.append(step["losses"]["loss"])
        if trainer.iteration % args.eval_interval == 0 or trainer.iteration == args.iters:
            t0 = time.perf_counter()
            record = trainer.evaluate()
            eval_seconds += time.perf_counter() - t0
            curve.append((trainer.iteration, record["eval_loss"]))
            elapsed = time.perf_counter() - start
            print(f"[{variant}] step {trainer.iteration:5d}  train loss {step['losses']['loss']:.4f}  "
                  f"val loss {record['eval_loss']:.4f}  drop {record['eval_drop_fraction']:.3f}  "
                  f"({elapsed:.0f} s)", flush=True)
    total = time.perf_counter() - start
    return {"variant": variant, "total": counts["total"], "active": counts["active"], "curve": curve,
            "final": curve[-1][1], "train_s_per_step": (total - eval_seconds) / args.iters,
            "train_losses": train_losses}


def train_all(args, variants: list[str]) -> dict[str, dict]:
    """Train every variant; with --jobs > 1 in worker processes of one torch thread each.

    The models share no state, so running them side by side changes only wall time (and float
    summation order, as any change of thread count does), not what is compared.
    """
    if args.jobs <= 1:
        return {v: train(args, v) for v in variants}
    with ProcessPoolExecutor(min(args.jobs, len(variants)), mp_context=multiprocessing.get_context("spawn"),
                             initializer=torch.set_num_threads, initargs=(1,)) as pool:
        futures = {v: pool.submit(train, args, v) for v in variants}
        return {v: future.result() for v, future in futures.items()}


def steps_to_reach(curve: list[tuple[int, float]], target: float) -> float | None:
    """First step at which the validation curve reaches `target`, interpolated between evaluations."""
    prev_step, prev_loss = 0, None
    for step, loss in curve:
        if loss <= target:
            if prev_loss is None or prev_loss == loss:
                return float(step)
            return prev_step + (step - prev_step) * (prev_loss - target) / (prev_loss - loss)
        prev_step, prev_loss = step, loss
    return None


def loss_at(curve: list[tuple[int, float]], step: int) -> float:
    return min(curve, key=lambda point: abs(point[0] - step))[1]


def add_run_args(parser: argparse.ArgumentParser) -> None:
    """Model, data and schedule flags that make_config reads (shared with benchmarks/mos.py)."""
    parser.add_argument("--iters", type=int, default=1000)
    parser.add_argument("--eval-interval", type=int, default=50)
    parser.add_argument("--eval-batches", type=int, default=8, help="validation batches per evaluation")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--ffn", type=int, default=None, help="dense FFN width (default 4 x hidden)")
    parser.add_argument("--tokenizer", default="bpe", choices=("bpe", "byte"),
                        help="bpe: trained on the corpus with --vocab entries; byte: 256 bytes + eos")
    parser.add_argument("--vocab", type=int, default=4096, help="BPE vocabulary size")
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--lr-decay-style", default="cosine", choices=("cosine", "linear", "constant"),
                        help="the shared LR schedule after warm-up (cosine decays to lr / 10)")
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--expert-interval", type=int, default=2)
    parser.add_argument("--pyramid", type=int, nargs="+", default=[4, 8])
    parser.add_argument("--capacity-factor", type=float, default=None,
                        help="train/eval capacity factor with token dropping (default: dropless)")
    parser.add_argument("--score-func", default="softmax", choices=("softmax", "sigmoid"),
                        help="router score function of the MoE variants")
    parser.add_argument("--aux-coeff", type=float, default=0.01, help="load-balancing loss coefficient")
    parser.add_argument("--seed", type=int, default=1234)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="150 steps per model, smaller evaluation")
    add_run_args(parser)
    # mos.py keeps add_run_args' defaults
    parser.set_defaults(tokenizer="byte", hidden=32, iters=6000, eval_interval=200, pyramid=[16, 32])
    parser.add_argument("--variants", default="dense,moe32,prmoe",
                        help="comma list of dense, moe, prmoe, moe2h (8 half-width experts, top-2), "
                             "moe<E>[i<N>], fg<E>x<k>[s<S>][i<N>] (see the module docstring)")
    parser.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1),
                        help="variants trained side by side, each in its own process on one torch thread "
                             "(1: one after another in this process, on its torch threads)")
    args = parser.parse_args()
    if args.quick:
        args.iters, args.eval_interval, args.eval_batches = 150, 15, 4
    threads = "1 thread per job" if args.jobs > 1 else f"{torch.get_num_threads()} threads"
    print(f"torch {torch.__version__}, {args.jobs} jobs, {threads}, load average {os.getloadavg()[0]:.1f} "
          f"on {os.cpu_count()} CPUs")
    vocab = f"BPE vocabulary {args.vocab}" if args.tokenizer == "bpe" else "byte tokens"
    print(f"{vocab}, {args.layers} layers, hidden {args.hidden}, ffn {args.ffn or 4 * args.hidden}, "
          f"{args.heads} heads, seq {args.seq}, batch {args.batch} "
          f"({args.batch * args.seq} tokens/step, {args.batch * args.seq * args.iters:,} tokens), {args.iters} "
          f"steps, lr {args.lr} {args.lr_decay_style} (min {args.lr / 10}) after {max(1, args.iters // 20)} "
          f"warm-up steps, "
          f"eval every {args.eval_interval} steps on {args.eval_batches} x {args.batch} held-out windows, "
          f"{'dropless' if args.capacity_factor is None else f'capacity factor {args.capacity_factor}'}")
    started = time.perf_counter()
    results = train_all(args, args.variants.split(","))

    print(f"\nwall time {time.perf_counter() - started:.0f} s; load average at the end {os.getloadavg()[0]:.1f}")
    marks = [args.iters // 4, args.iters // 2, 3 * args.iters // 4]
    dense = results.get("dense")
    header = ["model", "experts/layer", "total params", "active params", "s/step (train)"]
    header += [f"val@{s}" for s in marks] + [f"val@{args.iters} (final)"]
    if dense:
        header.append("steps to dense final")
    print("\n| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for variant, r in results.items():
        cfg = make_config(args, variant)
        experts = f"{cfg.experts_per_layer()}{' + residual MLP' if cfg.moe.mlp_type == 'residual' else ''}"
        row = [variant, experts, f"{r['total'] / 1e6:.2f}M", f"{r['active'] / 1e6:.2f}M",
               f"{r['train_s_per_step']:.2f}"]
        row += [f"{loss_at(r['curve'], s):.3f}" for s in marks] + [f"{r['final']:.3f}"]
        if dense:
            reach = steps_to_reach(r["curve"], dense["final"])
            cell = "not reached" if reach is None else f"{reach:.0f} ({reach / args.iters:.0%})"
            # the dense row shows where its own curve first got within evaluation noise of its end
            row.append(f"reference, first at {cell}" if variant == "dense" else cell)
        print("| " + " | ".join(row) + " |")

    if dense:
        for variant in results:
            if variant != "dense":
                reach = steps_to_reach(results[variant]["curve"], dense["final"])
                verdict = ("never, within the run" if reach is None else
                           f"at step {reach:.0f} of {args.iters} ({reach / args.iters:.0%} of the steps; target "
                           f"<= 50%: {'met' if reach <= args.iters / 2 else 'not met'})")
                print(f"{variant} reaches the dense final validation loss {dense['final']:.4f} {verdict}")
    standard = next((v for v in results if v == "moe" or MORE_EXPERTS.fullmatch(v)), None)
    if standard and "prmoe" in results:
        moe, pr = results[standard], results["prmoe"]
        reach = steps_to_reach(pr["curve"], moe["final"])
        print(f"prmoe ({pr['total'] / 1e6:.2f}M total, {pr['active'] / 1e6:.2f}M active) final {pr['final']:.4f} vs "
              f"{standard} ({moe['total'] / 1e6:.2f}M total, {moe['active'] / 1e6:.2f}M active) final "
              f"{moe['final']:.4f}; prmoe reaches the {standard} final loss "
              f"{'never' if reach is None else f'at step {reach:.0f}'}")
    print("\nvalidation curves (step: loss)")
    for variant, r in results.items():
        print(f"{variant:6s} " + " ".join(f"{s}:{loss:.3f}" for s, loss in r["curve"]))


if __name__ == "__main__":
    main()
