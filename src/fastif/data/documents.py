"""Documents for causal language models: whole texts, or prompt + completion pairs, tokenised once and padded per
batch (on the right) into HuggingFace's ``{"input_ids", "attention_mask", "labels"}`` with -100 on the tokens that
carry no loss.

A prompt and its completion are tokenised separately and joined, so the boundary is exact: with
``loss_on="completion"`` every prompt token (and the tokenizer's leading special tokens) gets label -100, every
completion token its id. A record ``{"text": ...}`` is one document with a loss on every token.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor

from ..errors import DataError
from .base import checked_indices
from .files import numbered_jsonl

LossOn = Literal["completion", "all"]
IGNORE_INDEX = -100


def _special_frame(tokenizer: Any) -> tuple[list[int], list[int]]:
    """The special tokens the tokenizer puts before and after a text (BERT: [CLS] / [SEP]; Llama: BOS / none)."""
    bare = list(tokenizer("a", add_special_tokens=False)["input_ids"])
    framed = list(tokenizer("a", add_special_tokens=True)["input_ids"])
    at = next((i for i in range(len(framed) - len(bare) + 1) if framed[i : i + len(bare)] == bare), None)
    if not bare or at is None:
        return [], []
    return framed[:at], framed[at + len(bare) :]


def _record_parts(record: Any, where: str) -> tuple[str, str | None]:
    """``(prompt, completion)`` of a record, or ``(text, None)`` for a whole document; DataError otherwise."""
    if not isinstance(record, Mapping):
        raise DataError(f"{where}: a record must be a dict with 'text', or 'prompt' and 'completion'")
    keys = [key for key in ("text", "prompt", "completion") if key in record]
    if keys == ["text"]:
        parts: tuple[Any, Any] = (record["text"], None)
    elif keys == ["prompt", "completion"]:
        parts = (record["prompt"], record["completion"])
    else:
        raise DataError(f"{where}: give either 'text' or both 'prompt' and 'completion', got keys {sorted(record)}")
    for key, value in zip(keys, (parts if parts[1] is not None else parts[:1]), strict=True):
        if not isinstance(value, str) or not value.strip():
            raise DataError(f"{where}: {key!r} must be non-empty text, got {value!r}")
    return parts


class LMDocuments:
    """Tokenised documents for a causal LM; ``batch`` right-pads to the batch's longest document.

    ``records``: dicts with ``text``, or ``prompt`` + ``completion`` (an optional ``id``; other keys are kept in
    :attr:`records`). ``loss_on="completion"`` puts the loss on completion tokens only (on every token of a
    ``text`` record), ``"all"`` on every token. Documents longer than ``max_length`` tokens are cut on the right; a
    completion cut away entirely is refused.
    """

    def __init__(
        self,
        tokenizer: Any,
        records: Sequence[Mapping[str, Any]],
        max_length: int = 128,
        loss_on: LossOn = "completion",
    ) -> None:
        if loss_on not in ("completion", "all"):
            raise DataError(f"loss_on must be 'completion' or 'all', got {loss_on!r}")
        if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 2:
            raise DataError(f"max_length must be a whole number of tokens >= 2, got {max_length!r}")
        if not records:
            raise DataError("LMDocuments needs at least one record; the corpus is empty")
        self.tokenizer, self.max_length, self.loss_on = tokenizer, max_length, loss_on
        self.records = [dict(record) for record in records]
        self.pad_token_id = next((i for i in (tokenizer.pad_token_id, tokenizer.eos_token_id) if i is not None), 0)
        lead, trail = _special_frame(tokenizer)
        self._ids: list[list[int]] = []
        self._starts: list[int] = []  # first position with a loss
        for number, record in enumerate(records):
            where = f"record {number}" + (
                f" (id {record['id']!r})" if isinstance(record, Mapping) and "id" in record else ""
            )
            first, completion = _record_parts(record, where)
            prompt = tokenizer(first, add_special_tokens=False)["input_ids"] if completion is not None else []
            body = tokenizer(completion if completion is not None else first, add_special_tokens=False)["input_ids"]
            ids = (lead + prompt + body + trail)[:max_length]
            start = len(lead) + len(prompt) if loss_on == "completion" else 0
            if start >= len(ids) or not body:
                raise DataError(
                    f"{where}: no completion token is left within max_length={max_length} tokens; raise max_length "
                    "or shorten the prompt"
                )
            self._ids.append(ids)
            self._starts.append(start)
        self.lengths = [len(ids) for ids in self._ids]

    @classmethod
    def from_jsonl(
        cls, path: str | Path, tokenizer: Any, max_length: int = 128, loss_on: LossOn = "completion"
    ) -> LMDocuments:
        """Documents from a JSON Lines file (plain or gzip'd) of ``text`` or ``prompt`` + ``completion`` objects."""
        path = Path(path)
        rows = list(numbered_jsonl(path))
        if not rows:
            raise DataError(f"{path}: no documents; give a JSONL file with one object per line")
        for number, row in rows:
            _record_parts(row, f"{path}, line {number}")
        return cls(tokenizer, [row for _, row in rows], max_length, loss_on)

    def __len__(self) -> int:
        return len(self._ids)

    def _check(self, indices: Sequence[int]) -> list[int]:
        return checked_indices(indices, len(self), "documents")

    def batch(self, indices: Sequence[int]) -> dict[str, Tensor]:
        """Right-padded ``input_ids``, ``attention_mask`` and ``labels`` (-100 on prompt tokens and padding)."""
        index = self._check(indices)
        width = max((self.lengths[i] for i in index), default=0)
        input_ids = torch.full((len(index), width), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(index), width), dtype=torch.long)
        labels = torch.full((len(index), width), IGNORE_INDEX, dtype=torch.long)
        for row, i in enumerate(index):
            ids = torch.tensor(self._ids[i], dtype=torch.long)
            input_ids[row, : len(ids)] = ids
            attention_mask[row, : len(ids)] = 1
            labels[row, self._starts[i] : len(ids)] = ids[self._starts[i] :]
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}

    def token_ids(self, i: int) -> list[int]:
        """Document ``i``'s token ids (special tokens included)."""
        return list(self._ids[self._check([i])[0]])

    def loss_start(self, i: int) -> int:
        """The first position of document ``i`` whose token carries a loss (0 when every token does)."""
        return self._starts[self._check([i])[0]]

    def tokens(self, i: int) -> list[str]:
        """Document ``i``'s tokens as text pieces, one per position (for showing which span drove a score)."""
        return [self.tokenizer.decode([token]) for token in self.token_ids(i)]

    def texts(self, i: int) -> str:
        """Document ``i`` as readable text: its text, or ``"prompt ||| completion"``."""
        record = self.records[self._check([i])[0]]
        return record["text"] if "text" in record else f"{record['prompt']} ||| {record['completion']}"

    def fingerprint(self) -> str:
        """SHA-256 of the token ids, loss starts and settings: identifies a tokenised corpus (e.g. for a store)."""
        digest = hashlib.sha256(json.dumps([self.max_length, self.loss_on, self._starts]).encode())
        digest.update(json.dumps(self._ids).encode())
        return digest.hexdigest()

    def subset(self, indices: Sequence[int]) -> LMDocuments:
        """A corpus of documents ``indices``, in that order, reusing the tokenisation."""
        index = self._check(indices)
        if not index:
            raise DataError("a subset needs at least one index")
        subset = object.__new__(LMDocuments)
        subset.tokenizer, subset.max_length, subset.loss_on = self.tokenizer, self.max_length, self.loss_on
        subset.pad_token_id = self.pad_token_id
        subset.records = [self.records[i] for i in index]
        subset._ids = [self._ids[i] for i in index]
        subset._starts = [self._starts[i] for i in index]
        subset.lengths = [self.lengths[i] for i in index]
        return subset
