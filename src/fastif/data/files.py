"""Example files: JSON Lines / CSV / TSV readers (plain or gzip'd) that keep line numbers for error messages,
and Hugging Face ``datasets`` splits named ``hf:NAME[:CONFIG][@SPLIT]``."""

from __future__ import annotations

import csv
import gzip
import io
import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from ..errors import ConfigError, DataError

HF_PREFIX = "hf:"
Rows = list[tuple[int, dict[str, Any]]]
"""``(line number, row)`` pairs, the raw form every reader returns."""


def _open_text(path: Path) -> io.TextIOBase:
    """Open a plain or gzip'd UTF-8 text file (with or without a byte-order mark), turning a missing file into a
    DataError with a fix."""
    if not path.is_file():
        raise DataError(f"{path}: no such file; check the path (or name a bundled set of the recipe)")
    if path.suffix == ".gz":
        return gzip.open(path, "rt", encoding="utf-8-sig", newline="")  # type: ignore[return-value]
    return open(path, encoding="utf-8-sig", newline="")  # utf-8-sig: drops the byte-order mark Excel writes


def numbered_jsonl(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield ``(line number, object)`` for every non-blank line of a JSONL file."""
    try:
        with _open_text(path) as handle:
            for number, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as error:
                    raise DataError(f"{path}, line {number}: not valid JSON ({error.msg}); fix or remove it") from None
                if not isinstance(row, dict):
                    raise DataError(f"{path}, line {number}: expected a JSON object, got {type(row).__name__}")
                yield number, row
    except (gzip.BadGzipFile, UnicodeDecodeError, EOFError) as error:
        raise DataError(f"{path}: cannot be read as UTF-8 JSON Lines ({error}); is it the right file?") from None


def numbered_csv(path: Path, delimiter: str) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield ``(line number, row)`` for every row of a CSV/TSV file with a header line."""
    try:
        with _open_text(path) as handle:
            reader = csv.DictReader(handle, delimiter=delimiter)
            for row in reader:
                if None in row:
                    raise DataError(f"{path}, line {reader.line_num}: more fields than the header; quote the text")
                yield reader.line_num, row
    except (gzip.BadGzipFile, UnicodeDecodeError, EOFError, csv.Error) as error:
        raise DataError(f"{path}: cannot be read as UTF-8 CSV ({error}); is it the right file?") from None


def file_format(path: Path, fmt: str) -> str:
    """The format named by ``fmt``, or guessed from the file name when ``fmt`` is 'auto'."""
    if fmt != "auto":
        return fmt
    suffixes = [s for s in path.suffixes if s != ".gz"]
    last = suffixes[-1] if suffixes else ""
    formats = {".jsonl": "jsonl", ".json": "jsonl", ".ndjson": "jsonl", ".csv": "csv", ".tsv": "tsv"}
    if last not in formats:
        raise DataError(
            f"{path}: cannot tell the format from the name; rename it to end in .jsonl, .csv or .tsv "
            "(.gz allowed after it)"
        )
    return formats[last]


def numbered_rows(path: Path, fmt: str = "auto") -> Rows:
    """All ``(line number, row)`` pairs of a JSONL or CSV/TSV file."""
    kind = file_format(path, fmt)
    if kind == "jsonl":
        return list(numbered_jsonl(path))
    return list(numbered_csv(path, "\t" if kind == "tsv" else ","))


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """Read a plain or gzip'd JSON Lines file; a malformed line raises DataError naming the file and line."""
    return [row for _, row in numbered_jsonl(Path(path))]


def read_csv(path: str | Path, delimiter: str = ",") -> list[dict[str, Any]]:
    """Read a plain or gzip'd CSV (or TSV with ``delimiter='\\t'``) file with a header line into dicts."""
    return [row for _, row in numbered_csv(Path(path), delimiter)]


def hf_rows(spec: str, role: str, label_column: str, label_names: Sequence[str]) -> Rows:
    """Rows of a Hugging Face dataset ``hf:NAME[:CONFIG][@SPLIT]`` (needs ``datasets`` and a network).

    Integer class labels become their names when the split's names are among ``label_names``.
    """
    name, _, split = spec.removeprefix(HF_PREFIX).partition("@")
    name, _, subset = name.partition(":")
    try:
        import datasets
    except ImportError:
        raise ConfigError(
            f"{spec}: reading Hugging Face datasets needs the `datasets` package and a network "
            "(pip install datasets), or export the split to a JSONL/CSV file"
        ) from None
    try:
        dataset = datasets.load_dataset(name, subset or None, split=split or role)
    except Exception as error:  # datasets raises many error types (network, missing split, bad name)
        message = " ".join(str(error).split())[:300]
        raise DataError(
            f"cannot load {spec} ({message}); check the name, config and split, and that you are online "
            "(offline: export it to a JSONL/CSV file)"
        ) from None
    names = getattr(dataset.features.get(label_column), "names", None)
    as_names = names is not None and set(names) <= set(label_names)
    rows = []
    for number, row in enumerate(dataset, start=1):
        row = dict(row)
        if as_names and isinstance(row.get(label_column), int) and row[label_column] >= 0:
            row[label_column] = names[row[label_column]]
        rows.append((number, row))
    return rows
