"""What `moetrain prepare-data` does: tokenize inputs once into moetrain's or Megatron's indexed format."""

from moetrain.data.corpus import read_documents
from moetrain.data.errors import DataError
from moetrain.data.indexed import open_prefix, write_megatron, write_prepared
from moetrain.data.tokenizer import Tokenizer, build_tokenizer, resolve_tokenizer_kind


def megatron_output_prefix(output_prefix: str, json_key: str) -> str:
    """Where Megatron's preprocess_data.py writes one key's documents: PREFIX_KEY_document.bin/.idx."""
    return f"{output_prefix}_{json_key}_document"


def prepare_inputs(inputs: list[str], output_prefix: str, *, json_keys: tuple[str, ...] = ("text",),
                   output_format: str = "moetrain", tokenizer_type: str | None = None, vocab_file: str | None = None,
                   merge_file: str | None = None, tokenizer_model: str | None = None, vocab_size: int = 4096,
                   append_eod: bool = False, workers: int | None = None) -> tuple[list, str, Tokenizer]:
    """Tokenize inputs once so training memory-maps ids instead of re-tokenizing; returns the written datasets
    (one, or one per JSON key in Megatron's format), the tokenizer kind and the tokenizer."""
    if workers is not None and workers < 1:
        raise DataError(f"--workers must be at least 1, got {workers}")
    if output_format == "moetrain" and len(json_keys) > 1:
        raise DataError("the moetrain format holds one text field; give one --json-keys, or "
                        "--output-format megatron for one dataset per key")
    kind = resolve_tokenizer_kind(tokenizer_type, vocab_file, merge_file)
    texts = read_documents(inputs, json_keys[0]) if kind == "bpe" else None
    tokenizer = build_tokenizer(kind, vocab_file=vocab_file, merge_file=merge_file,
                                tokenizer_model=tokenizer_model, texts=texts, vocab_size=vocab_size)
    if output_format == "moetrain":
        prefixes = [output_prefix]
        write_prepared(read_documents(inputs, json_keys[0]), output_prefix, tokenizer, workers=workers)
    else:
        prefixes = [megatron_output_prefix(output_prefix, key) for key in json_keys]
        for key, prefix in zip(json_keys, prefixes):
            write_megatron(read_documents(inputs, key), prefix, tokenizer, append_eod=append_eod, workers=workers)
    return [open_prefix(prefix) for prefix in prefixes], kind, tokenizer
