"""Data pipeline speed: prepare-data throughput by worker count, and the training reader against a training step.

1. prepare-data: the built-in corpus repeated to --size-mb of JSONL, tokenized with the default run's
   tokenizer (byte-level BPE, vocabulary 4096, trained once on the built-in corpus) into moetrain's format
   by 1, 2 and 4 worker processes (--workers), rounds interleaved. Reports tokens/s, MB/s and the speed-up
   over 1 worker, and checks every worker count wrote the same bytes. With 1 worker, encoding runs in this
   process (the tokenizers library may use several threads); with N, N single-threaded processes.
2. reader: the same ids written in Megatron's format, then read by a fresh process after the .bin is
   evicted from the page cache (posix_fadvise DONTNEED), as a prefix larger than the cache would be:
   batches/s of the default run's micro-batch (8 x 256 tokens, random windows) cold and then warm.
3. cost: in one process, the default model (`moetrain train` defaults on CPU, float32) trained from that
   prefix; the reader's next_batch and the whole train_step timed alternately; reports the ratio.

    python benchmarks/data.py                   # 100 MB corpus
    python benchmarks/data.py --size-mb 20      # smaller, for a shared machine
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from moetrain.config import Config  # noqa: E402
from moetrain.data import (  # noqa: E402  # noqa: E402
    build_tokenizer,
    default_corpus,
    load_training_data,
    read_documents,
    write_megatron,
    write_prepared,
)


def write_corpus(path: Path, size_mb: float) -> int:
    """The built-in corpus as JSONL, repeated until at least `size_mb` MB; returns the byte count."""
    lines = [json.dumps({"text": text}) + "\n" for text in default_corpus()]
    written = 0
    with open(path, "w", encoding="utf-8") as out:
        while written < size_mb * 1e6:
            for line in lines:
                out.write(line)
                written += len(line.encode("utf-8"))
    return written


def evict(path: Path) -> None:
    """Drop the file's pages from the page cache, so the next reader goes to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def default_shape() -> tuple[int, int]:
    cfg = Config()
    return cfg.training.micro_batch_size, cfg.model.seq_length


def read_batches(prefix: str, count: int) -> dict:
    """In a fresh process: open the prefix, then time `count` cold and `count` warm micro-batches."""
    micro, seq = default_shape()
    start = time.perf_counter()
    _, train, _ = load_training_data([prefix], seq_length=seq, split="100,0,0")
    opened = time.perf_counter() - start
    result = {"open_s": opened}
    for phase in ("cold", "warm"):
        start = time.perf_counter()
        for _ in range(count):
            train.next_batch(micro)
        result[f"{phase}_batches_per_s"] = count / (time.perf_counter() - start)
        if phase == "cold":
            train.load_state_dict({**train.state_dict(), "epoch": 0, "cursor": 0})  # the same windows again, warm
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-mb", type=float, default=100.0, help="JSONL corpus size for prepare-data")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--rounds", type=int, default=1, help="interleaved rounds of every worker count")
    parser.add_argument("--reader-batches", type=int, default=200)
    parser.add_argument("--steps", type=int, default=5, help="timed training steps (after 2 warm-up steps)")
    parser.add_argument("--dir", help="working directory (default: a temporary one)")
    parser.add_argument("--read", metavar="PREFIX", help=argparse.SUPPRESS)  # the fresh reader process
    args = parser.parse_args()
    if args.read:
        print(json.dumps(read_batches(args.read, args.reader_batches)))
        return

    with tempfile.TemporaryDirectory(dir=args.dir) as work:
        work = Path(work)
        corpus = work / "corpus.jsonl"
        size = write_corpus(corpus, args.size_mb)
        tokenizer = build_tokenizer("bpe", texts=default_corpus(), vocab_size=4096)
        print(f"corpus: {size / 1e6:.1f} MB of JSONL ({corpus}); tokenizer: byte-level BPE, vocab 4096; "
              f"{os.cpu_count()} CPUs")

        seconds: dict[int, list[float]] = {w: [] for w in args.workers}
        for _ in range(args.rounds):
            for workers in args.workers:
                start = time.perf_counter()
                write_prepared(read_documents(corpus), work / f"w{workers}", tokenizer, workers=workers)
                seconds[workers].append(time.perf_counter() - start)
        tokens = (work / f"w{args.workers[0]}.bin").stat().st_size // 2
        reference = (work / f"w{args.workers[0]}.bin").read_bytes()
        base = statistics.median(seconds[args.workers[0]])
        print("prepare-data (moetrain format):")
        for workers in args.workers:
            same = (work / f"w{workers}.bin").read_bytes() == reference
            took = statistics.median(seconds[workers])
            print(f"  --workers {workers}: {took:7.2f} s  {tokens / took / 1e6:6.2f} M tokens/s  "
                  f"{size / took / 1e6:6.2f} MB/s  x{base / took:.2f}  {'identical' if same else 'DIFFERENT'} output")

        prefix = str(work / "megatron_text_document")
        write_megatron(read_documents(corpus), prefix, tokenizer, append_eod=True)
        evict(Path(prefix + ".bin"))
        reader = subprocess.run([sys.executable, __file__, "--read", prefix, "--reader-batches",
                                 str(args.reader_batches)], capture_output=True, text=True, check=True,
                                env={**os.environ, "PYTHONPATH": str(ROOT)})
        read = json.loads(reader.stdout.strip().splitlines()[-1])
        micro, seq = default_shape()
        print(f"reader (fresh process, Megatron prefix of {tokens:,} uint16 ids, batches of {micro} x {seq}): "
              f"open {read['open_s'] * 1e3:.1f} ms, {read['cold_batches_per_s']:,.0f} batches/s cold (evicted from "
              f"the page cache), {read['warm_batches_per_s']:,.0f} batches/s warm")

        from moetrain.train.trainer import Trainer

        cfg = Config()
        cfg.data.data_path, cfg.data.split = [prefix], "100,0,0"
        cfg.training.save, cfg.training.device, cfg.training.progress_bar = None, "cpu", False
        trainer = Trainer(cfg, quiet=True)
        _, probe, _ = load_training_data([prefix], seq_length=seq, split="100,0,0", seed=7)
        for _ in range(2):
            trainer.train_step()
        evict(Path(prefix + ".bin"))
        step_s, batch_s = [], []
        for _ in range(args.steps):
            start = time.perf_counter()
            probe.next_batch(micro * trainer.accumulation)
            batch_s.append(time.perf_counter() - start)
            start = time.perf_counter()
            trainer.train_step()
            step_s.append(time.perf_counter() - start)
        step, batch = statistics.median(step_s), statistics.median(batch_s)
        print(f"default model step (CPU, fp32, {trainer.accumulation} x {micro} x {seq} tokens): {step * 1e3:.0f} ms; "
              f"the reader's batch for it (cold windows): {batch * 1e3:.3f} ms = {100 * batch / step:.3f}% of a step")


if __name__ == "__main__":
    main()
