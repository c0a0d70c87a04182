"""Data stage: the dataset protocol and tensor data (:mod:`.base`), views (:mod:`.views`), file readers
(:mod:`.files`) and tokenised text (:mod:`.text`). ``fastif.data`` keeps the names of :mod:`.base`."""

from __future__ import annotations

from .base import (
    Batch,
    Dataset,
    TensorData,
    as_dataset,
    batch_len,
    batch_tensors,
    index_chunks,
    iter_batches,
    length_order,
    map_tensors,
)

__all__ = [
    "Batch",
    "Dataset",
    "TensorData",
    "as_dataset",
    "batch_len",
    "batch_tensors",
    "index_chunks",
    "iter_batches",
    "length_order",
    "map_tensors",
]
