"""`moetrain prepare-data`: tokenize inputs once, taking Megatron preprocess_data.py's flags unchanged."""

import argparse
import sys

from moetrain.data import DataError
from moetrain.data.corpus import read_documents
from moetrain.data.indexed import open_prefix, write_megatron, write_prepared
from moetrain.data.tokenizer import build_tokenizer, resolve_tokenizer_kind


def megatron_output_prefix(output_prefix: str, json_key: str) -> str:
    """Where Megatron's preprocess_data.py writes one key's documents: PREFIX_KEY_document.bin/.idx."""
    return f"{output_prefix}_{json_key}_document"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="moetrain prepare-data",
        description="Tokenize text once into memory-mapped .bin/.idx files: moetrain's format (PREFIX.bin, "
                    "PREFIX.idx, PREFIX.tokenizer.json) or Megatron's (PREFIX_KEY_document.bin/.idx).")
    parser.add_argument("--input", nargs="+", required=True, metavar="PATH",
                        help=".txt files (one document each), .jsonl files (one JSON object per line), .parquet or "
                             ".arrow files, datasets.save_to_disk directories, or directories of such files")
    parser.add_argument("--json-keys", nargs="+", default=["text"], metavar="KEY",
                        help="the JSONL field / table column holding the text (Megatron: one output per key)")
    parser.add_argument("--output-prefix", required=True, metavar="PREFIX", help="where to write the files")
    parser.add_argument("--output-format", choices=("moetrain", "megatron"), default="moetrain",
                        help="moetrain: PREFIX.bin/.idx/.tokenizer.json, eos after every document; megatron: "
                             "Megatron's MMIDIDX format, loadable by Megatron-LM and Megatron-DeepSpeed")
    parser.add_argument("--tokenizer-type", default=None,
                        help="bpe: byte-level BPE trained on the inputs; gpt2 (GPT2BPETokenizer): --vocab-file and "
                             "--merge-file; byte: raw UTF-8 bytes; json: a tokenizers JSON as --vocab-file; hf "
                             "(HuggingFaceTokenizer) or sentencepiece (SentencePieceTokenizer): --tokenizer-model. "
                             "Unset: gpt2 when --vocab-file and --merge-file are given, else bpe")
    parser.add_argument("--vocab-file", help="GPT-2 vocab.json (gpt2), or a tokenizers JSON file (json)")
    parser.add_argument("--merge-file", help="GPT-2 merges.txt (gpt2 tokenizer)")
    parser.add_argument("--tokenizer-model", help="directory with tokenizer.json (hf) or .model file (sentencepiece)")
    parser.add_argument("--vocab-size", type=int, default=4096, help="vocabulary size of the trained bpe tokenizer")
    parser.add_argument("--append-eod", action="store_true",
                        help="end each document with the eos token (always so in the moetrain format)")
    parser.add_argument("--workers", type=int, default=1, help="processes that tokenize in parallel")
    parser.add_argument("--dataset-impl", choices=("mmap",), default="mmap",
                        help="accepted for Megatron-DeepSpeed's command lines; the output is memory-mapped")
    return parser


def prepare_data_main(argv: list[str]) -> int:
    """Tokenize inputs once so training memory-maps ids instead of re-tokenizing."""
    args = _parser().parse_args(argv)
    try:
        if args.workers < 1:
            raise DataError(f"--workers must be at least 1, got {args.workers}")
        if args.output_format == "moetrain" and len(args.json_keys) > 1:
            raise DataError("the moetrain format holds one text field; give one --json-keys, or "
                            "--output-format megatron for one dataset per key")
        kind = resolve_tokenizer_kind(args.tokenizer_type, args.vocab_file, args.merge_file)
        texts = read_documents(args.input, args.json_keys[0]) if kind == "bpe" else None
        tokenizer = build_tokenizer(kind, vocab_file=args.vocab_file, merge_file=args.merge_file,
                                    tokenizer_model=args.tokenizer_model, texts=texts, vocab_size=args.vocab_size)
        if args.output_format == "moetrain":
            prefixes = [args.output_prefix]
            write_prepared(read_documents(args.input, args.json_keys[0]), args.output_prefix, tokenizer,
                           workers=args.workers)
        else:
            prefixes = [megatron_output_prefix(args.output_prefix, key) for key in args.json_keys]
            for key, prefix in zip(args.json_keys, prefixes):
                write_megatron(read_documents(args.input, key), prefix, tokenizer, append_eod=args.append_eod,
                               workers=args.workers)
        datasets = [open_prefix(prefix) for prefix in prefixes]
    except DataError as error:
        print(f"moetrain prepare-data: error: {error}", file=sys.stderr)
        return 1
    for dataset in datasets:
        print(f"wrote {dataset.prefix}.bin ({len(dataset.tokens):,} tokens, {dataset.tokens.dtype.name}), "
              f"{dataset.prefix}.idx ({dataset.num_documents:,} documents, {args.output_format} format), "
              f"{dataset.prefix}.tokenizer.json ({kind}, vocab {tokenizer.vocab_size:,})")
    return 0
