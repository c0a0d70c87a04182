"""NLI text data: JSONL/CSV readers, the embedded MNLI/HANS/ANLI sets, label schemes, and a tokenised dataset.

Records are read once into :class:`NLIRecord` s (text, label id, id, extra fields); :class:`TextPairData`
tokenises them once (no padding) and pads each batch to its own longest example, so it plugs into every
fastif stage through the :class:`~fastif.data.Dataset` protocol.
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import io
import json
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor

from .errors import ConfigError, DataError

NLI3_LABELS: tuple[str, ...] = ("entailment", "neutral", "contradiction")
"""The 3-class MNLI/ANLI label names, in label-id order (GLUE's order)."""

NLI2_LABELS: tuple[str, ...] = ("entailment", "non-entailment")
"""The 2-class label names used for HANS: entailment (0) vs non-entailment (1)."""

NLI2_LABEL_MAP: tuple[tuple[str, str], ...] = (("neutral", "non-entailment"), ("contradiction", "non-entailment"))
"""Raw-label aliases that fold 3-class data into :data:`NLI2_LABELS` (HANS's own labels are already 2-class)."""

EMBEDDED_FILES: dict[str, str] = {
    "mnli": "mnli/mnli_dev_matched.jsonl.gz",
    "hans_train": "hans/hans_train.jsonl.gz",
    "hans_eval": "hans/hans_eval.jsonl.gz",
    "anli_r1": "anli/anli_r1_dev.jsonl.gz",
    "anli_r2": "anli/anli_r2_dev.jsonl.gz",
    "anli_r3": "anli/anli_r3_dev.jsonl.gz",
}

MNLI_SPLIT_SIZES: dict[str, int] = {"train": 8000, "validation": 815, "test": 1000}
"""Sizes of the fixed split of MNLI dev-matched (9,815 pairs) used as train / validation / test."""

MNLI_SPLIT_SEED = 0

EMBEDDED_NAMES: tuple[str, ...] = (*EMBEDDED_FILES, *(f"mnli_{split}" for split in MNLI_SPLIT_SIZES))


def nli_label_scheme(num_labels: int) -> tuple[tuple[str, ...], tuple[tuple[str, str], ...]]:
    """Label names and raw-label aliases for 3-class NLI or 2-class (entailment vs non-entailment) NLI."""
    if num_labels == 3:
        return NLI3_LABELS, ()
    if num_labels == 2:
        return NLI2_LABELS, NLI2_LABEL_MAP
    raise ConfigError(f"num_labels must be 2 (entailment vs non-entailment) or 3 (NLI), got {num_labels}")


@dataclass(frozen=True)
class TextDataConfig:
    """Where text data comes from and how its columns map to (premise, hypothesis, label).

    Give exactly one of ``path`` (a ``.jsonl``, ``.jsonl.gz``, ``.csv``, ``.tsv`` or ``.csv.gz`` file) and
    ``embedded`` (one of :data:`EMBEDDED_NAMES`). ``premise_column`` is the (first) text column;
    ``hypothesis_column=None`` makes a single-text dataset. Raw labels are names from ``label_names``,
    aliases from ``label_map`` (pairs ``(raw, name)``), or integer ids. Rows without ``id_column`` get their
    row number as id.
    """

    path: str | None = None
    embedded: str | None = None
    format: Literal["auto", "jsonl", "csv", "tsv"] = "auto"
    premise_column: str = "premise"
    hypothesis_column: str | None = "hypothesis"
    label_column: str = "label"
    id_column: str | None = "id"
    label_names: tuple[str, ...] = NLI3_LABELS
    label_map: tuple[tuple[str, str], ...] = ()
    max_length: int = 128

    def __post_init__(self) -> None:
        if (self.path is None) == (self.embedded is None):
            raise ConfigError("TextDataConfig needs exactly one of path= (a file) and embedded= (a bundled set)")
        if self.embedded is not None and self.embedded not in EMBEDDED_NAMES:
            raise ConfigError(f"TextDataConfig.embedded={self.embedded!r} is unknown; choose one of {EMBEDDED_NAMES}")
        if len(self.label_names) < 2 or len(set(self.label_names)) != len(self.label_names):
            raise ConfigError(f"TextDataConfig.label_names must be 2+ distinct names, got {self.label_names}")
        for raw, name in self.label_map:
            if name not in self.label_names:
                raise ConfigError(f"TextDataConfig.label_map maps {raw!r} to {name!r}, not one of {self.label_names}")
        if self.max_length < 2:
            raise ConfigError(f"TextDataConfig.max_length must be at least 2, got {self.max_length}")


@dataclass(frozen=True)
class NLIRecord:
    """One example: its text(s), label id and name, a string id, and any other fields of the source row."""

    id: str
    premise: str
    hypothesis: str | None
    label: int
    label_name: str
    extra: Mapping[str, Any] = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------- readers


def _open_text(path: Path) -> io.TextIOBase:
    """Open a plain or gzip'd UTF-8 text file, turning a missing file into a DataError with a fix."""
    if not path.is_file():
        raise DataError(
            f"{path}: no such file; check the path, or use one of the bundled sets {EMBEDDED_NAMES} via embedded="
        )
    if path.suffix == ".gz":
        return gzip.open(path, "rt", encoding="utf-8", newline="")  # type: ignore[return-value]
    return open(path, encoding="utf-8", newline="")


def _numbered_jsonl(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
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


def _numbered_csv(path: Path, delimiter: str) -> Iterator[tuple[int, dict[str, Any]]]:
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


def _file_format(path: Path, fmt: str) -> str:
    """The format named by ``fmt``, or guessed from the file name when ``fmt`` is 'auto'."""
    if fmt != "auto":
        return fmt
    suffixes = [s for s in path.suffixes if s != ".gz"]
    last = suffixes[-1] if suffixes else ""
    formats = {".jsonl": "jsonl", ".json": "jsonl", ".ndjson": "jsonl", ".csv": "csv", ".tsv": "tsv"}
    if last not in formats:
        raise DataError(f"{path}: cannot tell the format from the name; rename it or set format='jsonl'|'csv'|'tsv'")
    return formats[last]


def _numbered_rows(path: Path, fmt: str = "auto") -> list[tuple[int, dict[str, Any]]]:
    """All ``(line number, row)`` pairs of a JSONL or CSV/TSV file."""
    kind = _file_format(path, fmt)
    if kind == "jsonl":
        return list(_numbered_jsonl(path))
    return list(_numbered_csv(path, "\t" if kind == "tsv" else ","))


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """Read a plain or gzip'd JSON Lines file; a malformed line raises DataError naming the file and line."""
    return [row for _, row in _numbered_jsonl(Path(path))]


def read_csv(path: str | Path, delimiter: str = ",") -> list[dict[str, Any]]:
    """Read a plain or gzip'd CSV (or TSV with ``delimiter='\\t'``) file with a header line into dicts."""
    return [row for _, row in _numbered_csv(Path(path), delimiter)]


# ---------------------------------------------------------------------------------------------- records


def _label_id(raw: Any, names: Sequence[str], aliases: Mapping[str, str], where: str) -> int:
    """Turn a raw label (a name, an alias of a name, or an integer id) into a label id."""
    if isinstance(raw, str):
        raw = raw.strip()
        name = aliases.get(raw, raw)
        if name in names:
            return list(names).index(name)
        if raw.lstrip("-").isdigit():
            raw = int(raw)
    if isinstance(raw, int) and not isinstance(raw, bool) and 0 <= raw < len(names):
        return raw
    raise DataError(
        f"{where}: label {raw!r} is not one of {tuple(names)} nor an id below {len(names)}; "
        "set label_names, or map it with label_map=((raw, name), ...)"
    )


def records_from_rows(
    rows: Sequence[tuple[int, Mapping[str, Any]]], config: TextDataConfig, source: str
) -> list[NLIRecord]:
    """Build records from ``(line number, row)`` pairs using ``config``'s columns and labels."""
    if not rows:
        raise DataError(f"{source}: no examples; give a file with at least one row")
    text_columns = [config.premise_column] + ([config.hypothesis_column] if config.hypothesis_column else [])
    first_line, first = rows[0]
    for column in [*text_columns, config.label_column]:
        if column not in first:
            raise DataError(
                f"{source}, line {first_line}: no column {column!r} (columns: {sorted(first)}); "
                "set premise_column / hypothesis_column / label_column to the file's names"
            )
    used = {*text_columns, config.label_column, config.id_column}
    aliases = dict(config.label_map)
    records = []
    for index, (line, row) in enumerate(rows):
        where = f"{source}, line {line}"
        texts = []
        for column in text_columns:
            value = row.get(column)
            if not isinstance(value, str):
                raise DataError(f"{where}: column {column!r} must be text, got {value!r}; fix or remove the row")
            texts.append(value)
        label = _label_id(row.get(config.label_column), config.label_names, aliases, where)
        raw_id = row.get(config.id_column) if config.id_column else None
        records.append(
            NLIRecord(
                id=str(index) if raw_id is None else str(raw_id),
                premise=texts[0],
                hypothesis=texts[1] if len(texts) > 1 else None,
                label=label,
                label_name=config.label_names[label],
                extra={key: value for key, value in row.items() if key not in used},
            )
        )
    return records


def embedded_file(name: str) -> Path:
    """Path of a bundled data file (``name`` in :data:`EMBEDDED_FILES`), located with importlib.resources."""
    if name not in EMBEDDED_FILES:
        raise DataError(f"no bundled data set {name!r}; choose one of {EMBEDDED_NAMES}")
    resource = resources.files("fastif").joinpath("datasets", *EMBEDDED_FILES[name].split("/"))
    if not resource.is_file():
        raise DataError(f"bundled data file {EMBEDDED_FILES[name]} is missing from the fastif install; reinstall it")
    return Path(str(resource))


def seeded_split(records: Sequence[NLIRecord], sizes: Sequence[int], seed: int, salt: str) -> list[list[NLIRecord]]:
    """Split records into consecutive parts of ``sizes`` after ordering them by SHA-256 of ``salt:seed:id``.

    Hash order depends only on the ids, not on file order or library versions, so splits never drift.
    """
    if sum(sizes) > len(records):
        raise DataError(f"cannot split {len(records)} records into parts of sizes {list(sizes)}")
    if len({record.id for record in records}) != len(records):
        raise DataError(f"{salt}: record ids are not unique, so a seeded split by id is ill-defined")
    order = sorted(records, key=lambda r: hashlib.sha256(f"{salt}:{seed}:{r.id}".encode()).hexdigest())
    parts, start = [], 0
    for size in sizes:
        parts.append(order[start : start + size])
        start += size
    return parts


def load_embedded(name: str, num_labels: int = 3) -> list[NLIRecord]:
    """Records of a bundled set: 'mnli', 'mnli_train'/'mnli_validation'/'mnli_test', 'hans_*', 'anli_r1'..'anli_r3'.

    The MNLI splits come from the 9,815 MNLI dev-matched pairs ordered by SHA-256 of ``"mnli:0:<id>"``: the
    first 8,000 are train, the next 815 validation and the last 1,000 test (disjoint, fixed forever).
    ``num_labels=2`` folds neutral and contradiction into non-entailment; HANS needs ``num_labels=2``.
    """
    names, aliases = nli_label_scheme(num_labels)
    if name.startswith("hans") and num_labels != 2:
        raise DataError(f"{name} is labelled entailment / non-entailment; load it with num_labels=2")
    if name.startswith("mnli_") and name.removeprefix("mnli_") in MNLI_SPLIT_SIZES:
        sizes = list(MNLI_SPLIT_SIZES.values())
        parts = seeded_split(load_embedded("mnli", num_labels), sizes, MNLI_SPLIT_SEED, "mnli")
        return parts[list(MNLI_SPLIT_SIZES).index(name.removeprefix("mnli_"))]
    path = embedded_file(name)
    config = TextDataConfig(embedded=name, label_names=names, label_map=aliases)
    return records_from_rows(_numbered_rows(path), config, f"embedded:{name}")


def load_text_data(config: TextDataConfig) -> list[NLIRecord]:
    """Read the records ``config`` describes (a JSONL/CSV file or a bundled set) with its columns and labels."""
    if config.embedded is not None:
        if config.embedded.startswith("mnli_"):
            rows = [(i + 1, _record_row(r)) for i, r in enumerate(load_embedded(config.embedded))]
            return records_from_rows(rows, config, f"embedded:{config.embedded}")
        return records_from_rows(_numbered_rows(embedded_file(config.embedded)), config, f"embedded:{config.embedded}")
    path = Path(config.path)  # type: ignore[arg-type]
    return records_from_rows(_numbered_rows(path, config.format), config, str(path))


def load_text_pair_data(config: TextDataConfig, tokenizer: Any) -> TextPairData:
    """Read ``config``'s records and tokenise them with ``tokenizer`` at ``config.max_length``."""
    return TextPairData(load_text_data(config), tokenizer, config.max_length, config.label_names)


def _record_row(record: NLIRecord) -> dict[str, Any]:
    """A bundled 3-class record turned back into a raw row (for re-labelling with a TextDataConfig)."""
    return {
        "id": record.id,
        "premise": record.premise,
        "hypothesis": record.hypothesis,
        "label": record.label_name,
        **record.extra,
    }


def records_fingerprint(records: Sequence[NLIRecord]) -> str:
    """SHA-256 over the ids, texts and labels of ``records``, in order (identifies a training set)."""
    digest = hashlib.sha256()
    for record in records:
        digest.update(json.dumps([record.id, record.premise, record.hypothesis, record.label]).encode())
        digest.update(b"\n")
    return digest.hexdigest()


# ---------------------------------------------------------------------------------------------- dataset


class TextPairData:
    """Tokenised (premise, hypothesis) pairs with labels; ``batch`` pads dynamically to the batch's longest.

    Tokenisation happens once, here (truncating the longer text first to ``max_length``), so batching is
    cheap. ``batch`` returns long tensors ``input_ids``, ``attention_mask``, ``token_type_ids`` (when the
    tokenizer makes them) and ``labels``.
    """

    def __init__(
        self,
        records: Sequence[NLIRecord],
        tokenizer: Any,
        max_length: int = 128,
        label_names: Sequence[str] | None = None,
    ) -> None:
        if not records:
            raise DataError("TextPairData needs at least one record; the data set is empty")
        pairs = {record.hypothesis is not None for record in records}
        if len(pairs) != 1:
            raise DataError("mixing single-text and pair records in one TextPairData; split them into two sets")
        premises = [record.premise for record in records]
        hypotheses = [record.hypothesis for record in records] if pairs == {True} else None
        encoded = tokenizer(premises, hypotheses, truncation=True, max_length=max_length, padding=False)
        self._init(
            list(records),
            encoded["input_ids"],
            encoded.get("token_type_ids"),
            tokenizer.pad_token_id or 0,
            max_length,
            tuple(label_names) if label_names is not None else None,
        )

    def _init(
        self,
        records: list[NLIRecord],
        input_ids: list[list[int]],
        token_type_ids: list[list[int]] | None,
        pad_token_id: int,
        max_length: int,
        label_names: tuple[str, ...] | None,
    ) -> None:
        self.records = records
        self._input_ids = input_ids
        self._token_type_ids = token_type_ids
        self.pad_token_id = pad_token_id
        self.max_length = max_length
        self.label_names = label_names
        self.lengths = [len(ids) for ids in input_ids]
        self.labels = torch.tensor([record.label for record in records], dtype=torch.long)

    def __len__(self) -> int:
        return len(self.records)

    def _check(self, indices: Sequence[int]) -> list[int]:
        index = [int(i) for i in indices]
        if any(i < 0 or i >= len(self) for i in index):
            raise DataError(f"indices out of range for a data set of {len(self)} examples")
        return index

    def batch(self, indices: Sequence[int]) -> dict[str, Tensor]:
        """Collate examples ``indices`` into right-padded long tensors (width = longest example in the batch)."""
        index = self._check(indices)
        width = max((self.lengths[i] for i in index), default=0)
        input_ids = torch.full((len(index), width), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(index), width), dtype=torch.long)
        for row, i in enumerate(index):
            input_ids[row, : self.lengths[i]] = torch.tensor(self._input_ids[i], dtype=torch.long)
            attention_mask[row, : self.lengths[i]] = 1
        batch = {"input_ids": input_ids, "attention_mask": attention_mask}
        if self._token_type_ids is not None:
            token_type_ids = torch.zeros((len(index), width), dtype=torch.long)
            for row, i in enumerate(index):
                token_type_ids[row, : self.lengths[i]] = torch.tensor(self._token_type_ids[i], dtype=torch.long)
            batch["token_type_ids"] = token_type_ids
        batch["labels"] = self.labels[index]
        return batch

    def fingerprint(self) -> str:
        """SHA-256 of the records and their token ids: identifies a tokenised set (e.g. for a saved kNN index)."""
        digest = hashlib.sha256(records_fingerprint(self.records).encode())
        digest.update(json.dumps([self.max_length, self._input_ids, self._token_type_ids]).encode())
        return digest.hexdigest()

    def texts(self, i: int) -> str:
        """Example ``i`` as readable text: ``"premise ||| hypothesis"`` (or just the text of a single-text set)."""
        record = self.records[self._check([i])[0]]
        return record.premise if record.hypothesis is None else f"{record.premise} ||| {record.hypothesis}"

    def subset(self, indices: Sequence[int]) -> TextPairData:
        """A new data set of examples ``indices``, in that order, reusing the tokenisation."""
        index = self._check(indices)
        if not index:
            raise DataError("a subset needs at least one index")
        subset = object.__new__(TextPairData)
        subset._init(
            [self.records[i] for i in index],
            [self._input_ids[i] for i in index],
            None if self._token_type_ids is None else [self._token_type_ids[i] for i in index],
            self.pad_token_id,
            self.max_length,
            self.label_names,
        )
        return subset
