"""Mixture-of-Students: does a shallower PR-MoE student distilled from a PR-MoE teacher keep its quality?

Everything trains with moetrain's own `Trainer.fit()` (the code `moetrain train` runs) on the built-in corpus,
with the same seed, the same batches in the same order and the same LR schedule as benchmarks/moe_vs_dense.py
(its `make_config` and flags):

  teacher   PR-MoE of moe_vs_dense: 4 layers, pyramid [4, 8] experts in layers 1 and 3 + residual MLP
  mos       student with fewer layers (default 3: experts [0, 4, 8] per layer, i.e. the teacher's pyramid
            without one dense layer), trained with `--mos` from the teacher's checkpoint
  student   the same student trained without distillation, on the same tokens

Reported: validation loss (`Trainer.evaluate()`, the same held-out batches for all) and parameter counts of
the three, and how much of the student's gap to the teacher distillation closes. Then the zero-shot table
(moetrain's evaluation code, `moetrain eval`'s) for the models of moe_vs_dense (dense, moe, prmoe = the
teacher) and the two students on the sample tasks in tests/fixtures, with held-out perplexity. Those tasks are
a handful of examples each and these models are tiny: scores near chance are expected; the table shows the
machinery, not a model ranking.

    python benchmarks/mos.py                       # 500 steps per model, 5 models (2,500 steps of 0.2-0.35 s
                                                   # on 2 quiet cores: about 15 min; much longer when shared)
    python benchmarks/mos.py --quick               # 150 steps
    python benchmarks/mos.py --teacher-iters 1000 --no-baselines   # a teacher that finished a longer schedule
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import torch
from moe_vs_dense import add_run_args, loss_at, make_config

from moetrain.config import Config
from moetrain.data import read_documents
from moetrain.evaluation import LMScorer, evaluate_model, format_table, read_task
from moetrain.train.metrics import read_metrics
from moetrain.train.trainer import Trainer

DATA = Path(__file__).resolve().parent.parent / "tests" / "fixtures"
TASKS = ("lambada", "piqa", "boolq", "race_h", "triviaqa", "webqs")


def student_config(args, teacher_dir: str | None) -> Config:
    """The teacher's recipe with the student's layers; distilling when a teacher checkpoint is given."""
    cfg = make_config(args, "prmoe")
    cfg.model.num_layers = len(args.student_experts)
    cfg.moe.num_experts, cfg.moe.expert_interval = list(args.student_experts), 1
    if teacher_dir is not None:
        d = cfg.distill
        d.enabled, d.load_teacher, d.temperature = True, teacher_dir, args.kd_temp
        d.alpha_ce, d.beta_ce, d.stop_iter = args.kd_alpha_ce, args.kd_beta_ce, args.kd_stop_iter
    return cfg


def train(cfg: Config, label: str, save_root: str, log_interval: int) -> tuple[Trainer, dict]:
    cfg.training.save = os.path.join(save_root, label)
    cfg.training.log_interval = log_interval
    print(f"\n[{label}]", flush=True)
    start = time.perf_counter()
    trainer = Trainer(cfg)
    result = trainer.fit()
    seconds = time.perf_counter() - start
    curve = [(r["step"], r["eval_loss"]) for r in read_metrics(os.path.join(cfg.training.save, "metrics.jsonl"))
             if r["type"] == "eval"]
    counts = trainer.model.parameter_counts()
    return trainer, {"label": label, "final": result.final_eval_loss, "curve": curve, "seconds": seconds,
                     "steps": cfg.training.train_iters,
                     "total": counts["total"], "active": counts["active"],
                     "experts": cfg.experts_per_layer(), "layers": cfg.model.num_layers}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="150 steps per model, smaller evaluation")
    add_run_args(parser)
    parser.add_argument("--student-experts", type=int, nargs="+", default=[0, 4, 8],
                        help="expert count of each student layer (0: dense); its length is the student's depth")
    parser.add_argument("--teacher-iters", type=int,
                        help="train the teacher longer than the students (its own LR schedule); default: --iters")
    parser.add_argument("--kd-temp", type=float, default=1.0)
    parser.add_argument("--kd-alpha-ce", type=float, default=1.0)
    parser.add_argument("--kd-beta-ce", type=float, default=1.0)
    parser.add_argument("--kd-stop-iter", type=int, default=None)
    parser.add_argument("--no-baselines", action="store_true",
                        help="skip dense and standard MoE (only teacher and students)")
    parser.add_argument("--save-dir", help="keep the checkpoints here (default: a temporary directory)")
    parser.set_defaults(iters=500)
    args = parser.parse_args()
    if args.quick:
        args.iters, args.eval_interval, args.eval_batches = 150, 15, 4
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.1f} "
          f"on {os.cpu_count()} CPUs")
    print(f"{args.iters} steps of {args.batch} x {args.seq} tokens, lr {args.lr} cosine to {args.lr / 10}, "
          f"eval every {args.eval_interval} steps on {args.eval_batches} x {args.batch} held-out windows; "
          f"KD T={args.kd_temp}, alpha={args.kd_alpha_ce}, beta={args.kd_beta_ce}, stop={args.kd_stop_iter}")
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as scratch:
        save_root = args.save_dir or scratch
        trained: dict[str, tuple[Trainer, dict]] = {}
        teacher_args = argparse.Namespace(**{**vars(args), "iters": args.teacher_iters or args.iters})
        trained["teacher (prmoe)"] = train(make_config(teacher_args, "prmoe"), "teacher", save_root,
                                           args.eval_interval)
        teacher_dir = os.path.join(save_root, "teacher")
        trained["mos (distilled)"] = train(student_config(args, teacher_dir), "mos", save_root, args.eval_interval)
        trained["student (no KD)"] = train(student_config(args, None), "student", save_root, args.eval_interval)
        if not args.no_baselines:
            for variant in ("dense", "moe"):
                trained[variant] = train(make_config(args, variant), variant, save_root, args.eval_interval)
    print(f"\nwall time {time.perf_counter() - started:.0f} s; load average at the end {os.getloadavg()[0]:.1f}")

    results = {label: result for label, (_, result) in trained.items()}
    marks = [args.iters // 4, args.iters // 2, 3 * args.iters // 4]
    header = ["model", "layers", "experts/layer", "total params", "active params", "steps", "s/step (incl. eval)"]
    header += [f"val@{s}" for s in marks] + ["final val"]
    print("\n| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for label, r in results.items():
        row = [label, str(r["layers"]), str(r["experts"]), f"{r['total'] / 1e6:.2f}M", f"{r['active'] / 1e6:.2f}M",
               str(r["steps"]), f"{r['seconds'] / r['steps']:.2f}"]
        row += [f"{loss_at(r['curve'], s):.3f}" for s in marks] + [f"{r['final']:.3f}"]
        print("| " + " | ".join(row) + " |")
    teacher, mos, student = (results[k]["final"] for k in ("teacher (prmoe)", "mos (distilled)", "student (no KD)"))
    gap = student - teacher
    closed = (f"closes {(student - mos) / gap:.0%} of the gap" if gap > 0
              else "(no gap to close: the student alone is at least as good as the teacher)")
    print(f"\nfinal validation loss minus the teacher's: student without KD {gap:+.4f}, with KD {mos - teacher:+.4f}; "
          f"distillation improves the student by {student - mos:.4f} and {closed}")
    print("\nvalidation curves (step: loss)")
    for label, r in results.items():
        print(f"{label:16s} " + " ".join(f"{s}:{loss:.3f}" for s, loss in r["curve"]))

    tasks = [read_task(name, DATA / f"{name}.jsonl") for name in TASKS]
    heldout = list(read_documents(DATA / "heldout.txt"))
    zero_shot = {}
    for label, (trainer, _) in trained.items():
        scorer = LMScorer(trainer.model, trainer.tokenizer, batch_size=8)
        zero_shot[label] = evaluate_model(scorer, tasks, heldout)
    print(f"\nzero-shot on tests/fixtures ({', '.join(f'{t.name} {len(t.docs)}' for t in tasks)} examples; chance: "
          "lambada 0, piqa/boolq 0.5, race_h 0.25, EM 0)")
    print(format_table(zero_shot))


if __name__ == "__main__":
    main()
