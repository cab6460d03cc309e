"""prepare-data's worker processes: every worker count writes the ids of encoding each document on its own, in
input order, with each worker on one thread and nothing left behind."""

import json
import os
from pathlib import Path

import numpy as np
import pytest
from tokenizers import pre_tokenizers

import moetrain.data.encode as encode_module
from moetrain.data import DataError, build_tokenizer, default_corpus
from moetrain.data.indexed import open_prefix, write_megatron, write_prepared
from moetrain.data.tokenizer import Tokenizer

DOCUMENTS = [f"document {i}: " + "héllo wörld, ünïcode → ok " * (i % 9) + "the end" * (i % 3) for i in range(300)]


def gpt2_files(tmp_path):
    """GPT-2's vocab.json / merges.txt layout: every byte symbol, a few merges, then <|endoftext|>."""
    merges = [("t", "h"), ("th", "e"), ("Ġ", "w"), ("e", "n"), ("Ġw", "Ã")]
    symbols = sorted(pre_tokenizers.ByteLevel.alphabet()) + ["".join(pair) for pair in merges] + ["<|endoftext|>"]
    (tmp_path / "vocab.json").write_text(json.dumps({symbol: index for index, symbol in enumerate(symbols)}))
    (tmp_path / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    return str(tmp_path / "vocab.json"), str(tmp_path / "merges.txt")


def sentencepiece_model(tmp_path):
    spm = pytest.importorskip("sentencepiece")
    (tmp_path / "text.txt").write_text("\n".join(DOCUMENTS))
    spm.SentencePieceTrainer.train(input=str(tmp_path / "text.txt"), model_prefix=str(tmp_path / "sp"),
                                   vocab_size=120, model_type="bpe", minloglevel=2)
    return str(tmp_path / "sp.model")


def tokenizer_of(kind, tmp_path):
    if kind == "bpe":
        return build_tokenizer("bpe", texts=list(default_corpus())[:20], vocab_size=400)
    if kind == "gpt2":
        vocab, merges = gpt2_files(tmp_path)
        return build_tokenizer("GPT2BPETokenizer", vocab_file=vocab, merge_file=merges)
    if kind == "sentencepiece":
        return build_tokenizer("SentencePieceTokenizer", tokenizer_model=sentencepiece_model(tmp_path))
    return build_tokenizer(kind)


@pytest.fixture
def small_chunks(monkeypatch):
    """~25 documents a chunk, so 300 documents make a dozen chunks spread over the workers."""
    monkeypatch.setattr(encode_module, "BATCH_CHARACTERS", 2000)
    monkeypatch.setattr(encode_module, "WORKER_CHUNK_CHARACTERS", 2000)


@pytest.mark.parametrize("kind", ["byte", "bpe", "gpt2", "sentencepiece"])
def test_every_worker_count_writes_each_documents_own_ids_in_order(kind, tmp_path, small_chunks):
    tokenizer = tokenizer_of(kind, tmp_path)
    expected = [tokenizer.encode(text) + [tokenizer.eos_id] for text in DOCUMENTS]  # one document at a time
    before = os.environ.get("TOKENIZERS_PARALLELISM")
    for workers in (None, 1, 2, 3):
        out = tmp_path / f"out{workers}"
        write_prepared(DOCUMENTS, out / "p", tokenizer, workers=workers)
        dataset = open_prefix(str(out / "p"))
        assert [dataset.document(i).tolist() for i in range(dataset.num_documents)] == expected, workers
        assert sorted(path.name for path in out.iterdir()) == ["p.bin", "p.idx", "p.tokenizer.json"]  # no shards
        assert os.environ.get("TOKENIZERS_PARALLELISM") == before
    # Megatron's format without --append-eod: the same ids, no eos
    write_megatron(DOCUMENTS, tmp_path / "m" / "p", tokenizer, workers=2)
    assert open_prefix(str(tmp_path / "m" / "p")).tokens.tolist() == sum((ids[:-1] for ids in expected), [])


def test_workers_encode_on_one_thread_and_a_failure_leaves_nothing(tmp_path, small_chunks, monkeypatch):
    encode_batch = Tokenizer.encode_batch

    def checked_encode_batch(self, texts):  # runs in the forked workers
        if os.environ.get("TOKENIZERS_PARALLELISM") != "false":
            raise AssertionError("a worker encodes with the tokenizer library's threads")
        if any(text.startswith("document 200:") for text in texts):
            raise DataError("cannot encode document 200")
        return encode_batch(self, texts)

    monkeypatch.setattr(Tokenizer, "encode_batch", checked_encode_batch)
    tokenizer = build_tokenizer("byte")
    write_prepared(DOCUMENTS[:200], tmp_path / "ok" / "p", tokenizer, workers=2)
    assert open_prefix(str(tmp_path / "ok" / "p")).num_documents == 200
    with pytest.raises(DataError, match="cannot encode document 200"):
        write_prepared(DOCUMENTS, tmp_path / "failed" / "p", tokenizer, workers=2)
    assert list((tmp_path / "failed").iterdir()) == []  # no shards, no half-written .bin


def test_sentencepiece_follows_tokenizers_parallelism(tmp_path, monkeypatch):
    tokenizer = tokenizer_of("sentencepiece", tmp_path)
    expected = [tokenizer.encode(text) for text in DOCUMENTS[:3]]
    processor = tokenizer._backend._processor
    threads = []
    encode = processor.encode

    def spy(texts, num_threads):
        threads.append(num_threads)
        return encode(texts, num_threads=num_threads)

    monkeypatch.setattr(processor, "encode", spy)
    for setting in ("false", "0", "true"):
        monkeypatch.setenv("TOKENIZERS_PARALLELISM", setting)
        assert tokenizer.encode_batch(DOCUMENTS[:3]) == expected
    monkeypatch.delenv("TOKENIZERS_PARALLELISM")
    tokenizer.encode_batch(DOCUMENTS[:3])
    assert threads == [1, 1, -1, -1]  # one thread when disabled, every core otherwise (as the tokenizers library)


def test_chunks_hold_whole_documents_in_order_and_end_at_the_size():
    documents = ["a" * 5, "b" * 3, "c" * 9, "d", "e" * 2]
    chunks = list(encode_module._chunks(documents, 8))
    assert chunks == [["a" * 5, "b" * 3], ["c" * 9], ["d", "e" * 2]]
    assert list(encode_module._chunks([], 8)) == []
    assert np.array_equal(encode_module.write_token_ids(open(os.devnull, "wb"), [], build_tokenizer("byte"),
                                                        np.dtype("<u2"), append_eos=True), [])


def test_prepare_data_refuses_fewer_than_one_worker(tmp_path):
    from moetrain.cli import run as run_command

    (tmp_path / "in.txt").write_text("text")
    with pytest.raises(DataError, match="--workers must be at least 1, got 0"):
        run_command("prepare-data", ["--input", str(tmp_path / "in.txt"), "--output-prefix",
                                     str(Path(tmp_path) / "p"), "--tokenizer-type", "byte", "--workers", "0"])
