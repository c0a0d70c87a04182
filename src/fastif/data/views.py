"""Views of a dataset that keep its optional traits (``lengths``, ``label_names``, ``texts``): a subset of its
examples, and the same examples with other labels."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from ..errors import DataError
from .base import Dataset


def example_text(data: Dataset, i: int) -> str:
    """Readable text of example ``i`` (``data.texts(i)`` when the dataset has it, else ``"example i"``)."""
    texts = getattr(data, "texts", None)
    return texts(i) if callable(texts) else f"example {i}"


class Subset:
    """A view of examples ``indices`` of ``data`` (in that order), keeping ``lengths``, ``label_names`` and
    ``texts`` when the parent has them."""

    def __init__(self, data: Dataset, indices: Sequence[int]) -> None:
        self.data, self.indices = data, [int(i) for i in indices]
        lengths = getattr(data, "lengths", None)
        self.lengths = None if lengths is None else [lengths[i] for i in self.indices]
        self.label_names = getattr(data, "label_names", None)

    def __len__(self) -> int:
        return len(self.indices)

    def batch(self, indices: Sequence[int]) -> Any:
        """The parent's batch of the mapped indices."""
        return self.data.batch([self.indices[int(i)] for i in indices])

    def texts(self, i: int) -> str:
        """The parent's text of example ``i`` of this view."""
        return example_text(self.data, self.indices[i])


class Relabelled:
    """``data`` with every label replaced by ``labels[i]`` (e.g. a model's predictions instead of gold labels)."""

    def __init__(self, data: Dataset, labels: Tensor) -> None:
        if len(labels) != len(data):
            raise DataError(f"need one label per example: {len(labels)} labels for {len(data)} examples")
        self.data, self.labels = data, torch.as_tensor(labels, dtype=torch.long)
        self.lengths = getattr(data, "lengths", None)
        self.label_names = getattr(data, "label_names", None)

    def __len__(self) -> int:
        return len(self.data)

    def batch(self, indices: Sequence[int]) -> Any:
        """The parent's batch with its ``labels`` swapped for the replacement labels."""
        batch = dict(self.data.batch(indices))
        batch["labels"] = self.labels[[int(i) for i in indices]]
        return batch

    def texts(self, i: int) -> str:
        """The parent's text of example ``i``."""
        return example_text(self.data, i)
