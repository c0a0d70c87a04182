"""Data stage: the minimal dataset interface every stage consumes, and a tensor-backed implementation.

A dataset is anything with ``len(data)`` and ``data.batch(indices)`` returning a *batch*: a tensor, or a
tuple/list/dict of tensors (nested), whose leading dimension is the number of examples. Collation (padding,
tokenisation) belongs to the dataset, so the math stages never see raw records.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor

from ..errors import DataError

Batch = Any  # a tensor or a (nested) tuple/list/dict of tensors with a shared leading dimension


@runtime_checkable
class Dataset(Protocol):
    """What fastif needs of a dataset: a length and a way to collate examples by index into a batch."""

    def __len__(self) -> int: ...

    def batch(self, indices: Sequence[int]) -> Batch: ...


def map_tensors(fn: Callable[[Tensor], Tensor], batch: Batch) -> Batch:
    """Apply ``fn`` to every tensor in a (nested) batch, keeping its structure."""
    if isinstance(batch, Tensor):
        return fn(batch)
    if isinstance(batch, Mapping):
        return type(batch)({key: map_tensors(fn, value) for key, value in batch.items()})
    if isinstance(batch, tuple | list):
        return type(batch)(map_tensors(fn, value) for value in batch)
    return batch


def batch_tensors(batch: Batch) -> list[Tensor]:
    """All tensors of a (nested) batch, in a fixed order."""
    found: list[Tensor] = []
    map_tensors(lambda t: found.append(t) or t, batch)
    return found


def batch_len(batch: Batch) -> int:
    """Number of examples in a batch (the shared leading dimension)."""
    tensors = batch_tensors(batch)
    if not tensors:
        raise DataError("a batch must contain at least one tensor")
    sizes = {t.shape[0] if t.dim() else -1 for t in tensors}
    if len(sizes) != 1 or -1 in sizes:
        raise DataError(f"every tensor in a batch needs one leading (example) dimension, got {sorted(sizes)}")
    return sizes.pop()


class TensorData:
    """A dataset held as tensors (or a nested tuple/dict of them) indexed along dimension 0."""

    def __init__(self, tensors: Batch) -> None:
        self.tensors = tensors
        self._len = batch_len(tensors)

    def __len__(self) -> int:
        return self._len

    def batch(self, indices: Sequence[int]) -> Batch:
        index = torch.as_tensor(list(indices), dtype=torch.long)
        if index.numel() and (int(index.min()) < 0 or int(index.max()) >= self._len):
            raise DataError(f"indices out of range for a dataset of {self._len} examples")
        return map_tensors(lambda t: t[index], self.tensors)

    def subset(self, indices: Sequence[int]) -> TensorData:
        """A new dataset holding only ``indices``, in that order."""
        return TensorData(self.batch(indices))


def checked_indices(indices: Sequence[int], size: int, what: str) -> list[int]:
    """``indices`` as ints; DataError if one lies outside a data set of ``size`` ``what`` (e.g. "documents")."""
    index = [int(i) for i in indices]
    if any(i < 0 or i >= size for i in index):
        raise DataError(f"indices out of range for a data set of {size} {what}")
    return index


def as_dataset(data: Any) -> Dataset:
    """Accept a Dataset, or a tensor / tuple / dict of tensors (wrapped as :class:`TensorData`)."""
    if isinstance(data, Dataset) and not isinstance(data, Tensor | tuple | list | Mapping):
        return data
    if isinstance(data, Tensor | tuple | list | Mapping):
        return TensorData(data)
    raise DataError(f"cannot use {type(data).__name__} as a dataset: give a Dataset or a tuple/dict of tensors")


def iter_batches(
    data: Dataset, batch_size: int, indices: Sequence[int] | None = None
) -> Iterator[tuple[list[int], Batch]]:
    """Yield ``(indices, batch)`` over ``indices`` (default: all examples) in order, ``batch_size`` at a time."""
    order = range(len(data)) if indices is None else indices
    for chunk in index_chunks(order, batch_size):
        yield chunk, data.batch(chunk)


def length_order(data: Dataset, indices: Sequence[int]) -> list[int]:
    """Positions into ``indices``, shortest example first when ``data`` has ``lengths`` (token counts), else as
    given: padded batches of similar lengths waste less work. Stable, so equal lengths keep their order."""
    lengths = getattr(data, "lengths", None)
    if lengths is None:
        return list(range(len(indices)))
    return sorted(range(len(indices)), key=lambda position: lengths[indices[position]])


def index_chunks(indices: Sequence[int], size: int) -> Iterator[list[int]]:
    """Split ``indices`` into consecutive lists of at most ``size``."""
    if size <= 0:
        raise DataError(f"batch_size must be positive, got {size}")
    order = [int(i) for i in indices]
    for start in range(0, len(order), size):
        yield order[start : start + size]
