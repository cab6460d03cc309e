"""Where documents come from: the user's .txt/.jsonl files, Hugging Face datasets saved locally (a save_to_disk
directory, .parquet or .arrow files), or a default corpus every Python install carries."""

import json
import os
import sysconfig
from collections.abc import Iterator, Sequence
from pathlib import Path

from moetrain.data.errors import DataError

DOCUMENT_SUFFIXES = (".txt", ".jsonl", ".parquet", ".arrow")
# Megatron's preprocess_data.py reads "loose JSON", one object per line, often named .json: read as JSONL when
# named explicitly (never picked up from a directory, where .json files are usually metadata).
LOOSE_JSON_SUFFIX = ".json"
_TABLE_BATCH_ROWS = 1024

# Pure-Python standard-library modules and packages present from Python 3.10 on; a name a future
# Python drops is skipped. Sorted so the corpus order never depends on the filesystem.
STDLIB_SOURCES = sorted([
    "abc", "argparse", "ast", "asyncio", "base64", "bdb", "bisect", "calendar", "cmd", "code", "codecs",
    "codeop", "collections", "colorsys", "compileall", "concurrent", "configparser", "contextlib", "copy",
    "copyreg", "csv", "dataclasses", "datetime", "difflib", "dis", "doctest", "email", "enum", "filecmp",
    "fileinput", "fnmatch", "fractions", "ftplib", "functools", "getopt", "getpass", "gettext", "glob",
    "graphlib", "gzip", "hashlib", "heapq", "hmac", "html", "http", "imaplib", "importlib", "inspect",
    "ipaddress", "json", "keyword", "linecache", "locale", "logging", "lzma", "mailbox", "mimetypes",
    "modulefinder", "netrc", "ntpath", "numbers", "opcode", "operator", "optparse", "os", "pathlib", "pdb",
    "pickle", "pickletools", "pkgutil", "platform", "plistlib", "poplib", "posixpath", "pprint", "profile",
    "pstats", "pty", "py_compile", "pyclbr", "pydoc", "queue", "quopri", "random", "reprlib", "rlcompleter",
    "runpy", "sched", "secrets", "selectors", "shelve", "shlex", "shutil", "signal", "site", "smtplib",
    "socket", "socketserver", "ssl", "stat", "statistics", "string", "stringprep", "subprocess", "symtable",
    "sysconfig", "tabnanny", "tarfile", "tempfile", "textwrap", "threading", "timeit", "token", "tokenize",
    "trace", "traceback", "tracemalloc", "types", "typing", "unittest", "urllib", "uuid", "warnings", "wave",
    "weakref", "webbrowser", "xml", "zipapp", "zipfile", "zipimport",
])


def _module_files(stdlib: Path, name: str) -> list[Path]:
    """Source files of one stdlib module (a single .py, or every .py of a package except its tests)."""
    single = stdlib / f"{name}.py"
    if single.is_file():
        return [single]
    package = stdlib / name
    if not package.is_dir():
        return []
    return sorted(p for p in package.rglob("*.py") if "test" not in p.relative_to(package).parts[:-1]
                  and not p.name.startswith("test_"))


def default_corpus() -> list[str]:
    """Python's topic documentation followed by the source of pure-Python stdlib modules (about 6 MB).

    Read straight from the standard-library directory (never through sys.path, so a local file named
    like a module cannot leak in); the same Python install always yields the same list.
    """
    from pydoc_data.topics import topics

    documents = [topics[key] for key in sorted(topics)]
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for name in STDLIB_SOURCES:
        for path in _module_files(stdlib, name):
            documents.append(path.read_text(encoding="utf-8"))
    return [doc for doc in documents if doc.strip()]


DataPaths = str | os.PathLike | Sequence[str | os.PathLike]


def _saved_dataset_files(directory: Path) -> list[Path]:
    """The Arrow files of a `datasets.Dataset.save_to_disk` directory, in row order (as its state.json lists them)."""
    if (directory / "dataset_dict.json").is_file():
        splits = json.loads((directory / "dataset_dict.json").read_text())["splits"]
        if "train" not in splits:
            raise DataError(f"saved dataset dictionary '{directory}' has no 'train' split (it has "
                            f"{', '.join(splits)}); pass the split's directory, e.g. {directory / splits[0]}")
        directory = directory / "train"
    state = json.loads((directory / "state.json").read_text())
    files = [directory / entry["filename"] for entry in state["_data_files"]]
    missing = [file for file in files if not file.is_file()]
    if missing:
        raise DataError(f"saved dataset '{directory}' lacks {missing[0].name}; save it again with save_to_disk")
    return files


def is_saved_dataset(path: Path) -> bool:
    return path.is_dir() and ((path / "state.json").is_file() or (path / "dataset_dict.json").is_file())


def _expand(paths: DataPaths) -> list[tuple[Path, list[Path]]]:
    """Each given path with the files it stands for; a directory stands for its document files, sorted, and a
    `save_to_disk` directory for its Arrow files in row order."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    if not paths:
        raise DataError("no data paths given; pass .txt/.jsonl files or directories")
    groups = []
    for path in map(Path, paths):
        if is_saved_dataset(path):
            files = _saved_dataset_files(path)
        elif path.is_dir():
            files = sorted(file for file in path.rglob("*") if file.is_file()
                           and file.suffix.lower() in DOCUMENT_SUFFIXES
                           and not any(part.startswith(".") for part in file.relative_to(path).parts))
            if not files:
                raise DataError(f"data directory '{path}' has no .txt, .jsonl, .parquet or .arrow files; add some "
                                "or point elsewhere")
        elif path.is_file():
            if path.suffix.lower() in (".bin", ".idx"):
                stem = path.with_suffix("")
                raise DataError(f"'{path}' is not a complete prepared dataset: one needs {stem}.bin, {stem}.idx and "
                                f"{stem}.tokenizer.json together, as moetrain prepare-data writes them; re-run it")
            if path.suffix.lower() not in (*DOCUMENT_SUFFIXES, LOOSE_JSON_SUFFIX):
                raise DataError(f"data file '{path}' is not .txt, .jsonl, .parquet or .arrow; convert it (one "
                                'document per .txt file, or one {"text": ...} object per .jsonl line)')
            files = [path]
        else:
            raise DataError(f"data path '{path}' does not exist; pass .txt/.jsonl files, directories, "
                            "or a prefix made by moetrain prepare-data")
        groups.append((path, files))
    return groups


def input_files(paths: DataPaths) -> list[Path]:
    """The files `read_documents(paths)` reads, in reading order (checked, not yet read)."""
    return [file for _, files in _expand(paths) for file in files]


def _table_batches(file: Path, text_key: str) -> Iterator:
    """Record batches of one column of a Parquet or Arrow file (Arrow IPC stream, as datasets writes, or file)."""
    try:
        import pyarrow.ipc
        import pyarrow.parquet
    except ImportError:
        raise DataError(f"reading '{file}' needs pyarrow; pip install 'moetrain[datasets]'") from None
    try:
        if file.suffix.lower() == ".parquet":
            table = pyarrow.parquet.ParquetFile(file)
            if text_key not in table.schema_arrow.names:
                raise KeyError(table.schema_arrow.names)
            yield from table.iter_batches(batch_size=_TABLE_BATCH_ROWS, columns=[text_key])
            return
        with open(file, "rb") as source:
            try:
                reader = pyarrow.ipc.open_stream(source)
                batches = iter(reader)
            except pyarrow.ArrowInvalid:
                source.seek(0)
                reader = pyarrow.ipc.open_file(source)
                batches = (reader.get_batch(i) for i in range(reader.num_record_batches))
            if text_key not in reader.schema.names:
                raise KeyError(reader.schema.names)
            for batch in batches:
                yield batch.select([text_key])
    except KeyError as error:
        raise DataError(f"data file '{file}' has no column '{text_key}' (it has {', '.join(error.args[0])}); "
                        "name the text column with --json-keys") from None
    except pyarrow.ArrowException as error:
        raise DataError(f"data file '{file}' is not a readable {file.suffix} table ({error}); write it again") from None


def _read_table(file: Path, text_key: str) -> Iterator[str]:
    for batch in _table_batches(file, text_key):
        for text in batch.column(0).to_pylist():
            if text is not None and not isinstance(text, str):
                raise DataError(f"data file '{file}' column '{text_key}' holds {type(text).__name__}, not text; "
                                "name the text column with --json-keys")
            yield text or ""


def _read_file(file: Path, text_key: str = "text") -> Iterator[str]:
    """Non-blank documents of one file: the whole .txt file, each .jsonl (or loose .json) line's `text_key`, or
    each row's `text_key` column of a .parquet/.arrow table."""
    if file.suffix.lower() in (".parquet", ".arrow"):
        yield from _read_table(file, text_key)
        return
    try:
        if file.suffix.lower() == ".txt":
            yield file.read_text(encoding="utf-8-sig")
            return
        with file.open(encoding="utf-8-sig") as lines:
            for line_number, line in enumerate(lines, start=1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as error:
                    raise DataError(f"data file '{file}' line {line_number} is not valid JSON ({error.msg}); "
                                    'each JSONL line needs a JSON object like {"text": "..."}') from None
                if not isinstance(record, dict) or not isinstance(record.get(text_key), str):
                    raise DataError(f"data file '{file}' line {line_number} has no '{text_key}' field; "
                                    f'each JSONL line needs a "{text_key}" string (or name the field with --json-keys)')
                yield record[text_key]
    except UnicodeDecodeError as error:
        raise DataError(f"data file '{file}' is not UTF-8 text ({error.reason} at byte {error.start}); "
                        "re-encode it as UTF-8") from None


def read_documents(paths: DataPaths, text_key: str = "text") -> Iterator[str]:
    """Streams the documents of .txt, .jsonl, .parquet and .arrow files, directories (recursively, sorted by
    path) and `save_to_disk` dataset directories; `text_key` names the JSONL field or table column.

    Paths are checked at once; contents are read lazily, so corpora larger than memory stream through.
    A given file or directory that yields no non-blank document is an error (blank ones are skipped).
    """
    groups = _expand(paths)

    def documents() -> Iterator[str]:
        for given, files in groups:
            found = 0
            for file in files:
                for document in _read_file(file, text_key):
                    if document.strip():
                        found += 1
                        yield document
            if not found:
                kind = "directory" if given.is_dir() else "file"
                raise DataError(f"data {kind} '{given}' has no usable documents (all empty or blank); "
                                "add text or leave it out")

    return documents()
