"""Where documents come from: the user's .txt/.jsonl files, or a default corpus every Python install carries."""

import json
import os
import sysconfig
from collections.abc import Iterator, Sequence
from pathlib import Path

from moetrain.data import DataError

DOCUMENT_SUFFIXES = (".txt", ".jsonl")

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


def _expand(paths: DataPaths) -> list[tuple[Path, list[Path]]]:
    """Each given path with the files it stands for; a directory stands for its .txt/.jsonl files, sorted."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    if not paths:
        raise DataError("no data paths given; pass .txt/.jsonl files or directories")
    groups = []
    for path in map(Path, paths):
        if path.is_dir():
            files = sorted(file for file in path.rglob("*") if file.is_file()
                           and file.suffix.lower() in DOCUMENT_SUFFIXES
                           and not any(part.startswith(".") for part in file.relative_to(path).parts))
            if not files:
                raise DataError(f"data directory '{path}' has no .txt or .jsonl files; add some or point elsewhere")
        elif path.is_file():
            if path.suffix.lower() in (".bin", ".idx"):
                stem = path.with_suffix("")
                raise DataError(f"'{path}' is not a complete prepared dataset: one needs {stem}.bin, {stem}.idx and "
                                f"{stem}.tokenizer.json together, as moetrain prepare-data writes them; re-run it")
            if path.suffix.lower() not in DOCUMENT_SUFFIXES:
                raise DataError(f"data file '{path}' is neither .txt nor .jsonl; convert it (one document per .txt "
                                'file, or one {"text": ...} object per .jsonl line)')
            files = [path]
        else:
            raise DataError(f"data path '{path}' does not exist; pass .txt/.jsonl files, directories, "
                            "or a prefix made by moetrain prepare-data")
        groups.append((path, files))
    return groups


def input_files(paths: DataPaths) -> list[Path]:
    """The files `read_documents(paths)` reads, in reading order (checked, not yet read)."""
    return [file for _, files in _expand(paths) for file in files]


def _read_file(file: Path) -> Iterator[str]:
    """Non-blank documents of one file: the whole .txt file, or each .jsonl line's "text"."""
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
                if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                    raise DataError(f"data file '{file}' line {line_number} has no 'text' field; "
                                    'each JSONL line needs a "text" string')
                yield record["text"]
    except UnicodeDecodeError as error:
        raise DataError(f"data file '{file}' is not UTF-8 text ({error.reason} at byte {error.start}); "
                        "re-encode it as UTF-8") from None


def read_documents(paths: DataPaths) -> Iterator[str]:
    """Streams the documents of .txt files, .jsonl files and directories (recursively, sorted by path).

    Paths are checked at once; contents are read lazily, so corpora larger than memory stream through.
    A given file or directory that yields no non-blank document is an error (blank ones are skipped).
    """
    groups = _expand(paths)

    def documents() -> Iterator[str]:
        for given, files in groups:
            found = 0
            for file in files:
                for document in _read_file(file):
                    if document.strip():
                        found += 1
                        yield document
            if not found:
                kind = "directory" if given.is_dir() else "file"
                raise DataError(f"data {kind} '{given}' has no usable documents (all empty or blank); "
                                "add text or leave it out")

    return documents()
