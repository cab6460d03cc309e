"""Sparse upcycling: does an MoE upcycled from a trained dense model beat continuing the dense model?

A dense model is trained for N steps and checkpointed. From there three runs train M further steps,
each a fresh run with the same LR schedule (short warm-up, cosine from --lr to --lr / 10), a fresh AdamW
and the same batches (a continuation seed, so the order differs from pre-training):

  dense     the dense checkpoint, continued (its weights as a weights-only checkpoint)
  upcycled  `moetrain upcycle` of the dense checkpoint: every other FFN becomes 8 copies of itself,
            top-2, dropless, random router (std 0.02); starts with the dense model's loss
  scratch   the same MoE model from a random initialisation

All three are trained by moetrain's own Trainer (`train_step()` in a loop, `evaluate()` every
--eval-interval steps on the same held-out batches), on the built-in default corpus. Top-2 runs two
experts per token in the MoE layers, so upcycled and scratch do more FFN work per token than dense.

    python benchmarks/upcycle.py --threads 1   # N = M = 150 steps (600 in all): 459 s on a loaded 2-core box
    python benchmarks/upcycle.py --quick       # N = M = 100 steps
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import torch

from moetrain.checkpoint import load_model
from moetrain.config import Config, MoEConfig
from moetrain.interop import save_model_checkpoint
from moetrain.interop.upcycle import upcycle
from moetrain.train.trainer import Trainer


def make_config(args, *, moe: MoEConfig | None, iters: int, seed: int, load: str | None = None,
                save: str | None = None) -> Config:
    cfg = Config()
    m, tc = cfg.model, cfg.training
    m.style, m.num_layers, m.hidden_size = "gpt", args.layers, args.hidden
    m.num_attention_heads, m.seq_length = args.heads, args.seq
    cfg.moe = moe if moe is not None else MoEConfig(num_experts=[1])
    tc.micro_batch_size, tc.train_iters, tc.seed = args.batch, iters, seed
    tc.lr, tc.min_lr, tc.lr_warmup_iters = args.lr, args.lr / 10, max(1, iters // 20)
    tc.eval_iters, tc.eval_interval = args.eval_batches, args.eval_interval
    tc.load, tc.save, tc.device, tc.progress_bar = load, save, "cpu", False
    return cfg


def moe_config(args) -> MoEConfig:
    return MoEConfig(num_experts=[args.experts], expert_interval=args.expert_interval, topk=2, drop_tokens=False,
                     top2_2nd_expert_sampling=False)


def run(name: str, cfg: Config) -> tuple[Trainer, list[tuple[int, float]], float]:
    """Train cfg to its train_iters; the validation curve includes step 0 (before any update)."""
    trainer = Trainer(cfg, quiet=True)
    counts = trainer.model.parameter_counts()
    print(f"\n[{name}] experts per layer {cfg.experts_per_layer()}, params {counts['total'] / 1e6:.2f}M total, "
          f"{counts['active'] / 1e6:.2f}M active per token", flush=True)
    curve = [(0, trainer.evaluate()["eval_loss"])]
    print(f"[{name}] step     0  val loss {curve[0][1]:.4f}", flush=True)
    start = time.perf_counter()
    while trainer.iteration < cfg.training.train_iters:
        step = trainer.train_step()
        if trainer.iteration % cfg.training.eval_interval == 0 or trainer.iteration == cfg.training.train_iters:
            curve.append((trainer.iteration, trainer.evaluate()["eval_loss"]))
            print(f"[{name}] step {trainer.iteration:5d}  train loss {step['losses']['loss']:.4f}  "
                  f"val loss {curve[-1][1]:.4f}"
                  f"  ({time.perf_counter() - start:.0f} s)", flush=True)
    return trainer, curve, (time.perf_counter() - start) / cfg.training.train_iters


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="100 + 100 steps")
    parser.add_argument("--pretrain-iters", type=int, default=150, help="N: dense pre-training steps")
    parser.add_argument("--iters", type=int, default=150, help="M: further steps of each run")
    parser.add_argument("--eval-interval", type=int, default=25)
    parser.add_argument("--eval-batches", type=int, default=8)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--expert-interval", type=int, default=2)
    parser.add_argument("--expert-noise", type=float, default=0.0, help="noise on the upcycled copies")
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch intra-op threads (default: torch's); 1 is faster on a machine others load")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        args.pretrain_iters, args.iters, args.eval_interval, args.eval_batches = 100, 100, 25, 4
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.1f} "
          f"on {os.cpu_count()} CPUs")
    print(f"GPT style, {args.layers} layers, hidden {args.hidden}, {args.heads} heads, seq {args.seq}, batch "
          f"{args.batch} ({args.batch * args.seq} tokens/step); dense pre-training {args.pretrain_iters} steps, then "
          f"{args.iters} steps per run, lr {args.lr} cosine to {args.lr / 10}; MoE: {args.experts} experts every "
          f"{args.expert_interval} layers, top-2, dropless")
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        dense_dir, weights_dir, moe_dir = (os.path.join(tmp, name) for name in ("dense", "dense-weights", "moe"))
        pretrain, pre_curve, _ = run("pretrain", make_config(args, moe=None, iters=args.pretrain_iters, seed=args.seed,
                                                             save=dense_dir))
        pretrain.save()
        model, tokenizer, dense_cfg = load_model(dense_dir)
        save_model_checkpoint(weights_dir, dense_cfg, model.state_dict(), tokenizer)
        upcycle(dense_dir, moe_dir, moe_config(args), expert_noise=args.expert_noise, seed=args.seed)

        seed = args.seed + 1  # continuation runs: their own batch order, the same for all three
        results = {
            "dense": run("dense", make_config(args, moe=None, iters=args.iters, seed=seed, load=weights_dir)),
            "upcycled": run("upcycled", make_config(args, moe=moe_config(args), iters=args.iters, seed=seed,
                                                    load=moe_dir)),
            "scratch": run("scratch", make_config(args, moe=moe_config(args), iters=args.iters, seed=seed)),
        }

    print(f"\nwall time {time.perf_counter() - started:.0f} s; load average at the end {os.getloadavg()[0]:.1f}")
    print(f"dense pre-training: val loss {pre_curve[0][1]:.3f} -> {pre_curve[-1][1]:.3f} after {args.pretrain_iters} "
          "steps")
    steps = [step for step, _ in results["dense"][1]]  # every run evaluates at the same steps
    header = ["run", "experts/layer", "total params", "active params", "s/step"] + [f"val@{s}" for s in steps]
    print("\n| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for name, (trainer, curve, seconds) in results.items():
        counts = trainer.model.parameter_counts()
        row = [name, str(trainer.cfg.experts_per_layer()), f"{counts['total'] / 1e6:.2f}M",
               f"{counts['active'] / 1e6:.2f}M", f"{seconds:.2f}"]
        row += [f"{loss:.3f}" for _, loss in curve]
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
