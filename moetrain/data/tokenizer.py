"""One tokenizer wrapper over the `tokenizers` library (or SentencePiece), so every kind saves and loads as one
JSON file."""

import base64
import json
import os
import re
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path

import tokenizers
from tokenizers import AddedToken, decoders, models, pre_tokenizers, trainers

from moetrain.data.errors import DataError

EOS_TOKEN = "<|endoftext|>"
# End-of-document tokens tried in order: moetrain's and GPT-2's, then those of imported tokenizers
# (Llama/Mistral/Mixtral "</s>", Llama 3 "<|end_of_text|>", Gemma "<eos>").
EOS_TOKENS = (EOS_TOKEN, "</s>", "<|end_of_text|>", "<eos>")
TOKENIZER_KINDS = ("bpe", "gpt2", "byte", "json", "hf", "sentencepiece")
# Megatron's --tokenizer-type names, so its launch scripts and preprocess_data.py flags work unchanged.
MEGATRON_TOKENIZER_TYPES = {"GPT2BPETokenizer": "gpt2", "HuggingFaceTokenizer": "hf",
                            "SentencePieceTokenizer": "sentencepiece", "GPTSentencePieceTokenizer": "sentencepiece"}
_SENTENCEPIECE_KEY = "moetrain_sentencepiece_model"
# TOKENIZERS_PARALLELISM values that the tokenizers library reads as "one thread" (utils/parallelism.rs).
_FALSE_WORDS = ("", "off", "false", "f", "no", "n", "0")


def tokenizer_kind(name: str) -> str:
    """moetrain's kind for a --tokenizer-type value, Megatron's class names included."""
    return MEGATRON_TOKENIZER_TYPES.get(name, name)


def resolve_tokenizer_kind(kind: str | None, vocab_file: str | None, merge_file: str | None) -> str:
    """No --tokenizer-type: GPT-2 BPE when both --vocab-file and --merge-file are given (Megatron's default), else
    a BPE trained on the corpus."""
    if kind is not None:
        return tokenizer_kind(kind)
    return "gpt2" if vocab_file and merge_file else "bpe"


class Tokenizer:
    """Text <-> token ids, with an end-of-document token (`<|endoftext|>`, or the first of EOS_TOKENS it has)."""

    def __init__(self, backend: tokenizers.Tokenizer):
        eos_id = next((i for i in map(backend.token_to_id, EOS_TOKENS) if i is not None), None)
        if eos_id is None:
            raise DataError(f"tokenizer has none of the end-of-document tokens {', '.join(EOS_TOKENS)}; "
                            "build it with moetrain.data.build_tokenizer")
        self._backend = backend
        self.eos_id: int = eos_id
        self.vocab_size: int = backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        return self._backend.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Encodes many documents at once (the fast path for preparing data), on threads over every core, or on
        one thread under TOKENIZERS_PARALLELISM=false (each prepare-data worker)."""
        encode = getattr(self._backend, "encode_batch_fast", self._backend.encode_batch)  # fast: no offsets
        return [encoding.ids for encoding in encode(texts, add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> str:
        """Decodes ids; the eos token is kept in the text so document boundaries stay visible."""
        return self._backend.decode(list(ids), skip_special_tokens=False)

    def to_json(self) -> str:
        return self._backend.to_str()

    @classmethod
    def from_json(cls, text: str, source: str = "tokenizer JSON") -> "Tokenizer":
        """The inverse of `to_json`; `source` names the origin in errors."""
        if _SENTENCEPIECE_KEY in text[:200]:
            return cls(_SentencePieceBackend.from_json(text))
        try:
            backend = tokenizers.Tokenizer.from_str(text)
        except Exception as error:  # the Rust side raises a bare Exception for any malformed file
            raise DataError(f"{source} is not a tokenizers JSON file ({error}); re-create it") from None
        return cls(backend)

    def save(self, path: str | Path) -> None:
        """Writes the tokenizers JSON to `path`, or to `path/tokenizer.json` when `path` is a directory."""
        file = _json_path(path)
        file.parent.mkdir(parents=True, exist_ok=True)
        self._backend.save(str(file))

    @classmethod
    def load(cls, path: str | Path) -> "Tokenizer":
        """Reads a file written by `save` (a JSON file, or a directory holding `tokenizer.json`)."""
        file = _json_path(path)
        if not file.is_file():
            raise DataError(f"tokenizer file '{file}' not found; save one with Tokenizer.save or moetrain prepare-data")
        return cls.from_json(file.read_text(encoding="utf-8"), f"tokenizer file '{file}'")


def _json_path(path: str | Path) -> Path:
    path = Path(path)
    return path / "tokenizer.json" if path.is_dir() else path


def _bytes_to_symbols() -> list[str]:
    """GPT-2's byte -> printable-character table, so byte-level tokens never contain whitespace or controls.

    Printable Latin-1 bytes stand for themselves; every other byte is shifted to a code point from 256 on.
    """
    printable = {*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)}
    symbols, shifted = [], 0
    for byte in range(256):
        if byte in printable:
            symbols.append(chr(byte))
        else:
            symbols.append(chr(256 + shifted))
            shifted += 1
    return symbols


def _byte_level(model: models.Model, *, split_words: bool = True) -> tokenizers.Tokenizer:
    """Text -> byte symbols -> `model`; `split_words` applies GPT-2's word regex, which only merges need."""
    backend = tokenizers.Tokenizer(model)
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=split_words)
    backend.decoder = decoders.ByteLevel()
    return backend


def _byte_tokenizer() -> Tokenizer:
    """Id b is byte b; id 256 is eos. A BPE model without merges over the byte symbols does exactly that."""
    vocab = {symbol: byte for byte, symbol in enumerate(_bytes_to_symbols())}
    backend = _byte_level(models.BPE(vocab=vocab, merges=[]), split_words=False)  # 3x faster, same ids
    backend.add_special_tokens([AddedToken(EOS_TOKEN, special=True)])
    return Tokenizer(backend)


def _gpt2_tokenizer(vocab_file: str | None, merge_file: str | None) -> Tokenizer:
    for flag, file in (("--vocab-file", vocab_file), ("--merge-file", merge_file)):
        if file is None:
            raise DataError(f"tokenizer 'gpt2' needs {flag} (GPT-2's vocab.json and merges.txt)")
        if not Path(file).is_file():
            raise DataError(f"{flag} '{file}' not found; pass GPT-2's vocab.json and merges.txt")
    try:
        model = models.BPE.from_file(vocab_file, merge_file)
    except Exception as error:  # malformed JSON or merges come back as a bare Exception
        raise DataError(f"cannot read GPT-2 BPE files '{vocab_file}', '{merge_file}' ({error}); "
                        "--vocab-file must be vocab.json and --merge-file merges.txt") from None
    backend = _byte_level(model)
    if backend.token_to_id(EOS_TOKEN) is None:
        raise DataError(f"--vocab-file '{vocab_file}' has no '{EOS_TOKEN}' entry; use GPT-2's vocab.json")
    backend.add_special_tokens([AddedToken(EOS_TOKEN, special=True)])
    return Tokenizer(backend)


def _trained_bpe(texts: Iterable[str] | None, vocab_size: int) -> Tokenizer:
    if texts is None:
        raise DataError("tokenizer 'bpe' is trained on the corpus; pass texts (or use --tokenizer-type byte)")
    if vocab_size < 257:
        raise DataError(f"--vocab-size {vocab_size} is too small for byte-level BPE; "
                        "use at least 257 (256 bytes + eos)")
    backend = _byte_level(models.BPE())
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS_TOKEN], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator(_with_progress(training_pieces(texts)), trainer)
    return Tokenizer(backend)


# The BPE trainer's cost grows with the square of a pre-token's length (a 1M-character line without whitespace
# took minutes), so training sees runs of non-whitespace cut into pieces of at most this many characters:
# linear in the input, and only merges longer than this (no useful token) are lost. Encoding is unchanged.
MAX_PRETOKEN_CHARS = 128
_LONG_RUN = re.compile(rf"\S{{{MAX_PRETOKEN_CHARS + 1},}}")
PROGRESS_CHARS = 64_000_000  # a line on stderr per this many characters of training text read


def training_pieces(texts: Iterable[str]) -> Iterator[str]:
    """`texts`, each run of more than MAX_PRETOKEN_CHARS non-whitespace characters cut into pieces of at most
    that many (a piece is a text of its own to the trainer, so no pre-token spans two)."""
    for text in texts:
        start = 0
        for run in _LONG_RUN.finditer(text):
            if run.start() > start:
                yield text[start:run.start()]
            yield from (text[i:min(i + MAX_PRETOKEN_CHARS, run.end())]
                        for i in range(run.start(), run.end(), MAX_PRETOKEN_CHARS))
            start = run.end()
        if start == 0:
            yield text
        elif start < len(text):
            yield text[start:]


def _with_progress(pieces: Iterable[str]) -> Iterator[str]:
    """The pieces, with a line on stderr each PROGRESS_CHARS characters (a long input shows it is moving)."""
    read, reported = 0, 0
    for piece in pieces:
        read += len(piece)
        if read - reported >= PROGRESS_CHARS:
            reported = read
            print(f"bpe tokenizer: {read:,} characters read", file=sys.stderr, flush=True)
        yield piece
    if reported:
        print(f"bpe tokenizer: learning merges from {read:,} characters", file=sys.stderr, flush=True)


class _Encoding:
    def __init__(self, ids: list[int]):
        self.ids = ids


class _SentencePieceBackend:
    """A SentencePiece model behind the slice of the `tokenizers` API that Tokenizer uses; it saves as JSON
    holding the model's bytes, so checkpoints carry it like any other tokenizer."""

    def __init__(self, model: bytes):
        try:
            import sentencepiece
        except ImportError:
            raise DataError("--tokenizer-type SentencePieceTokenizer needs the sentencepiece package; "
                            "pip install 'moetrain[sentencepiece]'") from None
        self._model = model
        self._processor = sentencepiece.SentencePieceProcessor(model_proto=model)

    @classmethod
    def from_json(cls, text: str) -> "_SentencePieceBackend":
        return cls(base64.b64decode(json.loads(text)[_SENTENCEPIECE_KEY]))

    def token_to_id(self, piece: str) -> int | None:
        token = self._processor.piece_to_id(piece)
        return token if self._processor.id_to_piece(token) == piece else None  # unknown pieces map to <unk>

    def get_vocab_size(self, with_added_tokens: bool = True) -> int:
        return self._processor.get_piece_size()

    def encode(self, text: str, add_special_tokens: bool = False) -> _Encoding:
        return _Encoding(self._processor.encode(text))

    def encode_batch(self, texts: list[str], add_special_tokens: bool = False) -> list[_Encoding]:
        """Threads on every core, or one thread under TOKENIZERS_PARALLELISM=false as the tokenizers library."""
        threads = 1 if os.environ.get("TOKENIZERS_PARALLELISM", "true").lower() in _FALSE_WORDS else -1
        return [_Encoding(ids) for ids in self._processor.encode(texts, num_threads=threads)]

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return self._processor.decode(ids)

    def to_str(self) -> str:
        return json.dumps({_SENTENCEPIECE_KEY: base64.b64encode(self._model).decode("ascii")})

    def save(self, path: str) -> None:
        Path(path).write_text(self.to_str(), encoding="utf-8")


def _sentencepiece_tokenizer(model_file: str) -> Tokenizer:
    if not Path(model_file).is_file():
        raise DataError(f"--tokenizer-model '{model_file}' not found; pass the SentencePiece .model file")
    try:
        return Tokenizer(_SentencePieceBackend(Path(model_file).read_bytes()))
    except (RuntimeError, OSError) as error:
        raise DataError(f"--tokenizer-model '{model_file}' is not a SentencePiece model ({error})") from None


def _hugging_face_tokenizer(name_or_dir: str) -> Tokenizer:
    """A local directory holding tokenizer.json (or the file itself), else a hub name found in the local cache."""
    path = Path(name_or_dir)
    if path.exists():
        if not _json_path(path).is_file():
            raise DataError(f"--tokenizer-model '{path}' has no tokenizer.json; save the tokenizer with "
                            "tokenizer.save_pretrained(DIR) (a fast tokenizer) and pass DIR")
        return Tokenizer.load(path)
    try:
        from huggingface_hub import hf_hub_download

        file = hf_hub_download(name_or_dir, "tokenizer.json", local_files_only=True)  # never downloads
    except Exception as error:  # not cached, unknown repository, no tokenizer.json: all mean the same fix
        raise DataError(f"--tokenizer-model '{name_or_dir}' is no local directory and not in the local Hugging Face "
                        f"cache ({type(error).__name__}); pass a directory with tokenizer.json") from None
    return Tokenizer.load(file)


def check_tokenizer_files(kind: str, vocab_file: str | None, merge_file: str | None,
                          tokenizer_model: str | None = None) -> None:
    """Tokenizer files given to a kind that does not read them are a mistake, not something to ignore."""
    if kind in ("bpe", "byte") and (vocab_file or merge_file):
        raise DataError(f"--vocab-file/--merge-file are not read by --tokenizer-type {kind}; add --tokenizer-type "
                        "gpt2 (GPT-2's vocab.json and merges.txt) or json (a tokenizers JSON file), or drop them")
    if kind == "json" and merge_file:
        raise DataError("--merge-file is not read by --tokenizer-type json (one tokenizers JSON file as "
                        "--vocab-file); drop it, or use --tokenizer-type gpt2 for vocab.json + merges.txt")
    if kind in ("hf", "sentencepiece"):
        if tokenizer_model is None:
            name = "HuggingFaceTokenizer" if kind == "hf" else "SentencePieceTokenizer"
            raise DataError(f"--tokenizer-type {name} needs --tokenizer-model "
                            f"({'a directory with tokenizer.json' if kind == 'hf' else 'the .model file'})")
        if vocab_file or merge_file:
            raise DataError(f"--vocab-file/--merge-file are not read by --tokenizer-type {kind}; drop them "
                            "(--tokenizer-model names the tokenizer)")
    elif tokenizer_model is not None:
        raise DataError(f"--tokenizer-model is read by --tokenizer-type HuggingFaceTokenizer or "
                        f"SentencePieceTokenizer, not {kind}; add one of those or drop it")


def build_tokenizer(kind: str, *, vocab_file: str | None = None, merge_file: str | None = None,
                    tokenizer_model: str | None = None, texts: Iterable[str] | None = None,
                    vocab_size: int = 4096) -> Tokenizer:
    """Builds a "gpt2" (from vocab/merge files), "bpe" (trained on `texts`), "byte" tokenizer, or loads a
    "json" one (a `tokenizers` JSON file given as `vocab_file`, e.g. a checkpoint's tokenizer.json), an "hf"
    one (`tokenizer_model`: a directory with tokenizer.json) or a "sentencepiece" one (`tokenizer_model`: a
    .model file). Megatron's type names (GPT2BPETokenizer, ...) are accepted for `kind`."""
    kind = tokenizer_kind(kind)
    check_tokenizer_files(kind, vocab_file, merge_file, tokenizer_model)
    if kind == "byte":
        return _byte_tokenizer()
    if kind == "json":
        if vocab_file is None:
            raise DataError("tokenizer 'json' needs --vocab-file, a tokenizers JSON file such as a checkpoint's "
                            "tokenizer.json")
        return Tokenizer.load(vocab_file)
    if kind == "gpt2":
        return _gpt2_tokenizer(vocab_file, merge_file)
    if kind == "bpe":
        return _trained_bpe(texts, vocab_size)
    if kind == "hf":
        return _hugging_face_tokenizer(tokenizer_model)
    if kind == "sentencepiece":
        return _sentencepiece_tokenizer(tokenizer_model)
    raise DataError(f"unknown tokenizer type '{kind}'; choose one of {', '.join(TOKENIZER_KINDS)} or Megatron's "
                    f"{', '.join(MEGATRON_TOKENIZER_TYPES)}")
