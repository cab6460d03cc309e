"""moetrain.data against hand-computed references: tokenizers, inputs, the .bin/.idx format, batches."""

import json
import math
import struct
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

import moetrain.data.loader as loader_module
from moetrain.cli import run as run_command
from moetrain.data import (
    DataError,
    IndexedDataset,
    TokenBatches,
    Tokenizer,
    build_tokenizer,
    default_corpus,
    load_training_data,
    prepare_data,
    read_documents,
)

EOS = "<|endoftext|>"
HARD_TEXT = "héllo wörld 😀 日本語\x00\t\r\n  tabs\tand  spaces\u0301 ∑ <|endoftext|> end"


def write_jsonl(path, texts):
    path.write_text("".join(json.dumps({"text": text}) + "\n" for text in texts), encoding="utf-8")


# ---------------------------------------------------------------- tokenizers

def test_byte_tokenizer_ids_are_utf8_bytes_and_round_trip(tmp_path):
    tokenizer = build_tokenizer("byte")
    assert (tokenizer.vocab_size, tokenizer.eos_id) == (257, 256)
    assert tokenizer.encode("hé\n A") == [104, 195, 169, 10, 32, 65]  # 'é' is UTF-8 0xC3 0xA9
    assert tokenizer.encode(HARD_TEXT)[:3] == [104, 195, 169]
    assert tokenizer.decode(tokenizer.encode(HARD_TEXT)) == HARD_TEXT
    assert tokenizer.decode([104, 105, 256]) == "hi" + EOS
    tokenizer.save(tmp_path)  # a directory: written as tokenizer.json inside it
    loaded = Tokenizer.load(tmp_path / "tokenizer.json")
    assert loaded.encode(HARD_TEXT) == tokenizer.encode(HARD_TEXT)
    assert (loaded.vocab_size, loaded.eos_id) == (257, 256)


def tiny_gpt2_files(tmp_path, extra_tokens=0):
    """A hand-made GPT-2 vocab/merges pair; 'Ġ' is GPT-2's symbol for the space byte."""
    vocab = {"a": 0, "h": 1, "e": 2, "l": 3, "o": 4, "Ġ": 5, "w": 6, "r": 7, "d": 8,
             "he": 9, "ll": 10, "hell": 11, "hello": 12, "Ġw": 13, "or": 14, "Ġwor": 15}
    vocab.update({f"filler{i}": 16 + i for i in range(extra_tokens)})
    vocab[EOS] = len(vocab)
    merges = ["h e", "l l", "he ll", "hell o", "Ġ w", "o r", "Ġw or"]
    vocab_file, merge_file = tmp_path / "vocab.json", tmp_path / "merges.txt"
    vocab_file.write_text(json.dumps(vocab), encoding="utf-8")
    merge_file.write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    return str(vocab_file), str(merge_file)


def test_gpt2_tokenizer_applies_merges_in_rank_order(tmp_path):
    vocab_file, merge_file = tiny_gpt2_files(tmp_path)
    tokenizer = build_tokenizer("gpt2", vocab_file=vocab_file, merge_file=merge_file)
    assert (tokenizer.vocab_size, tokenizer.eos_id) == (17, 16)
    # "hello" merges fully to 12; "Ġworld" -> Ġw or l d -> Ġwor l d.
    assert tokenizer.encode("hello world") == [12, 15, 3, 8]
    assert tokenizer.decode([12, 15, 3, 8, 16]) == "hello world" + EOS
    tokenizer.save(tmp_path / "gpt2.json")
    assert Tokenizer.load(tmp_path / "gpt2.json").encode("hello world") == [12, 15, 3, 8]


def test_gpt2_tokenizer_errors(tmp_path):
    vocab_file, merge_file = tiny_gpt2_files(tmp_path)
    with pytest.raises(DataError, match="needs --merge-file"):
        build_tokenizer("gpt2", vocab_file=vocab_file)
    with pytest.raises(DataError, match="--vocab-file .*not found"):
        build_tokenizer("gpt2", vocab_file=str(tmp_path / "missing.json"), merge_file=merge_file)
    no_eos = tmp_path / "no_eos.json"
    no_eos.write_text(json.dumps({k: v for k, v in json.loads(Path(vocab_file).read_text()).items() if k != EOS}))
    with pytest.raises(DataError, match="has no '<|endoftext|>' entry"):
        build_tokenizer("gpt2", vocab_file=str(no_eos), merge_file=merge_file)
    with pytest.raises(DataError, match="unknown tokenizer type 'wordpiece'"):
        build_tokenizer("wordpiece")
    with pytest.raises(DataError, match="not read by --tokenizer-type byte"):  # given files are never ignored
        build_tokenizer("byte", vocab_file=vocab_file, merge_file=merge_file)


def test_bpe_is_deterministic_learns_merges_and_round_trips():
    texts = [f"def function_{i}(value):\n    return value * {i} + offset\n" for i in range(200)]
    first = build_tokenizer("bpe", texts=texts, vocab_size=400)
    second = build_tokenizer("bpe", texts=iter(texts), vocab_size=400)
    assert first.to_json() == second.to_json()
    assert first.vocab_size == 400 and first.decode([first.eos_id]) == EOS
    sample = "def function_7(value):\n    return value * 7 + offset\n"
    assert first.encode(sample) == second.encode(sample)
    assert len(first.encode(sample)) < len(sample.encode()) / 2  # merges learned from the repeated code
    assert first.decode(first.encode(HARD_TEXT)) == HARD_TEXT  # unseen bytes still round-trip
    with pytest.raises(DataError, match="at least 257"):
        build_tokenizer("bpe", texts=texts, vocab_size=100)
    with pytest.raises(DataError, match="pass texts"):
        build_tokenizer("bpe")


def test_tokenizer_load_errors(tmp_path):
    with pytest.raises(DataError, match="not found"):
        Tokenizer.load(tmp_path / "none.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(DataError, match="not a tokenizers JSON file"):
        Tokenizer.load(tmp_path / "bad.json")


# ---------------------------------------------------------------- inputs

def test_read_documents_txt_jsonl_and_sorted_directories(tmp_path):
    root = tmp_path / "data"
    (root / "sub").mkdir(parents=True)
    (root / "b.txt").write_text("whole file\nis one document\n")
    write_jsonl(root / "a.jsonl", ["first", "second"])
    with open(root / "a.jsonl", "a") as file:
        file.write("\n" + json.dumps({"text": "   "}) + "\n")  # blank lines and blank texts are skipped
    (root / "sub" / "c.txt").write_text("nested")
    (root / "notes.md").write_text("ignored: not .txt/.jsonl")
    (root / ".hidden").mkdir()
    (root / ".hidden" / "d.txt").write_text("ignored: hidden")
    (root / "sub" / "empty.txt").write_text("")  # empty files inside a directory are skipped
    extra = tmp_path / "extra.txt"
    extra.write_text("explicit")
    assert list(read_documents([root, str(extra)])) == [
        "first", "second", "whole file\nis one document\n", "nested", "explicit"]
    assert list(read_documents(str(extra))) == ["explicit"]


@pytest.mark.parametrize("content, message", [
    ('{"text": "ok"}\n{"text": "ok"\n', "line 2 is not valid JSON"),
    ('{"text": "ok"}\n\n{"body": "x"}\n', "line 3 has no 'text' field"),
    ('{"text": 5}\n', "line 1 has no 'text' field"),
    ('["text"]\n', "line 1 has no 'text' field"),
    ("\n  \n", "has no usable documents"),
])
def test_read_documents_jsonl_errors_name_file_and_line(tmp_path, content, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(content)
    with pytest.raises(DataError, match=message) as error:
        list(read_documents([path]))
    assert "bad.jsonl" in str(error.value)


def test_read_documents_path_errors(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        read_documents([tmp_path / "missing.txt"])  # checked before any reading
    (tmp_path / "empty.txt").write_text(" \n")
    with pytest.raises(DataError, match="file .*empty.txt' has no usable documents"):
        list(read_documents([tmp_path / "empty.txt"]))
    (tmp_path / "table.csv").write_text("a,b")
    with pytest.raises(DataError, match="is not .txt, .jsonl, .parquet or .arrow"):
        read_documents([tmp_path / "table.csv"])
    (tmp_path / "nothing").mkdir()
    with pytest.raises(DataError, match="has no .txt, .jsonl, .parquet or .arrow files"):
        read_documents([tmp_path / "nothing"])
    (tmp_path / "blank").mkdir()
    (tmp_path / "blank" / "a.txt").write_text("")
    with pytest.raises(DataError, match="directory .*blank' has no usable documents"):
        list(read_documents([tmp_path / "blank"]))
    (tmp_path / "latin1.txt").write_bytes("café".encode("latin-1"))
    with pytest.raises(DataError, match="not UTF-8"):
        list(read_documents([tmp_path / "latin1.txt"]))
    with pytest.raises(DataError, match="no data paths"):
        read_documents([])


def test_default_corpus_is_deterministic_and_substantial():
    first, second = default_corpus(), default_corpus()
    assert first == second
    assert len(first) > 100 and all(document.strip() for document in first)
    assert 2_000_000 < sum(map(len, first)) < 10_000_000
    assert any("def " in document for document in first) and any("statement" in document for document in first)


# ---------------------------------------------------------------- prepared format

def read_index(prefix):
    """Parses PREFIX.idx by the documented layout, independently of IndexedDataset."""
    raw = Path(f"{prefix}.idx").read_bytes()
    magic, version, dtype_code, vocab_size, num_documents = struct.unpack("<8sIIQQ", raw[:32])
    offsets = struct.unpack(f"<{num_documents + 1}q", raw[32:])
    return magic, version, dtype_code, vocab_size, list(offsets)


def test_prepare_data_round_trip_byte_tokens(tmp_path):
    source = tmp_path / "docs.jsonl"
    write_jsonl(source, ["ab", "é", "xyz"])
    prefix = str(tmp_path / "out" / "corpus")
    prepare_data([str(source)], prefix, build_tokenizer("byte"))
    expected = [97, 98, 256, 195, 169, 256, 120, 121, 122, 256]
    assert np.fromfile(f"{prefix}.bin", dtype="<u2").tolist() == expected
    assert read_index(prefix) == (b"MOETIDX\x00", 1, 1, 257, [0, 3, 6, 10])

    dataset = IndexedDataset(prefix)
    assert dataset.tokens.dtype == np.uint16 and dataset.tokens.tolist() == expected
    assert (dataset.num_documents, dataset.vocab_size) == (3, 257)
    assert dataset.document(1).tolist() == [195, 169, 256]
    assert dataset.tokenizer.decode(dataset.document(2)) == "xyz" + EOS
    assert IndexedDataset(f"{prefix}.bin").num_documents == 3
    with pytest.raises(IndexError):
        dataset.document(3)


def test_prepare_data_ids_match_tokenizer_and_use_uint32_for_large_vocab(tmp_path):
    vocab_file, merge_file = tiny_gpt2_files(tmp_path, extra_tokens=70_000)
    tokenizer = build_tokenizer("gpt2", vocab_file=vocab_file, merge_file=merge_file)
    assert (tokenizer.vocab_size, tokenizer.eos_id) == (70_017, 70_016)
    texts = ["hello world", "world hello", "hello"]
    (tmp_path / "in").mkdir()
    for i, text in enumerate(texts):
        (tmp_path / "in" / f"{i}.txt").write_text(text)
    prefix = str(tmp_path / "big")
    prepare_data([str(tmp_path / "in")], prefix, tokenizer)
    # "world hello" -> (w or l d) (Ġ hello); every document ends with eos 70016, beyond uint16.
    expected = [12, 15, 3, 8, 70_016, 6, 14, 3, 8, 5, 12, 70_016, 12, 70_016]
    assert np.fromfile(f"{prefix}.bin", dtype="<u4").tolist() == expected
    assert expected == [token for text in texts for token in tokenizer.encode(text) + [tokenizer.eos_id]]
    assert read_index(prefix)[2:] == (2, 70_017, [0, 5, 12, 14])
    assert IndexedDataset(prefix).tokens.dtype == np.uint32


@pytest.fixture
def prepared(tmp_path):
    source = tmp_path / "docs.txt"
    source.write_text("hello")
    prefix = str(tmp_path / "p")
    prepare_data([str(source)], prefix, build_tokenizer("byte"))
    return prefix


def test_out_of_vocab_ids_are_rejected(prepared):
    np.array([104, 257, 108, 108, 111, 256], dtype="<u2").tofile(f"{prepared}.bin")
    with pytest.raises(DataError, match="token id 257, outside the tokenizer's vocab size 257") as error:
        IndexedDataset(prepared)
    assert "p.bin" in str(error.value) and "prepare-data" in str(error.value)


def test_corrupt_prepared_files_are_rejected(prepared):
    idx = Path(f"{prepared}.idx").read_bytes()
    with open(f"{prepared}.idx", "wb") as file:
        file.write(b"NOTMAGIC" + idx[8:])
    with pytest.raises(DataError, match="bad magic"):
        IndexedDataset(prepared)
    with open(f"{prepared}.idx", "wb") as file:
        file.write(idx[:8] + struct.pack("<I", 99) + idx[12:])
    with pytest.raises(DataError, match="format version 99"):
        IndexedDataset(prepared)
    with open(f"{prepared}.idx", "wb") as file:
        file.write(idx[:-4])
    with pytest.raises(DataError, match="truncated or corrupt"):
        IndexedDataset(prepared)
    with open(f"{prepared}.idx", "wb") as file:
        file.write(idx)
    with open(f"{prepared}.bin", "r+b") as file:
        file.truncate(6)
    with pytest.raises(DataError, match="has 3 tokens but its index lists 6"):
        IndexedDataset(prepared)
    with pytest.raises(DataError, match="not found; create it with `moetrain prepare-data"):
        IndexedDataset(prepared + "-missing")


def test_incomplete_prepared_dataset_names_the_missing_files(prepared, tmp_path):
    Path(f"{prepared}.idx").unlink()
    with pytest.raises(DataError, match=r"p.bin' is not a complete prepared dataset: one needs .*p.idx and "
                                        r".*p.tokenizer.json together"):
        load_training_data([f"{prepared}.bin"], tokenizer_type="byte", seq_length=2, cache_dir=str(tmp_path / "c"))
    Path(f"{prepared}.tokenizer.json").unlink()
    Path(f"{prepared}.bin").rename(tmp_path / "tokens.bin")  # e.g. a raw token dump from elsewhere
    with pytest.raises(DataError, match="tokens.bin' is not a complete prepared dataset"):
        load_training_data([str(tmp_path / "tokens.bin")], tokenizer_type="byte", seq_length=2,
                           cache_dir=str(tmp_path / "c"))


def test_prepare_data_cli(tmp_path, capsys):
    source = tmp_path / "a.jsonl"
    write_jsonl(source, ["one", "two"])
    prefix = tmp_path / "cli"
    argv = ["--input", str(source), "--output-prefix", str(prefix), "--tokenizer-type", "byte"]
    assert run_command("prepare-data", argv) == 0
    out = capsys.readouterr().out
    assert "8 tokens" in out and "2 documents" in out and "uint16" in out
    assert IndexedDataset(str(prefix)).tokens.tolist() == [111, 110, 101, 256, 116, 119, 111, 256]
    with pytest.raises(DataError, match="nope.txt' does not exist"):  # `moetrain` prints it as one line
        run_command("prepare-data", ["--input", str(tmp_path / "nope.txt"), "--output-prefix", str(prefix)])
    bpe_args = ["--input", str(source), "--output-prefix", str(tmp_path / "b"), "--vocab-size", "300"]
    assert run_command("prepare-data", bpe_args) == 0  # bpe, the default type, trained on the inputs
    assert IndexedDataset(str(tmp_path / "b")).vocab_size <= 300


# ---------------------------------------------------------------- batches

def test_windows_are_shifted_slices_covering_each_window_once_per_epoch():
    seq_length, tokens = 16, np.arange(1000, dtype=np.uint16)
    batches = TokenBatches(tokens, seq_length, seed=3)
    assert batches.num_windows == (1000 - 1) // 16 == 62
    inputs, targets = batches.next_batch(62)  # exactly one epoch
    assert inputs.dtype == targets.dtype == torch.int64 and inputs.shape == (62, 16)
    starts = inputs[:, 0]
    assert torch.equal(inputs, starts[:, None] + torch.arange(16))
    assert torch.equal(targets, inputs + 1)
    assert sorted(starts.tolist()) == list(range(0, 62 * 16, 16))
    assert starts.tolist() != sorted(starts.tolist())  # shuffled
    second_epoch = batches.next_batch(62)[0][:, 0]
    assert sorted(second_epoch.tolist()) == sorted(starts.tolist()) and not torch.equal(second_epoch, starts)


def test_resume_draws_exactly_the_uninterrupted_batches():
    tokens = np.arange(5000, dtype=np.uint32)
    uninterrupted = TokenBatches(tokens, 32, seed=7)
    for _ in range(5):
        uninterrupted.next_batch(40)  # 200 windows of 156: crosses into the second epoch
    state = uninterrupted.state_dict()
    expected = [uninterrupted.next_batch(40) for _ in range(3)]

    resumed = TokenBatches(tokens, 32, seed=999)  # the saved seed wins
    resumed.load_state_dict(json.loads(json.dumps(state)))  # survives a JSON/checkpoint round trip
    for want_inputs, want_targets in expected:
        inputs, targets = resumed.next_batch(40)
        assert torch.equal(inputs, want_inputs) and torch.equal(targets, want_targets)
    with pytest.raises(DataError, match="cannot resume train batches"):
        TokenBatches(tokens, 16).load_state_dict(state)


def test_eval_batches_are_fixed_and_start_at_the_split_start():
    tokens = np.arange(100, 400, dtype=np.uint16)
    batches = TokenBatches(tokens, 10, name="validation")
    assert batches.eval_batch_sizes(batch_size=4, num_batches=2) == [4, 4]
    first = batches.eval_batches(4, [0, 1])
    batches.next_batch(5)
    second = batches.eval_batches(4, [0, 1])
    assert len(first) == 2
    for (a_in, a_out), (b_in, b_out) in zip(first, second, strict=True):
        assert torch.equal(a_in, b_in) and torch.equal(a_out, b_out)
    assert first[0][0][1].tolist() == list(range(110, 120)) and first[1][1][3].tolist() == list(range(171, 181))
    short = TokenBatches(np.arange(35), 10)  # only 3 windows
    assert short.eval_batch_sizes(batch_size=2, num_batches=5) == [2, 1]
    assert short.eval_batches(2, [1])[0][0].tolist() == [list(range(20, 30))]
    with pytest.raises(DataError, match="eval batch size and count must be at least 1"):
        short.eval_batch_sizes(batch_size=2, num_batches=0)


def test_split_too_small_error_message():
    with pytest.raises(DataError, match=r"validation split has 120 tokens, needs at least 257 \(seq_length \+ 1\); "
                                        "add data or lower --seq-length"):
        TokenBatches(np.zeros(120, dtype=np.uint16), 256, name="validation")


# ---------------------------------------------------------------- load_training_data

def numbered_documents(count):
    return [f"document {i:03d} " + "x" * (i % 7) for i in range(count)]


def byte_stream(texts):
    return [token for text in texts for token in list(text.encode()) + [256]]


def test_load_training_data_splits_by_documents_and_caches(tmp_path, monkeypatch):
    texts = numbered_documents(100)
    write_jsonl(tmp_path / "docs.jsonl", texts)
    cache = str(tmp_path / "cache")
    tokenizer, train, validation = load_training_data([str(tmp_path / "docs.jsonl")], tokenizer_type="byte",
                                                      seq_length=8, split="90,10,0", cache_dir=cache)
    assert tokenizer.vocab_size == 257
    assert train.tokens.tolist() == byte_stream(texts[:90])
    assert validation.tokens.tolist() == byte_stream(texts[90:])

    def fail(*args, **kwargs):
        raise AssertionError("re-tokenized although the cache holds this data")

    monkeypatch.setattr(loader_module, "write_prepared", fail)
    _, cached_train, _ = load_training_data([str(tmp_path / "docs.jsonl")], tokenizer_type="byte", seq_length=8,
                                            split="90,10,0", cache_dir=cache)
    assert cached_train.tokens.tolist() == train.tokens.tolist()
    write_jsonl(tmp_path / "docs.jsonl", texts[:50])  # edited input: a new cache entry
    with pytest.raises(AssertionError, match="re-tokenized"):
        load_training_data([str(tmp_path / "docs.jsonl")], tokenizer_type="byte", seq_length=8, cache_dir=cache)


def test_load_training_data_default_corpus_with_bpe(tmp_path, monkeypatch):
    texts = numbered_documents(60)
    monkeypatch.setattr(loader_module, "default_corpus", lambda: texts)  # the real one takes seconds to tokenize
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # one validation document is enough here: no fallback
        tokenizer, train, validation = load_training_data(None, vocab_size=300, seq_length=2, split="98,2,0",
                                                          seed=1, cache_dir=str(tmp_path))
    assert tokenizer.vocab_size == 300
    assert tokenizer.decode(train.tokens.tolist()) == "".join(text + EOS for text in texts[:59])
    assert tokenizer.decode(validation.tokens.tolist()) == texts[59] + EOS
    assert list(tmp_path.glob("default-corpus-*.idx"))


def test_load_training_data_falls_back_to_token_tail(tmp_path):
    texts = ["a" * 150, "b" * 150, "c" * 150]
    write_jsonl(tmp_path / "few.jsonl", texts)
    with pytest.warns(UserWarning, match="holding out the last 17 tokens"):
        _, train, validation = load_training_data([str(tmp_path / "few.jsonl")], tokenizer_type="byte",
                                                  seq_length=16, split="98,2,0", cache_dir=str(tmp_path))
    stream = byte_stream(texts)
    held_out = max(math.ceil(len(stream) * 0.02), 17)
    assert held_out == 17
    assert train.tokens.tolist() == stream[:-17] and validation.tokens.tolist() == stream[-17:]


def test_load_training_data_uses_a_prepared_prefix_and_its_tokenizer(tmp_path):
    write_jsonl(tmp_path / "docs.jsonl", numbered_documents(20))
    prefix = str(tmp_path / "prepared")
    prepare_data([str(tmp_path / "docs.jsonl")], prefix, build_tokenizer("byte"))
    tokenizer, train, validation = load_training_data([prefix + ".bin"], tokenizer_type="bpe", seq_length=4,
                                                      split="1/0", cache_dir=str(tmp_path / "unused"))
    assert tokenizer.vocab_size == 257 and validation is None
    assert train.tokens.tolist() == byte_stream(numbered_documents(20))
    assert not (tmp_path / "unused").exists()
    # Next to a prepared prefix, a raw input is tokenized with the prefix's tokenizer and the two are blended
    # in proportion to their sizes (Megatron's unweighted --data-path list).
    _, blend, _ = load_training_data([prefix, str(tmp_path / "docs.jsonl")], seq_length=4, split="1/0",
                                     cache_dir=str(tmp_path / "cache"))
    assert [source.tokens.tolist() for source in blend.sources] == [byte_stream(numbered_documents(20))] * 2
    assert blend.weights == [0.5, 0.5]


@pytest.mark.parametrize("split", ["98,2,0,1", "a,b", "0,1", "-1,2"])
def test_bad_split_is_rejected(tmp_path, split):
    with pytest.raises(DataError, match="--split"):
        load_training_data([str(tmp_path / "unread.txt")], seq_length=4, split=split)


def test_too_little_data_for_seq_length(tmp_path):
    write_jsonl(tmp_path / "tiny.jsonl", ["abc", "def"])
    with pytest.raises(DataError, match="train split has .* tokens, needs at least 101"):
        load_training_data([str(tmp_path / "tiny.jsonl")], tokenizer_type="byte", seq_length=100, split="1,0",
                           cache_dir=str(tmp_path))


def test_bpe_training_cuts_over_long_pre_tokens_and_stays_linear(capsys, monkeypatch):
    # the case at test size: one line of 200k characters without whitespace (quadratic before: minutes)
    from moetrain.data import tokenizer as tokenizer_module

    line = "x" * 200_000
    pieces = list(tokenizer_module.training_pieces(["a few words " + line + " and more"]))
    assert "".join(pieces) == "a few words " + line + " and more"
    assert max(len(p) for p in pieces) <= tokenizer_module.MAX_PRETOKEN_CHARS
    assert len(pieces) == 2 + -(-200_000 // tokenizer_module.MAX_PRETOKEN_CHARS)
    assert list(tokenizer_module.training_pieces(["short words only"])) == ["short words only"]
    monkeypatch.setattr(tokenizer_module, "PROGRESS_CHARS", 50_000)
    tokenizer = build_tokenizer("bpe", texts=[line], vocab_size=300)
    assert tokenizer.decode(tokenizer.encode(line)) == line and len(tokenizer.encode(line)) < 200_000 // 64
    progress = capsys.readouterr().err.splitlines()
    assert progress[0] == "bpe tokenizer: 50,048 characters read"  # the first piece past 50,000 (391 x 128)
    assert progress[-1] == "bpe tokenizer: learning merges from 200,000 characters"
