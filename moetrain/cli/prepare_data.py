"""`moetrain prepare-data`: tokenize text once into memory-mapped .bin/.idx files, taking Megatron
preprocess_data.py's flags unchanged."""

from __future__ import annotations

import argparse

SUMMARY = "tokenize text/JSONL once into the memory-mapped .bin/.idx format"


def configure(parser: argparse.ArgumentParser) -> None:
    parser.description = ("Tokenize text once into memory-mapped .bin/.idx files: moetrain's format (PREFIX.bin, "
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
    parser.add_argument("--workers", type=int, default=None,
                        help="N tokenizing processes of one thread each, as Megatron's (use the core count); "
                             "without it this process tokenizes, the tokenizer library's threads on every core "
                             "(as fast on one machine). The same files either way")
    parser.add_argument("--dataset-impl", choices=("mmap",), default="mmap",
                        help="accepted for Megatron-DeepSpeed's command lines; the output is memory-mapped")


def run(args: argparse.Namespace) -> int:
    from moetrain.data.prepare import prepare_inputs

    datasets, kind, tokenizer = prepare_inputs(
        args.input, args.output_prefix, json_keys=tuple(args.json_keys), output_format=args.output_format,
        tokenizer_type=args.tokenizer_type, vocab_file=args.vocab_file, merge_file=args.merge_file,
        tokenizer_model=args.tokenizer_model, vocab_size=args.vocab_size, append_eod=args.append_eod,
        workers=args.workers)
    for dataset in datasets:
        print(f"wrote {dataset.prefix}.bin ({len(dataset.tokens):,} tokens, {dataset.tokens.dtype.name}), "
              f"{dataset.prefix}.idx ({dataset.num_documents:,} documents, {args.output_format} format), "
              f"{dataset.prefix}.tokenizer.json ({kind}, vocab {tokenizer.vocab_size:,})")
    return 0
