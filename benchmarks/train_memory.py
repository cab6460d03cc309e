"""Memory of one training step, with and without activation recomputation and the chunked LM loss.

A GPT with a 50k vocabulary (8 layers, hidden 256, 4 experts top-2 every other layer, float32 on the
CPU) takes one forward, backward and AdamW step at micro-batch 1, 4 and 16, under four settings:
the plain loss (whole fp32 logits, `F.cross_entropy(logits.float())`, what moetrain did before) or
the chunked one (`moetrain.lm_loss`), each without and with full recomputation (uniform, 1 layer).

Two figures per run, each in a fresh process (so no allocator cache carries over):
  saved   bytes autograd keeps for backward at the end of the forward (saved-tensor hooks; storages
          counted once, parameters left out), of the blocks (activations) and of the loss (the
          plain loss keeps an fp32 log-softmax [tokens, V]; the chunked one the head's gradients
          [tokens, hidden] and [V, hidden]): exact and noise-free
  peak    the process's resident high-water mark (VmHWM) during the step minus its resident size
          before it: everything the step allocates at once (activations, logits, gradients, the
          optimizer's state), as the host sees it

and the largest micro-batch whose peak stays within --budget-mb (from the measured sizes).

    python benchmarks/train_memory.py                     # micro-batches 1, 4, 16, sequence 256
    python benchmarks/train_memory.py --micro 1 4 --seq 128   # smaller, faster
    python benchmarks/train_memory.py --micro 16 --settings chunked:none --chunk-mb 64   # one setting
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

from moetrain.lm_loss import CHUNK_BYTES

SETTINGS = [("plain", None), ("chunked", None), ("plain", "full"), ("chunked", "full")]


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def measure(loss_kind: str, recompute: str | None, micro: int, seq: int, vocab: int, layers: int,
            chunk_mb: float) -> dict:
    """One step of one setting in this process: saved-for-backward and peak bytes."""
    import torch
    import torch.nn.functional as F

    from moetrain.config import ModelConfig, MoEConfig
    from moetrain.lm_loss import linear_cross_entropy
    from moetrain.model import GPT, ModelOutput

    torch.manual_seed(0)
    cfg = ModelConfig(style="llama", num_layers=layers, hidden_size=256, num_attention_heads=4, seq_length=seq,
                      vocab_size=vocab, recompute_granularity=recompute)
    model = GPT(cfg, MoEConfig(num_experts=[4], expert_interval=2, topk=2, drop_tokens=False)).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ids = torch.randint(0, vocab, (micro, seq))
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    blocks_saved: dict[int, int] = {}
    loss_saved: dict[int, int] = {}

    def keeper(into: dict[int, int]):
        def pack(tensor):
            storage = tensor.untyped_storage()
            if storage.data_ptr() not in params:
                into[storage.data_ptr()] = storage.nbytes()
            return tensor
        return torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t)

    targets = ids.roll(-1, 1)
    before = _rss_kib("VmRSS")
    with keeper(blocks_saved):
        hidden, aux, z = model.forward_stage(ids)
    with keeper(loss_saved):
        out = ModelOutput(hidden, model.lm_head.weight, None, aux, z)
        if loss_kind == "chunked":
            loss = linear_cross_entropy(hidden, model.lm_head.weight, targets, chunk_bytes=int(chunk_mb * 2**20))
        else:
            loss = F.cross_entropy(out.logits.float().flatten(0, 1), targets.flatten())
        del out
    loss.backward()
    optimizer.step()
    peak = (_rss_kib("VmHWM") - before) * 1024
    return {"loss": loss_kind, "recompute": recompute or "none", "micro": micro,
            "blocks_mb": sum(blocks_saved.values()) / 2**20, "loss_mb": sum(loss_saved.values()) / 2**20,
            "peak_mb": peak / 2**20, "logits_mb": micro * seq * vocab * 4 / 2**20}


def _run_fresh(args, loss_kind: str, recompute: str | None, micro: int) -> dict:
    code = (f"import json, sys; sys.path.insert(0, {os.getcwd()!r}); from benchmarks.train_memory import measure; "
            f"print(json.dumps(measure({loss_kind!r}, {recompute!r}, {micro}, {args.seq}, {args.vocab}, "
            f"{args.layers}, {args.chunk_mb})))")
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--micro", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--vocab", type=int, default=50_000)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--budget-mb", type=float, default=2048)
    parser.add_argument("--chunk-mb", type=float, default=CHUNK_BYTES / 2**20,
                        help="fp32 logits of one chunk of the chunked loss (moetrain.lm_loss.CHUNK_BYTES)")
    parser.add_argument("--settings", nargs="+", default=[f"{loss}:{r or 'none'}" for loss, r in SETTINGS],
                        help="loss:recompute pairs to run")
    args = parser.parse_args()
    settings = [(loss, None if r == "none" else r) for loss, r in (s.split(":") for s in args.settings)]
    rows = [_run_fresh(args, loss, recompute, micro) for micro in args.micro for loss, recompute in settings]
    print(f"{args.layers} layers, hidden 256, vocab {args.vocab}, seq {args.seq}, fp32, CPU, chunk "
          f"{args.chunk_mb:.0f} MB; one fresh process each")
    print(f"{'micro':>5} {'loss':>8} {'recompute':>9} {'blocks MB':>9} {'loss MB':>8} {'peak MB':>8} "
          f"{'fp32 logits MB':>15}")
    for r in rows:
        print(f"{r['micro']:>5} {r['loss']:>8} {r['recompute']:>9} {r['blocks_mb']:>9.1f} {r['loss_mb']:>8.1f} "
              f"{r['peak_mb']:>8.1f} {r['logits_mb']:>15.1f}")
    if set(settings) != set(SETTINGS):
        return
    print()
    for micro in args.micro:
        by = {(r["loss"], r["recompute"]): r for r in rows if r["micro"] == micro}
        logits = by[("plain", "none")]["logits_mb"]
        lower = by[("plain", "none")]["peak_mb"] - by[("chunked", "none")]["peak_mb"]
        removed_saved = (by[("plain", "none")]["loss_mb"] - by[("chunked", "none")]["loss_mb"]) / logits
        activations = by[("chunked", "none")]["blocks_mb"] / by[("chunked", "full")]["blocks_mb"]
        print(f"micro {micro:>2}: the chunked loss keeps {100 * removed_saved:.0f}% of one fp32 logits copy "
              f"({logits:.0f} MB) less for backward, and its step peaks {lower:.0f} MB "
              f"({lower / logits:.1f} logits copies) lower; full recompute keeps {activations:.1f}x fewer "
              f"activation bytes")
    for loss, recompute in settings:
        fits = [r["micro"] for r in rows if (r["loss"], r["recompute"]) == (loss, recompute or "none")
                and r["peak_mb"] <= args.budget_mb]
        print(f"largest micro-batch within {args.budget_mb:.0f} MB, {loss} loss, recompute {recompute or 'none'}: "
              f"{max(fits) if fits else 'none measured'}")


if __name__ == "__main__":
    main()
