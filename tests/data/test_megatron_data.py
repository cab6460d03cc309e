"""Megatron's indexed datasets, blends and preprocess flags, against files written here byte by byte with struct
(following Megatron's layout, not this project's reader in reverse)."""

import json
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from moetrain.cli import run as run_command
from moetrain.config import Config, ConfigError, parse_train_args
from moetrain.data import DataError, MegatronDataset, build_tokenizer, load_training_data
from moetrain.data.blend import blend_assignment, parse_blend
from moetrain.train.trainer import Trainer

# Megatron's dtype codes and the struct format of one element.
UINT16, INT32 = 8, 4
ELEMENT = {1: "B", 2: "b", 3: "h", 4: "i", 5: "q", 8: "H"}


def write_megatron_files(prefix, documents, code=UINT16, *, modes=False, version=1):
    """PREFIX.bin/.idx as Megatron's MMapIndexedDatasetBuilder lays them out; `documents` is a list of documents,
    each a list of sequences (sentences), each a list of ids."""
    sequences = [sequence for document in documents for sequence in document]
    size = struct.calcsize("<" + ELEMENT[code])
    with open(f"{prefix}.bin", "wb") as out:
        for sequence in sequences:
            for token in sequence:
                out.write(struct.pack("<" + ELEMENT[code], token))
    document_indices, count = [0], 0
    for document in documents:
        count += len(document)
        document_indices.append(count)
    with open(f"{prefix}.idx", "wb") as out:
        out.write(b"MMIDIDX\x00\x00")
        out.write(struct.pack("<Q", version))
        out.write(struct.pack("<B", code))
        out.write(struct.pack("<Q", len(sequences)))
        out.write(struct.pack("<Q", len(document_indices)))
        for sequence in sequences:
            out.write(struct.pack("<i", len(sequence)))
        pointer = 0
        for sequence in sequences:
            out.write(struct.pack("<q", pointer))
            pointer += len(sequence) * size
        for index in document_indices:
            out.write(struct.pack("<q", index))
        if modes:
            for _ in sequences:
                out.write(struct.pack("<b", 0))
    return str(prefix)


def read_megatron_files(prefix):
    """(dtype code, sequence lengths, pointers, document indices, ids) parsed field by field with struct."""
    idx = Path(f"{prefix}.idx").read_bytes()
    assert idx[:9] == b"MMIDIDX\x00\x00" and struct.unpack_from("<Q", idx, 9) == (1,)
    code, = struct.unpack_from("<B", idx, 17)
    sequences, indices = struct.unpack_from("<QQ", idx, 18)
    lengths = struct.unpack_from(f"<{sequences}i", idx, 34)
    pointers = struct.unpack_from(f"<{sequences}q", idx, 34 + 4 * sequences)
    document_indices = struct.unpack_from(f"<{indices}q", idx, 34 + 12 * sequences)
    assert len(idx) == 34 + 12 * sequences + 8 * indices
    data = Path(f"{prefix}.bin").read_bytes()
    ids = list(struct.unpack(f"<{len(data) // struct.calcsize(ELEMENT[code])}{ELEMENT[code]}", data))
    return code, list(lengths), list(pointers), list(document_indices), ids


def text_ids(text):
    """Byte-tokenizer ids of a document: its UTF-8 bytes and eos (256)."""
    return list(text.encode()) + [256]


# ---------------------------------------------------------------- reading

@pytest.mark.parametrize("code", [UINT16, INT32])
def test_reads_megatron_documents_of_several_sequences(tmp_path, code):
    documents = [[[1, 2, 3], [4]], [[5, 6]], [[7], [8, 9], [10, 11, 12]], [[300]]]
    prefix = write_megatron_files(tmp_path / "corpus_text_document", documents, code)
    dataset = MegatronDataset(prefix)
    assert isinstance(dataset.tokens, np.memmap) and dataset.tokens.dtype == {UINT16: np.uint16, INT32: np.int32}[code]
    assert dataset.num_documents == 4
    assert dataset.tokens.tolist() == [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 300]
    assert [dataset.document(i).tolist() for i in range(4)] == [[1, 2, 3, 4], [5, 6], [7, 8, 9, 10, 11, 12], [300]]
    assert dataset.document_starts([0, 1, 2, 3, 4]).tolist() == [0, 4, 6, 12, 13]


def test_split_is_by_documents_per_prefix(tmp_path):
    documents = [[text_ids(f"document {i:02d}")] for i in range(10)]  # 12 ids each
    prefix = write_megatron_files(tmp_path / "d", documents)
    _, train, validation = load_training_data([prefix], tokenizer_type="byte", seq_length=4, split="80,20,0",
                                              cache_dir=str(tmp_path / "cache"))
    assert train.tokens.tolist() == sum((d[0] for d in documents[:8]), [])
    assert validation.tokens.tolist() == sum((d[0] for d in documents[8:]), [])


BAD_INPUTS = {
    "truncated bin": (lambda p: open(f"{p}.bin", "r+b").truncate(10),
                      r"d.bin' is truncated \(10 bytes, .*points to 12\)"),
    "longer bin": (lambda p: open(f"{p}.bin", "ab").write(b"\x00\x00"), "is longer than its index says"),
    "truncated idx": (lambda p: open(f"{p}.idx", "r+b").truncate(60), "d.idx' is truncated or corrupt"),
    "short idx": (lambda p: open(f"{p}.idx", "r+b").truncate(20), r"d.idx' is truncated \(20 bytes\)"),
    "unknown dtype": (lambda p: _patch(f"{p}.idx", 17, b"\x09"), "unknown dtype code 9"),
    "float dtype": (lambda p: _patch(f"{p}.idx", 17, b"\x07"), "floating-point values .*dtype code 7"),
    "version": (lambda p: _patch(f"{p}.idx", 9, struct.pack("<Q", 2)), "has version 2"),
    "pointer past end": (lambda p: _patch(f"{p}.idx", 34 + 3 * 4 + 8 * 2, struct.pack("<q", 400)),
                         "sequence pointers that do not follow its lengths"),
    "document indices": (lambda p: _patch(f"{p}.idx", 34 + 12 * 3 + 8 * 2, struct.pack("<q", 2)),
                         "corrupt document indices"),
}


def _patch(path, offset, data):
    with open(path, "r+b") as file:
        file.seek(offset)
        file.write(data)


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_megatron_files_give_one_line_naming_the_file(tmp_path, case):
    prefix = write_megatron_files(tmp_path / "d", [[[1, 2], [3]], [[4, 5, 6]]])
    MegatronDataset(prefix)  # intact, it reads
    damage, message = BAD_INPUTS[case]
    damage(prefix)
    with pytest.raises(DataError, match=message) as error:
        MegatronDataset(prefix)
    assert "\n" not in str(error.value) and str(tmp_path / "d") in str(error.value)


def test_multimodal_prefix_is_refused(tmp_path):
    prefix = write_megatron_files(tmp_path / "mm", [[[1, 2], [3]]], modes=True)
    with pytest.raises(DataError, match="multimodal dataset .*text only"):
        MegatronDataset(prefix)


def test_token_outside_the_vocabulary_fails_in_its_window(tmp_path):
    ids = [text_ids("x" * 10) for _ in range(6)]
    ids[4] = ids[4][:3] + [40000] + ids[4][4:]  # a GPT-2-sized id, read with the 257-id byte tokenizer
    prefix = write_megatron_files(tmp_path / "wrong_tokenizer", [[doc] for doc in ids])
    _, train, _ = load_training_data([prefix], tokenizer_type="byte", seq_length=10, split="100,0,0",
                                     cache_dir=str(tmp_path / "cache"))
    with pytest.raises(DataError, match=r"wrong_tokenizer' holds token id 40000, outside the tokenizer's "
                                        r"vocabulary of 257; pass the tokenizer"):
        for _ in range(train.num_windows):
            train.next_batch(1)


def test_megatron_prefix_needs_its_tokenizer(tmp_path):
    prefix = write_megatron_files(tmp_path / "d", [[text_ids("abc")]] * 8)
    with pytest.raises(DataError, match="holds token ids without their tokenizer; name the one it was made with: "
                                        "--tokenizer-type GPT2BPETokenizer"):
        load_training_data([prefix], seq_length=2, cache_dir=str(tmp_path / "cache"))


# ---------------------------------------------------------------- tokenizers

def gpt2_files(tmp_path):
    vocab = {"a": 0, "b": 1, "Ġ": 2, "ab": 3, "<|endoftext|>": 4}
    (tmp_path / "vocab.json").write_text(json.dumps(vocab))
    (tmp_path / "merges.txt").write_text("#version: 0.2\na b\n")
    return str(tmp_path / "vocab.json"), str(tmp_path / "merges.txt")


def test_megatron_tokenizer_names_and_gpt2_by_default(tmp_path):
    vocab, merges = gpt2_files(tmp_path)
    prefix = write_megatron_files(tmp_path / "g", [[[3, 3, 2, 0, 4]]] * 8)
    for flags in (["--tokenizer-type", "GPT2BPETokenizer"], []):  # no type + vocab + merges: GPT-2 BPE (Megatron)
        cfg = parse_train_args(["--data-path", prefix, "--vocab-file", vocab, "--merge-file", merges, *flags])
        cfg.validate(1)
        tokenizer, train, _ = load_training_data(cfg.data.data_path, tokenizer_type=cfg.data.tokenizer_type,
                                                 vocab_file=vocab, merge_file=merges, seq_length=4,
                                                 split="100,0,0", cache_dir=str(tmp_path / "cache"))
        assert tokenizer.vocab_size == 5 and tokenizer.encode("abab a") == [3, 3, 2, 0]
    with pytest.raises(ConfigError, match="HuggingFaceTokenizer needs --tokenizer-model"):
        parse_train_args(["--tokenizer-type", "HuggingFaceTokenizer"]).validate(1)
    with pytest.raises(ConfigError, match="--tokenizer-model is read by"):
        parse_train_args(["--tokenizer-type", "byte", "--tokenizer-model", "x"]).validate(1)


def test_hugging_face_tokenizer_from_a_local_directory(tmp_path):
    vocab, merges = gpt2_files(tmp_path)
    build_tokenizer("gpt2", vocab_file=vocab, merge_file=merges).save(tmp_path / "hf")  # tokenizer.json inside
    tokenizer = build_tokenizer("HuggingFaceTokenizer", tokenizer_model=str(tmp_path / "hf"))
    assert tokenizer.encode("abab a") == [3, 3, 2, 0] and tokenizer.eos_id == 4
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="has no tokenizer.json"):
        build_tokenizer("hf", tokenizer_model=str(tmp_path / "empty"))


def test_sentencepiece_tokenizer_round_trips_through_its_json(tmp_path):
    spm = pytest.importorskip("sentencepiece")
    (tmp_path / "text.txt").write_text("\n".join(f"the quick brown fox {i} jumps" for i in range(200)))
    spm.SentencePieceTrainer.train(input=str(tmp_path / "text.txt"), model_prefix=str(tmp_path / "sp"),
                                   vocab_size=60, model_type="bpe", minloglevel=2)
    reference = spm.SentencePieceProcessor(model_file=str(tmp_path / "sp.model"))
    tokenizer = build_tokenizer("SentencePieceTokenizer", tokenizer_model=str(tmp_path / "sp.model"))
    assert tokenizer.encode("the quick fox") == reference.encode("the quick fox")
    assert (tokenizer.vocab_size, tokenizer.eos_id) == (60, reference.eos_id())
    tokenizer.save(tmp_path / "saved.json")  # what a checkpoint stores
    loaded = type(tokenizer).load(tmp_path / "saved.json")
    assert loaded.encode("brown jumps") == reference.encode("brown jumps")
    assert loaded.decode(reference.encode("brown jumps")) == "brown jumps"


# ---------------------------------------------------------------- blends

def reference_blend(weights, count):
    """Megatron's build_blending_indices, written out: each sample to the source lagging its weight most."""
    drawn, out = [0] * len(weights), []
    for sample in range(count):
        errors = [weight * max(sample, 1) - drawn[k] for k, weight in enumerate(weights)]
        best = errors.index(max(errors))
        drawn[best] += 1
        out.append(best)
    return out


def test_blend_assignment_follows_megatron_and_resumes_mid_way():
    weights = [0.2, 0.5, 0.3]
    sources, drawn = blend_assignment(weights, [0, 0, 0], 100)
    assert sources.tolist() == reference_blend(weights, 100)
    assert drawn.tolist() == [20, 50, 30]
    first, middle = blend_assignment(weights, [0, 0, 0], 37)
    rest, _ = blend_assignment(weights, middle, 63)
    assert first.tolist() + rest.tolist() == sources.tolist()


@pytest.mark.parametrize("paths, message", [
    (["0.3", "a", "0.7"], "odd count"),
    (["0.3", "a", "-1", "b"], "weight '-1' is not a positive number"),
    (["0.3", "a", "x", "b"], "weight 'x' is not a positive number"),
])
def test_bad_blends(paths, message):
    with pytest.raises(DataError, match=message):
        parse_blend(paths)


def test_parse_blend_normalises_weights():
    assert parse_blend(["3", "a", "1", "b"]) == (["a", "b"], [0.75, 0.25])
    assert parse_blend(["a", "b"]) == (["a", "b"], None)


def two_prefixes(tmp_path):
    """A (uint16, letters) and B (int32, digits), 40 documents each, so every row shows its source."""
    a = write_megatron_files(tmp_path / "a", [[text_ids("abcdefgh" * 3)]] * 40, UINT16)
    b = write_megatron_files(tmp_path / "b", [[text_ids("0123456789" * 2), text_ids("9876")]] * 40, INT32)
    return a, b


def row_sources(inputs):
    letters = ((inputs >= ord("a")) & (inputs <= ord("h"))).sum(dim=1)
    digits = ((inputs >= ord("0")) & (inputs <= ord("9"))).sum(dim=1)
    assert torch.all((letters == 0) | (digits == 0))  # a window never mixes the prefixes
    return ["a" if count else "b" for count in letters.tolist()]


def test_blend_draws_batches_by_weight_and_resumes(tmp_path):
    a, b = two_prefixes(tmp_path)
    options = {"tokenizer_type": "byte", "seq_length": 8, "split": "90,10,0", "cache_dir": str(tmp_path / "c")}
    _, train, validation = load_training_data(["0.25", a, "0.75", b], **options)
    assert train.weights == [0.25, 0.75]
    rows = [row_sources(train.next_batch(8)[0]) for _ in range(5)]
    assert [source for batch in rows for source in batch] == ["ab"[k] for k in reference_blend([0.25, 0.75], 40)]
    assert train.drawn() == {a: 10, b: 30}
    state = train.state_dict()
    expected = [train.next_batch(8) for _ in range(20)]  # crosses epochs of both prefixes
    _, resumed, _ = load_training_data(["0.25", a, "0.75", b], **options)
    resumed.load_state_dict(state)
    for want, got in zip(expected, (resumed.next_batch(8) for _ in range(20))):
        assert torch.equal(want[0], got[0]) and torch.equal(want[1], got[1])
    # the split applies per prefix: validation holds the last 10% of each prefix's documents
    assert [source.num_tokens for source in validation.sources] == [4 * 25, 4 * 26]
    assert validation.eval_batch_sizes(4, 3) == [4, 4, 4]
    eval_rows = [row_sources(x) for x, _ in validation.eval_batches(4, range(3))]
    assert eval_rows == [row_sources(x) for x, _ in validation.eval_batches(4, range(3))]
    assert sum(row.count("a") for row in eval_rows) == 3
    with pytest.raises(DataError, match="cannot resume: the checkpoint's data was a blend"):
        load_training_data(["0.5", a, "0.5", b], **options)[1].load_state_dict(state)


def test_train_and_valid_data_paths(tmp_path):
    a, b = two_prefixes(tmp_path)
    options = {"tokenizer_type": "byte", "seq_length": 8, "cache_dir": str(tmp_path / "c")}
    _, train, validation = load_training_data(None, train_data_path=[a], valid_data_path=["1", b], **options)
    assert train.num_tokens == 40 * 25 and validation.num_tokens == 40 * 26  # each used whole
    _, unweighted, _ = load_training_data([a, b], split="100,0,0", **options)  # Megatron-LM: in proportion to size
    assert unweighted.weights == [25 / 51, 26 / 51]
    with pytest.raises(DataError, match="cannot resume train batches: the checkpoint's data was a blend of 2"):
        load_training_data([a], split="100,0,0", **options)[1].load_state_dict(unweighted.state_dict())
    with pytest.raises(DataError, match="not both"):
        load_training_data([a], train_data_path=[a], **options)
    with pytest.raises(DataError, match="--valid-data-path goes with --train-data-path"):
        load_training_data(None, valid_data_path=[b], **options)


def blend_config(tmp_path, a, b, save, **training) -> Config:
    cfg = parse_train_args(["--data-path", "0.3", a, "0.7", b, "--data-impl", "mmap", "--split", "969,30,1",
                            "--tokenizer-type", "byte"])
    m = cfg.model
    m.num_layers, m.hidden_size, m.num_attention_heads, m.seq_length = 2, 32, 4, 8
    cfg.moe.num_experts, cfg.moe.expert_interval, cfg.moe.topk = [4], 1, 1
    cfg.data.cache_dir = str(tmp_path / "cache")
    t = cfg.training
    t.micro_batch_size, t.train_iters, t.lr, t.lr_warmup_iters = 4, 6, 3e-3, 0
    t.eval_interval, t.eval_iters, t.log_interval, t.save_interval = 0, 1, 1, 3
    t.save, t.device, t.progress_bar = str(tmp_path / save), "cpu", False
    for key, value in training.items():
        setattr(t, key, value)
    return cfg


def test_training_on_a_blend_resumes_exactly(tmp_path):
    a, b = two_prefixes(tmp_path)
    first = Trainer(blend_config(tmp_path, a, b, "first"), quiet=True).fit()
    records = [json.loads(line) for line in (tmp_path / "first" / "metrics.jsonl").read_text().splitlines()]
    drawn = [r["data_drawn"] for r in records if r["type"] == "train"]
    assert drawn[0] == {a: 1, b: 3} and drawn[-1] == {a: 7, b: 17}  # 0.3 / 0.7 of 4 and of 24 sequences
    (tmp_path / "second").mkdir()
    shutil.copytree(tmp_path / "first" / "iter_0000003", tmp_path / "second" / "iter_0000003")
    resumed = Trainer(blend_config(tmp_path, a, b, "second", load=str(tmp_path / "second" / "iter_0000003")),
                      quiet=True).fit()
    assert resumed.losses == first.losses[3:]


def test_data_impl_other_than_mmap_is_refused(capsys):
    with pytest.raises(SystemExit):
        parse_train_args(["--data-impl", "lazy"])
    assert "moetrain reads memory-mapped data only; use mmap" in capsys.readouterr().err


# ---------------------------------------------------------------- prepare-data

def test_prepare_data_writes_megatron_format_with_megatrons_flags(tmp_path, capsys):
    vocab, merges = gpt2_files(tmp_path)
    source = tmp_path / "my-corpus.json"  # Megatron's loose JSON: one object per line
    source.write_text("".join(json.dumps({"content": text, "text": "x"}) + "\n"
                              for text in ["ab ab", "a", "abab b"]))
    argv = ["--input", str(source), "--json-keys", "content", "--output-prefix", str(tmp_path / "my-gpt2"),
            "--vocab-file", vocab, "--merge-file", merges, "--tokenizer-type", "GPT2BPETokenizer", "--append-eod",
            "--workers", "1", "--output-format", "megatron", "--dataset-impl", "mmap"]
    assert run_command("prepare-data", argv) == 0
    assert "my-gpt2_content_document.bin (11 tokens, uint16)" in capsys.readouterr().out
    code, lengths, pointers, document_indices, ids = read_megatron_files(tmp_path / "my-gpt2_content_document")
    assert code == UINT16 and document_indices == [0, 1, 2, 3]
    assert lengths == [4, 2, 5] and pointers == [0, 8, 12]
    assert ids == [3, 2, 3, 4, 0, 4, 3, 3, 2, 1, 4]
    # without --append-eod Megatron writes no eos; moetrain reads the prefix back with the tokenizer left beside it
    assert run_command("prepare-data", argv[:-7] + ["--output-format", "megatron"]) == 0
    assert read_megatron_files(tmp_path / "my-gpt2_content_document")[4] == [3, 2, 3, 0, 3, 3, 2, 1]
    tokenizer, train, _ = load_training_data([str(tmp_path / "my-gpt2_content_document")], seq_length=2,
                                             split="100,0,0", cache_dir=str(tmp_path / "c"))
    assert tokenizer.vocab_size == 5 and train.tokens.tolist() == [3, 2, 3, 0, 3, 3, 2, 1]


def test_prepare_data_workers_write_identical_files(tmp_path):
    source = tmp_path / "in.jsonl"
    source.write_text("".join(json.dumps({"text": f"document {i} " * (i % 7 + 1)}) + "\n" for i in range(3000)))
    for workers in ("1", "3"):
        for fmt in ("moetrain", "megatron"):
            argv = ["--input", str(source), "--output-prefix", str(tmp_path / f"{fmt}{workers}"),
                    "--tokenizer-type", "byte", "--workers", workers, "--output-format", fmt, "--append-eod"]
            assert run_command("prepare-data", argv) == 0
    for name in ("moetrain{}.bin", "moetrain{}.idx", "megatron{}_text_document.bin", "megatron{}_text_document.idx"):
        assert (tmp_path / name.format(1)).read_bytes() == (tmp_path / name.format(3)).read_bytes(), name


# ---------------------------------------------------------------- local Hugging Face datasets

def test_hugging_face_datasets_saved_to_disk_parquet_and_arrow(tmp_path):
    datasets = pytest.importorskip("datasets")
    texts = [f"row {i}" for i in range(30)]
    table = datasets.Dataset.from_dict({"body": texts, "id": list(range(30))})
    table.save_to_disk(str(tmp_path / "saved"))
    table.to_parquet(str(tmp_path / "rows.parquet"))
    datasets.DatasetDict({"train": table}).save_to_disk(str(tmp_path / "dict"))
    expected = sum((text_ids(text) for text in texts), [])
    arrow_file = next((tmp_path / "saved").glob("*.arrow"))
    for path in ("saved", "rows.parquet", "dict", str(arrow_file.relative_to(tmp_path))):
        _, train, _ = load_training_data([str(tmp_path / path)], tokenizer_type="byte", text_key="body",
                                         seq_length=4, split="100,0,0", cache_dir=str(tmp_path / "c"))
        assert train.tokens.tolist() == expected, path
    with pytest.raises(DataError, match="has no column 'text' .*--json-keys"):
        load_training_data([str(tmp_path / "rows.parquet")], tokenizer_type="byte", seq_length=4,
                           cache_dir=str(tmp_path / "c"))
