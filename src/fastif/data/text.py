"""Text examples: :class:`TextRecord` s built from raw rows with a column mapping and a label scheme, and
:class:`TextPairData`, which tokenises them once (no padding) and pads each batch to its own longest example, so
it plugs into every fastif stage through the :class:`~fastif.data.Dataset` protocol.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..errors import DataError
from .base import checked_indices


@dataclass(frozen=True)
class TextColumns:
    """How raw rows map to a :class:`TextRecord`: the text column(s), label column, id column and label scheme.

    ``text_pair=None`` makes single-text records. Raw labels are names from ``label_names``, aliases from
    ``label_map`` (pairs ``(raw, name)``), or integer ids. Rows without ``id`` get their row number as id.
    ``options`` names the config options that set the columns, for error messages.
    """

    label_names: tuple[str, ...]
    text: str = "text"
    text_pair: str | None = None
    label: str = "label"
    id: str | None = "id"
    label_map: tuple[tuple[str, str], ...] = ()
    options: str = "text_column / text_pair_column / label_column"


@dataclass(frozen=True)
class TextRecord:
    """One example: its text (and optional second text), label id and name, a string id, and the row's other fields."""

    id: str
    text: str
    text_pair: str | None
    label: int
    label_name: str
    extra: Mapping[str, Any] = field(default_factory=dict)


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
    rows: Sequence[tuple[int, Mapping[str, Any]]], columns: TextColumns, source: str
) -> list[TextRecord]:
    """Build records from ``(line number, row)`` pairs using ``columns``' text columns and label scheme."""
    if not rows:
        raise DataError(f"{source}: no examples; give a file with at least one row")
    text_columns = [columns.text] + ([columns.text_pair] if columns.text_pair else [])
    first_line, first = rows[0]
    for column in [*text_columns, columns.label]:
        if column not in first:
            raise DataError(
                f"{source}, line {first_line}: no column {column!r} (columns: {sorted(first)}); "
                f"set {columns.options} to the file's names"
            )
    used = {*text_columns, columns.label, columns.id}
    aliases = dict(columns.label_map)
    records = []
    for index, (line, row) in enumerate(rows):
        where = f"{source}, line {line}"
        texts = []
        for column in text_columns:
            value = row.get(column)
            if not isinstance(value, str):
                raise DataError(f"{where}: column {column!r} must be text, got {value!r}; fix or remove the row")
            texts.append(value)
        label = _label_id(row.get(columns.label), columns.label_names, aliases, where)
        raw_id = row.get(columns.id) if columns.id else None
        records.append(
            TextRecord(
                id=str(index) if raw_id is None else str(raw_id),
                text=texts[0],
                text_pair=texts[1] if len(texts) > 1 else None,
                label=label,
                label_name=columns.label_names[label],
                extra={key: value for key, value in row.items() if key not in used},
            )
        )
    return records


def _padded(rows: list[list[int]], lengths: np.ndarray, pad: int) -> np.ndarray:
    """Token rows as one right-padded int32 array [n, longest], so a batch is a slice, not a Python loop."""
    array = np.full((len(rows), int(lengths.max(initial=0))), pad, dtype=np.int32)
    array[np.arange(array.shape[1]) < lengths[:, None]] = np.fromiter(
        (token for row in rows for token in row), dtype=np.int32, count=int(lengths.sum())
    )
    return array


def records_fingerprint(records: Sequence[TextRecord]) -> str:
    """SHA-256 over the ids, texts and labels of ``records``, in order (identifies a training set)."""
    digest = hashlib.sha256()
    for record in records:
        digest.update(json.dumps([record.id, record.text, record.text_pair, record.label]).encode())
        digest.update(b"\n")
    return digest.hexdigest()


# ---------------------------------------------------------------------------------------------- dataset


class TextPairData:
    """Tokenised (text, text_pair) pairs with labels; ``batch`` pads dynamically to the batch's longest.

    Tokenisation happens once, here (truncating the longer text first to ``max_length``), so batching is
    cheap. ``batch`` returns long tensors ``input_ids``, ``attention_mask``, ``token_type_ids`` (when the
    tokenizer makes them) and ``labels``.
    """

    def __init__(
        self,
        records: Sequence[TextRecord],
        tokenizer: Any,
        max_length: int = 128,
        label_names: Sequence[str] | None = None,
    ) -> None:
        if not records:
            raise DataError("TextPairData needs at least one record; the data set is empty")
        pairs = {record.text_pair is not None for record in records}
        if len(pairs) != 1:
            raise DataError("mixing single-text and pair records in one TextPairData; split them into two sets")
        texts = [record.text for record in records]
        pairs_text = [record.text_pair for record in records] if pairs == {True} else None
        encoded = tokenizer(texts, pairs_text, truncation=True, max_length=max_length, padding=False)
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
        records: list[TextRecord],
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
        self._lengths = np.asarray(self.lengths, dtype=np.int64)
        self._padded_ids = _padded(input_ids, self._lengths, pad_token_id)
        self._padded_types = None if token_type_ids is None else _padded(token_type_ids, self._lengths, 0)
        self._fingerprint: str | None = None

    def __len__(self) -> int:
        return len(self.records)

    def _check(self, indices: Sequence[int]) -> list[int]:
        return checked_indices(indices, len(self), "examples")

    def batch(self, indices: Sequence[int]) -> dict[str, Tensor]:
        """Collate examples ``indices`` into right-padded long tensors (width = longest example in the batch)."""
        index = np.asarray(self._check(indices), dtype=np.int64)
        lengths = self._lengths[index]
        width = int(lengths.max(initial=0))
        batch = {
            "input_ids": torch.from_numpy(self._padded_ids[index, :width].astype(np.int64)),
            "attention_mask": torch.from_numpy((np.arange(width) < lengths[:, None]).astype(np.int64)),
        }
        if self._padded_types is not None:
            batch["token_type_ids"] = torch.from_numpy(self._padded_types[index, :width].astype(np.int64))
        batch["labels"] = self.labels[torch.from_numpy(index)]
        return batch

    def fingerprint(self) -> str:
        """SHA-256 of the records and their token ids: identifies a tokenised set (e.g. for a saved kNN index).
        Computed once: the set does not change after tokenisation, and stores check it on every build and open."""
        if self._fingerprint is None:
            digest = hashlib.sha256(records_fingerprint(self.records).encode())
            digest.update(json.dumps([self.max_length, self._input_ids, self._token_type_ids]).encode())
            self._fingerprint = digest.hexdigest()
        return self._fingerprint

    def texts(self, i: int) -> str:
        """Example ``i`` as readable text: ``"text ||| text_pair"`` (or just the text of a single-text set)."""
        record = self.records[self._check([i])[0]]
        return record.text if record.text_pair is None else f"{record.text} ||| {record.text_pair}"

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
