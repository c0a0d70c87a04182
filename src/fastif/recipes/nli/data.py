"""NLI data: the 3-class and 2-class label schemes, the bundled MNLI/HANS/ANLI sets, the seeded MNLI split, and
:class:`TextDataConfig`, which maps a file's (premise, hypothesis, label) columns onto generic text records."""

from __future__ import annotations

import hashlib
import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Literal

from ...data.files import numbered_rows
from ...data.text import TextColumns, TextPairData, TextRecord, records_from_rows
from ...errors import ConfigError, DataError

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

HANS_HEURISTICS: tuple[str, ...] = ("lexical_overlap", "subsequence", "constituent")
"""The three HANS heuristics (the groups of the HANS evaluation set)."""

ANLI_ROUNDS: tuple[str, ...] = ("r1", "r2", "r3")
"""The three ANLI rounds (one bundled dev set each)."""

MNLI_SPLIT_SIZES: dict[str, int] = {"train": 8000, "validation": 815, "test": 1000}
"""Target sizes of the fixed premise-grouped split of MNLI dev-matched (9,815 pairs) into train / validation /
test; each part ends at the first premise boundary at or past its target, and test is the rest
(:func:`grouped_split`)."""

MNLI_TRAIN_PAIRS = 8001
MNLI_VALIDATION_PAIRS = 814
"""The parts' actual sizes (the test part holds 1,000); ``tests/test_nli.py`` checks them against the split."""

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
    """Where NLI data comes from and how its columns map to (premise, hypothesis, label).

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

    @property
    def columns(self) -> TextColumns:
        """The generic column mapping: premise is the text, hypothesis the text pair."""
        return TextColumns(
            label_names=self.label_names,
            text=self.premise_column,
            text_pair=self.hypothesis_column,
            label=self.label_column,
            id=self.id_column,
            label_map=self.label_map,
            options="premise_column / hypothesis_column / label_column",
        )


def embedded_file(name: str) -> Path:
    """Path of a bundled data file (``name`` in :data:`EMBEDDED_FILES`), located with importlib.resources."""
    if name not in EMBEDDED_FILES:
        raise DataError(f"no bundled data set {name!r}; choose one of {EMBEDDED_NAMES}")
    resource = resources.files(__package__).joinpath("datasets", *EMBEDDED_FILES[name].split("/"))
    if not resource.is_file():
        raise DataError(f"bundled data file {EMBEDDED_FILES[name]} is missing from the fastif install; reinstall it")
    return Path(str(resource))


def seeded_split(records: Sequence[TextRecord], sizes: Sequence[int], seed: int, salt: str) -> list[list[TextRecord]]:
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


def grouped_split(
    records: Sequence[TextRecord], sizes: Sequence[int], seed: int, salt: str, group: Callable[[TextRecord], str]
) -> list[list[TextRecord]]:
    """Split records into parts of about ``sizes`` (the rest last) so that no ``group`` key is in two parts.

    Groups are ordered by SHA-256 of ``salt:seed:<key>`` and records within a group by :func:`seeded_split`'s
    id order; a part ends at the first group boundary at or past its cumulative target. MNLI's premises carry
    three hypotheses each, so a split by pair puts a test pair's near-duplicates in train.
    """
    if sum(sizes) > len(records):
        raise DataError(f"cannot split {len(records)} records into parts of sizes {list(sizes)}")
    groups: dict[str, list[TextRecord]] = {}
    for record in seeded_split(records, [len(records)], seed, salt)[0]:
        groups.setdefault(group(record), []).append(record)
    order = sorted(groups, key=lambda key: hashlib.sha256(f"{salt}:{seed}:{key}".encode()).hexdigest())
    parts: list[list[TextRecord]] = [[] for _ in range(len(sizes) + 1)]
    targets, part, placed = list(itertools.accumulate(sizes)), 0, 0
    for key in order:
        while part < len(targets) and placed >= targets[part]:
            part += 1
        parts[part] += groups[key]
        placed += len(groups[key])
    return parts


def load_embedded(name: str, num_labels: int = 3) -> list[TextRecord]:
    """Records of a bundled set: 'mnli', 'mnli_train'/'mnli_validation'/'mnli_test', 'hans_*', 'anli_r1'..'anli_r3'.

    The MNLI splits come from the 9,815 MNLI dev-matched pairs grouped by premise (:func:`grouped_split`, salt
    ``"mnli-premise"``): 8,001 train, 814 validation and 1,000 test pairs, with no premise in two parts.
    ``num_labels=2`` folds neutral and contradiction into non-entailment; HANS needs ``num_labels=2``.
    """
    names, aliases = nli_label_scheme(num_labels)
    if name.startswith("hans") and num_labels != 2:
        raise DataError(f"{name} is labelled entailment / non-entailment; load it with num_labels=2")
    if name.startswith("mnli_") and name.removeprefix("mnli_") in MNLI_SPLIT_SIZES:
        sizes = list(MNLI_SPLIT_SIZES.values())[:-1]
        records = load_embedded("mnli", num_labels)
        parts = grouped_split(records, sizes, MNLI_SPLIT_SEED, "mnli-premise", group=lambda record: record.text)
        return parts[list(MNLI_SPLIT_SIZES).index(name.removeprefix("mnli_"))]
    path = embedded_file(name)
    config = TextDataConfig(embedded=name, label_names=names, label_map=aliases)
    return records_from_rows(numbered_rows(path), config.columns, f"embedded:{name}")


def load_text_data(config: TextDataConfig) -> list[TextRecord]:
    """Read the records ``config`` describes (a JSONL/CSV file or a bundled set) with its columns and labels."""
    if config.embedded is not None:
        source = f"embedded:{config.embedded}"
        if config.embedded.startswith("mnli_"):
            rows = [(i + 1, _record_row(r)) for i, r in enumerate(load_embedded(config.embedded))]
            return records_from_rows(rows, config.columns, source)
        return records_from_rows(numbered_rows(embedded_file(config.embedded)), config.columns, source)
    path = Path(config.path)  # type: ignore[arg-type]
    return records_from_rows(numbered_rows(path, config.format), config.columns, str(path))


def load_text_pair_data(config: TextDataConfig, tokenizer: Any) -> TextPairData:
    """Read ``config``'s records and tokenise them with ``tokenizer`` at ``config.max_length``."""
    return TextPairData(load_text_data(config), tokenizer, config.max_length, config.label_names)


def _record_row(record: TextRecord) -> dict[str, Any]:
    """A bundled 3-class record turned back into a raw row (for re-labelling with a TextDataConfig)."""
    return {
        "id": record.id,
        "premise": record.text,
        "hypothesis": record.text_pair,
        "label": record.label_name,
        **record.extra,
    }
