"""`moetrain prepare-data`: tokenize text once into the memory-mapped .bin/.idx format (moetrain.data parses
its own arguments)."""

from __future__ import annotations

SUMMARY = "tokenize text/JSONL once into the memory-mapped .bin/.idx format"


def main(argv: list[str]) -> int:
    from moetrain.data import prepare_data_main

    return prepare_data_main(argv)
