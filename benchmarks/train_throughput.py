"""Training throughput and model FLOP utilisation (MFU) of whole optimizer steps.

Three configurations, each run through moetrain's own `Trainer.train_step()` (forward, backward,
gradient clipping, AdamW step, LR schedule: the real program) on synthetic random token batches,
so no data loading is timed:

  default   `moetrain train` with Config() defaults: gpt style, 4 layers, hidden 256, seq 256,
            micro batch 8, 8 experts top-1 every other layer, capacity factor 1.0 with drops,
            vocabulary 4096 (the default corpus tokenizer)
  mixtral   Mixtral style at small scale: llama style (RoPE, RMSNorm, SwiGLU), 4 layers, hidden 256,
            8 heads, seq 256, micro batch 8, 8 experts top-2 in every layer, dropless, deterministic
            top-2 (no second-expert sampling, as Mixtral)
  h200      a realistic single-GPU model (run by benchmarks/gpu_check.sh with --device cuda --bf16):
            llama style, 12 layers, hidden 1024, 16 heads, seq 2048, micro batch 8, 64 experts top-2
            in every other layer (3.3B parameters, ~0.25B active), dropless, vocabulary ~48k (a BPE
            asked for 50304 tokens, trained on the built-in corpus: all it supports, and offline);
            the fast paths are moetrain's defaults: chunked LM loss, grouped expert GEMMs, no recompute.
            About 53 GiB of fp32 weights, gradients and AdamW state plus the activations.

If `transformers` is installed, the mixtral configuration is also built as a Hugging Face
`MixtralForCausalLM` of the same sizes (sdpa attention, float32, its default experts
implementation) and trained by a plain loop: forward, cross entropy on the same targets
+ 0.01 x its load-balancing loss, backward, clip_grad_norm_(1.0), AdamW (same lr, betas, weight
decay), zero_grad. Its steps are interleaved with moetrain's on the same batches (alternating which
of the two goes first), so both see the same machine load.

Model FLOPs per token (PaLM appendix B convention, counted for the k routed experts only):

    FLOPs/token = 6 * N + 12 * L * h * T

    N = parameters active per token (model.parameter_counts()["active"]: all parameters, experts
        counted k of E, routers and norms included) - token/position embedding tables (lookups, no
        matmul) + lm_head (V x h; with tied embeddings the shared matrix counts once, as the lm_head
        matmul)
    L = layers, h = hidden size, T = sequence length (attention scores and values, non-causal count,
        as PaLM and torchtitan; a causal kernel skips about half of them, so the causal MFU, with
        6 * L * h * T, is printed beside it)

MFU = FLOPs/token x tokens per step / step time / R. On the CPU R is the fp32 rate of a 2048 x 2048
@ 2048 x 2048 matmul measured in the same run, interleaved with the steps (medians throughout); on
a GPU it is the card's measured bf16 matmul rate, given by --matmul-tflops (gpu_check.sh passes
the figure of its first section) or else measured here once (8192^3, bf16). Peak memory: the
device allocator's peak (CUDA) or the process's peak resident set (CPU).

    python benchmarks/train_throughput.py            # 3 warm-up + 10 timed steps per model
    python benchmarks/train_throughput.py --quick    # 1 warm-up + 3 timed steps
    python benchmarks/train_throughput.py --profile  # + top ops of two profiled moetrain steps
    python benchmarks/train_throughput.py --configs h200 --device cuda --bf16 --data corpus --no-peer \
        --warmup 5 --steps 45 --matmul-tflops 700   # the gpu_check.sh run: 50 steps
    ... --set model.num_layers=2 model.hidden_size=64   # any config field, for a small smoke run
"""

from __future__ import annotations

import argparse
import ast
import os
import resource
import statistics
import time

import torch
import torch.nn.functional as F

from moetrain.config import Config, ModelConfig
from moetrain.model import GPT
from moetrain.train.trainer import Trainer


class SyntheticBatches:
    """Stands in for Trainer.train_data: cycles through pre-generated random token batches."""

    def __init__(self, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        self.batches, self.position = batches, 0

    @property
    def samples_drawn(self) -> int:
        return self.position * len(self.batches[0][0])

    def next_batch(self, batch_size: int, rows: slice = slice(None)) -> tuple[torch.Tensor, torch.Tensor]:
        inputs, targets = self.batches[self.position % len(self.batches)]
        assert inputs.shape[0] == batch_size
        self.position += 1
        return inputs[rows], targets[rows]


def default_config() -> Config:
    cfg = Config()
    cfg.training.save = None
    cfg.training.device = "cpu"
    cfg.training.progress_bar = False
    return cfg


def mixtral_config() -> Config:
    cfg = default_config()
    m, moe = cfg.model, cfg.moe
    m.style, m.num_layers, m.hidden_size, m.num_attention_heads, m.seq_length = "llama", 4, 256, 8, 256
    moe.num_experts, moe.topk, moe.expert_interval = [8], 2, 1
    moe.drop_tokens, moe.top2_2nd_expert_sampling = False, False
    return cfg


def h200_config() -> Config:
    cfg = mixtral_config()
    m, moe = cfg.model, cfg.moe
    m.num_layers, m.hidden_size, m.num_attention_heads, m.seq_length = 12, 1024, 16, 2048
    moe.num_experts, moe.expert_interval = [64], 2
    cfg.data.vocab_size = 50304
    return cfg


CONFIGS = {"default": default_config, "mixtral": mixtral_config, "h200": h200_config}


def override(cfg: Config, assignments: list[str]) -> None:
    """Apply `section.field=value` settings (value as a Python literal, else a string)."""
    for assignment in assignments:
        key, _, text = assignment.partition("=")
        section, _, name = key.partition(".")
        target = getattr(cfg, section, None)
        if not text or target is None or not hasattr(target, name):
            raise SystemExit(f"--set {assignment!r}: use section.field=value with a Config field, e.g. "
                             "model.num_layers=2")
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            value = text
        setattr(target, name, value)


def flops_per_token(model: GPT, mc: ModelConfig) -> tuple[float, int, float]:
    """(model FLOPs per token, N, attention FLOPs per token): see the module docstring."""
    active = model.parameter_counts()["active"]
    embeddings = model.tok_emb.weight.numel() + (model.pos_emb.weight.numel() if model.pos_emb is not None else 0)
    n = active - embeddings + model.lm_head.weight.numel()
    attention = 12 * mc.num_layers * mc.hidden_size * mc.seq_length
    return 6 * n + attention, n, attention


def synthetic_batches(cfg: Config, vocab: int, count: int, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(count):
        seq = torch.randint(0, vocab, (cfg.training.micro_batch_size, cfg.model.seq_length + 1), generator=gen)
        batches.append((seq[:, :-1].contiguous(), seq[:, 1:].contiguous()))
    return batches


def build_peer(cfg: Config, vocab: int, fused_adamw: bool = False):
    """The mixtral config as transformers' MixtralForCausalLM, and its optimizer step."""
    from transformers import MixtralConfig, MixtralForCausalLM

    m, moe, tc = cfg.model, cfg.moe, cfg.training
    hf_cfg = MixtralConfig(
        vocab_size=vocab, hidden_size=m.hidden_size, intermediate_size=moe.expert_ffn_size(m),
        num_hidden_layers=m.num_layers, num_attention_heads=m.num_attention_heads,
        num_key_value_heads=m.num_attention_heads, max_position_embeddings=m.seq_length,
        rms_norm_eps=m.norm_eps, rope_parameters={"rope_type": "default", "rope_theta": m.rope_theta},
        num_local_experts=moe.num_experts[0], num_experts_per_tok=moe.topk, output_router_logits=True,
        router_aux_loss_coef=moe.aux_loss_coeff, router_jitter_noise=0.0, tie_word_embeddings=m.tie_embeddings,
        attention_dropout=0.0, use_cache=False, initializer_range=m.init_method_std)
    torch.manual_seed(tc.seed)
    model = MixtralForCausalLM._from_config(hf_cfg, attn_implementation="sdpa", dtype=torch.float32)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=tc.lr, betas=(tc.adam_beta1, tc.adam_beta2),
                                  eps=tc.adam_eps, weight_decay=tc.weight_decay,
                                  **({"fused": True} if fused_adamw else {}))

    def step(inputs: torch.Tensor, targets: torch.Tensor) -> float:
        out = model(input_ids=inputs, use_cache=False)
        lm_loss = F.cross_entropy(out.logits.float().view(-1, out.logits.shape[-1]), targets.view(-1))
        loss = lm_loss + moe.aux_loss_coeff * out.aux_loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), tc.clip_grad)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())

    return model, step


def matmul_seconds(a: torch.Tensor, b: torch.Tensor) -> float:
    start = time.perf_counter()
    torch.mm(a, b)
    return time.perf_counter() - start


def synchronize(device: torch.device | None) -> None:
    if device is not None and device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, *args, device: torch.device | None = None) -> float:
    synchronize(device)
    start = time.perf_counter()
    fn(*args)
    synchronize(device)
    return time.perf_counter() - start


def device_matmul_rate(device: torch.device) -> float:
    """FLOP/s of 20 back-to-back bf16 8192^3 matmuls on `device`, as gpu_check.sh's first section measures."""
    a, b = (torch.randn(8192, 8192, device=device, dtype=torch.bfloat16) for _ in range(2))
    for _ in range(3):
        a @ b
    seconds = timed(lambda: [a @ b for _ in range(20)], device=device)
    return 20 * 2 * 8192**3 / seconds


def peak_memory(device: torch.device) -> tuple[float, str]:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device), "CUDA allocator peak"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "process peak RSS"


def run_config(name: str, cfg: Config, args, a: torch.Tensor, b: torch.Tensor, peer: bool) -> dict:
    trainer = Trainer(cfg, quiet=True)
    device = trainer.device
    vocab = trainer.tokenizer.vocab_size
    batches = synthetic_batches(cfg, vocab, 4, seed=0)
    if args.data == "synthetic":
        trainer.train_data = SyntheticBatches(batches)
    tokens = cfg.training.micro_batch_size * cfg.model.seq_length * trainer.accumulation
    flops, n, attention = flops_per_token(trainer.model, cfg.model)
    counts = trainer.model.parameter_counts()
    print(f"\n[{name}] {cfg.model.style} style, {cfg.model.num_layers} layers, hidden {cfg.model.hidden_size}, "
          f"experts/layer {cfg.experts_per_layer()}, top-{cfg.moe.topk}, drop_tokens {cfg.moe.drop_tokens}, "
          f"vocab {vocab}, {tokens} tokens/step ({args.data} data), {cfg.training.precision} on {device}")
    print(f"[{name}] params total {counts['total'] / 1e6:.2f}M, active {counts['active'] / 1e6:.2f}M, "
          f"N (FLOP count) {n / 1e6:.2f}M -> {flops / 1e6:.1f} MFLOP/token, {flops * tokens / 1e9:.1f} GFLOP/step")

    peer_step = None
    if peer:
        peer_model, peer_step = build_peer(cfg, vocab, fused_adamw=args.peer_fused_adamw)
        peer_total = sum(p.numel() for p in peer_model.parameters())
        impl = getattr(peer_model.config, "_experts_implementation", None)
        print(f"[{name}] transformers MixtralForCausalLM: {peer_total / 1e6:.2f}M params "
              f"(moetrain {counts['total'] / 1e6:.2f}M), experts_implementation={impl}, "
              f"attn={peer_model.config._attn_implementation}, "
              f"AdamW {'fused' if args.peer_fused_adamw else 'default (for-loop on CPU)'}")

    for i in range(args.warmup):
        trainer.train_step()
        if peer_step is not None:
            peer_step(*batches[i % len(batches)])
    ours, theirs, mm = [], [], []
    flop_mm = 2 * a.shape[0] * a.shape[1] * b.shape[1]
    device_rate = None
    if device.type != "cpu":  # the card's bf16 rate, given or measured once: not interleaved
        device_rate = args.matmul_tflops * 1e12 if args.matmul_tflops else device_matmul_rate(device)
    for i in range(args.steps):  # mm: seconds of one 2048^3 matmul at the rate MFU is taken against
        mm.append(flop_mm / device_rate if device_rate else matmul_seconds(a, b))
        inputs, targets = batches[i % len(batches)]
        if peer_step is not None and i % 2:  # alternate which of the two goes first
            theirs.append(timed(peer_step, inputs, targets))
        ours.append(timed(trainer.train_step, device=device))
        if peer_step is not None and not i % 2:
            theirs.append(timed(peer_step, inputs, targets))
    rate = flop_mm / statistics.median(mm)
    step_s = statistics.median(ours)
    step_flops = flops * tokens
    # per round: this step's FLOP rate over the matmul rate measured just before it (same load)
    paired_mfu = statistics.median(step_flops / o / (flop_mm / m) for o, m in zip(ours, mm))
    result = {"name": name, "step_s": step_s, "tokens_per_s": tokens / step_s, "rate": rate,
              "mfu": step_flops / step_s / rate, "paired_mfu": paired_mfu, "steps": ours,
              "flops_step": step_flops, "best_mfu": step_flops / min(ours) / (flop_mm / min(mm))}
    memory, memory_kind = peak_memory(device)
    result.update(causal_mfu=(flops - attention / 2) * tokens / step_s / rate, peak_gib=memory / 2**30)
    if device_rate:
        print(f"[{name}] matmul rate: {rate / 1e12:.0f} TFLOP/s (bf16 8192^3, "
              f"{'given' if args.matmul_tflops else 'measured'})")
    else:
        print(f"[{name}] matmul rate: median {rate / 1e9:.1f} GFLOP/s, best {flop_mm / min(mm) / 1e9:.1f} "
              f"({len(mm)} interleaved 2048^3 matmuls)")
    print(f"[{name}] moetrain step: median {step_s * 1e3:.0f} ms (min {min(ours) * 1e3:.0f}, max "
          f"{max(ours) * 1e3:.0f}) -> {tokens / step_s:,.0f} tokens/s, {step_flops / step_s / 1e9:.1f} GFLOP/s; "
          f"MFU {result['mfu']:.1%} (medians), {paired_mfu:.1%} (median per round), "
          f"{result['best_mfu']:.1%} (best step / best matmul); causal-attention count {result['causal_mfu']:.1%}")
    print(f"[{name}] peak memory {result['peak_gib']:.2f} GiB ({memory_kind})")
    if theirs:
        peer_s = statistics.median(theirs)
        paired = statistics.median(t / o for o, t in zip(ours, theirs))
        result.update(peer_step_s=peer_s, peer_mfu=step_flops / peer_s / rate, paired_ratio=paired,
                      best_ratio=min(theirs) / min(ours))
        print(f"[{name}] transformers step: median {peer_s * 1e3:.0f} ms (min {min(theirs) * 1e3:.0f}, max "
              f"{max(theirs) * 1e3:.0f}) -> {tokens / peer_s:,.0f} tokens/s, MFU {result['peer_mfu']:.1%} (medians)")
        print(f"[{name}] transformers / moetrain step time (>1: moetrain faster): medians "
              f"{peer_s / step_s:.2f}x, median of per-round ratios {paired:.2f}x, best/best "
              f"{result['best_ratio']:.2f}x")
    if args.profile:
        from torch.profiler import profile
        with profile() as prof:
            for _ in range(2):
                trainer.train_step()
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.profile_rows))
    return result


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1 warm-up and 3 timed steps")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--configs", default="default,mixtral", help=f"comma list of {', '.join(CONFIGS)}")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast (moetrain train --bf16)")
    parser.add_argument("--matmul-tflops", type=float, default=None,
                        help="the device's measured bf16 matmul rate for MFU (default: measure it; CPU: fp32, "
                             "interleaved)")
    parser.add_argument("--data", choices=("synthetic", "corpus"), default="synthetic",
                        help="random tokens, or the trainer's own loader over the built-in corpus")
    parser.add_argument("--set", nargs="+", default=[], metavar="SECTION.FIELD=VALUE",
                        help="override config fields, e.g. model.num_layers=2 training.micro_batch_size=1")
    parser.add_argument("--no-peer", action="store_true", help="skip the transformers comparison")
    parser.add_argument("--peer-fused-adamw", action="store_true",
                        help="give the transformers peer torch's fused AdamW too (default: AdamW's defaults)")
    parser.add_argument("--profile", action="store_true", help="print the top ops of two moetrain steps")
    parser.add_argument("--profile-rows", type=int, default=20)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    args = parser.parse_args(argv)
    if args.quick:
        args.warmup, args.steps = 1, 3
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        import transformers
        have_peer = not args.no_peer
        peer_version = transformers.__version__
    except ImportError:
        have_peer, peer_version = False, None
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; transformers "
          f"{peer_version or 'not installed'}; warm-up {args.warmup}, timed {args.steps} steps per model; "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    torch.manual_seed(0)
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    for _ in range(2):
        matmul_seconds(a, b)
    results = []
    for name in args.configs.split(","):
        cfg = CONFIGS[name]()
        cfg.training.device = args.device
        if args.bf16:
            cfg.training.precision = "bf16"
        override(cfg, args.set)
        results.append(run_config(name, cfg, args, a, b, peer=have_peer and name == "mixtral"))
    print(f"\nload average at the end {os.getloadavg()[0]:.1f}")
    print("\n| config | tokens/step | GFLOP/step | step (ms) | tokens/s | matmul GFLOP/s | MFU medians |"
          " MFU per round | MFU best | MFU causal | peak GiB | transformers step (ms) | transformers / moetrain "
          "(medians, per round) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        peer = (f"{r['peer_step_s'] * 1e3:.0f} | {r['peer_step_s'] / r['step_s']:.2f}x, {r['paired_ratio']:.2f}x"
                if "peer_step_s" in r else "- | -")
        tokens = r["tokens_per_s"] * r["step_s"]
        print(f"| {r['name']} | {tokens:.0f} | {r['flops_step'] / 1e9:.1f} | {r['step_s'] * 1e3:.0f} | "
              f"{r['tokens_per_s']:,.0f} | {r['rate'] / 1e9:.1f} | {r['mfu']:.1%} | {r['paired_mfu']:.1%} | "
              f"{r['best_mfu']:.1%} | {r['causal_mfu']:.1%} | {r['peak_gib']:.2f} | {peer} |")
    return results


if __name__ == "__main__":
    main()
