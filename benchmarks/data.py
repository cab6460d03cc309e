"""Data pipeline speed: prepare-data throughput by worker count, and the training reader against a training step.

1. prepare-data: the built-in corpus repeated to --size-mb of JSONL, tokenized with the default run's
   tokenizer (byte-level BPE, vocabulary 4096, trained once on the built-in corpus; --tokenizer gpt2 or
   sentencepiece for those paths) into moetrain's format, rounds interleaved, by: the default (no --workers: in
   this process, the tokenizer library's threads on every core), and --workers 1, 2 and 4 (processes of one
   thread each, as Megatron's workers; 1 is the baseline of scaling by processes). Reports tokens/s, MB/s,
   CPU seconds per M tokens (the cost of the workers' pipes and shards shows there) and the speed-up over
   --workers 1 and over the default side by side,
   and checks every run wrote the same bytes.
2. reader: the same ids written in Megatron's format, then read by a fresh process after the .bin is
   evicted from the page cache (posix_fadvise DONTNEED), as a prefix larger than the cache would be:
   batches/s of the default run's micro-batch (8 x 256 tokens, random windows) cold and then warm.
3. cost: in one process, the default model (`moetrain train` defaults on CPU, float32) trained from that
   prefix; the reader's next_batch and the whole train_step timed alternately; reports the ratio.

    python benchmarks/data.py                   # 100 MB corpus
    python benchmarks/data.py --size-mb 20      # smaller, for a shared machine
    python benchmarks/data.py --size-mb 20 --rounds 3 --prepare-only --tokenizer sentencepiece
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import tokenizers

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


def cpu_seconds() -> float:
    """CPU time of this process and of its finished children (the worker processes, once joined)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def prepare_speeds(corpus: Path, work: Path, tokenizer, workers: list[int], rounds: int) -> list[dict]:
    """The default (this process, the tokenizer library's threads on every core), `--workers 1` (one process of
    one thread: the baseline of scaling by processes), then each N > 1; rounds interleaved.
    Returns, per run: name, median seconds, CPU seconds, token count, output identical to the first run's."""
    runs = [{"name": "default (library threads)", "workers": None},
            *({"name": f"--workers {n} (one thread each)", "workers": n} for n in sorted({1, *workers}))]
    for index, run in enumerate(runs):
        run.update(prefix=work / f"run{index}", times=[], cpu_times=[])
    for _ in range(rounds):
        for run in runs:
            start, cpu = time.perf_counter(), cpu_seconds()
            write_prepared(read_documents(corpus), run["prefix"], tokenizer, workers=run["workers"])
            run["times"].append(time.perf_counter() - start)
            run["cpu_times"].append(cpu_seconds() - cpu)

    def files(run: dict) -> tuple[bytes, bytes]:
        return Path(f"{run['prefix']}.bin").read_bytes(), Path(f"{run['prefix']}.idx").read_bytes()

    reference = files(runs[0])
    for run in runs:
        run.update(seconds=statistics.median(run["times"]), cpu=statistics.median(run["cpu_times"]),
                   tokens=len(reference[0]) // 2, same=files(run) == reference)  # uint16 ids: vocabulary 4096
    return runs


def benchmark_tokenizer(kind: str, work: Path):
    """The default run's tokenizer (byte-level BPE, vocabulary 4096, trained on the built-in corpus), the same
    vocabulary and merges read back as GPT-2's vocab.json + merges.txt, or a SentencePiece BPE model of the
    same size trained on the built-in corpus."""
    if kind == "bpe":
        return build_tokenizer("bpe", texts=default_corpus(), vocab_size=4096)
    if kind == "gpt2":
        trained = build_tokenizer("bpe", texts=default_corpus(), vocab_size=4096)
        vocab, merges = tokenizers.Tokenizer.from_str(trained.to_json()).model.save(str(work), "gpt2")
        return build_tokenizer("gpt2", vocab_file=vocab, merge_file=merges)
    import sentencepiece

    text = work / "corpus.txt"
    text.write_text("\n".join(default_corpus()), encoding="utf-8")
    sentencepiece.SentencePieceTrainer.train(input=str(text), model_prefix=str(work / "sp"), vocab_size=4096,
                                             model_type="bpe", eos_piece="<|endoftext|>", minloglevel=2)
    return build_tokenizer("sentencepiece", tokenizer_model=str(work / "sp.model"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-mb", type=float, default=100.0, help="JSONL corpus size for prepare-data")
    parser.add_argument("--workers", type=int, nargs="+", default=[2, 4],
                        help="worker counts to time besides 1 and the default")
    parser.add_argument("--rounds", type=int, default=1, help="interleaved rounds of every worker count")
    parser.add_argument("--tokenizer", choices=("bpe", "gpt2", "sentencepiece"), default="bpe",
                        help="bpe: the default run's; gpt2: the same as vocab.json + merges.txt; sentencepiece")
    parser.add_argument("--prepare-only", action="store_true", help="stop after prepare-data")
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
        tokenizer = benchmark_tokenizer(args.tokenizer, work)
        print(f"corpus: {size / 1e6:.1f} MB of JSONL ({corpus}); tokenizer: {args.tokenizer}, vocab "
              f"{tokenizer.vocab_size}; {os.cpu_count()} CPUs")

        runs = prepare_speeds(corpus, work, tokenizer, args.workers, args.rounds)
        tokens = runs[0]["tokens"]
        print(f"prepare-data (moetrain format, {args.tokenizer} tokenizer, {tokens:,} tokens, median of "
              f"{args.rounds} interleaved rounds; CPU s/M tokens = this process + its workers):")
        library, one_thread = runs[0]["seconds"], runs[1]["seconds"]
        for run in runs:
            took = run["seconds"]
            print(f"  {run['name']:<28} {took:7.2f} s  {tokens / took / 1e6:5.2f} M tokens/s  "
                  f"{size / took / 1e6:5.2f} MB/s  {run['cpu'] / tokens * 1e6:5.2f} CPU s/M tokens  "
                  f"x{one_thread / took:.2f} of --workers 1  x{library / took:.2f} of the default  "
                  f"{'identical' if run['same'] else 'DIFFERENT'} output")
        if args.prepare_only:
            return

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
