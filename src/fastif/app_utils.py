"""Helpers shared by the applications (simulatability, the influence graph): batched predictions and kNN features
computed in length-sorted order (dynamic padding then wastes little), labels of any dataset, and machine load."""

from __future__ import annotations

import os
import platform
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from .candidates import MANIFEST_FILE, CandidateConfig, CandidateIndex
from .data import Dataset, iter_batches
from .errors import DataError
from .scores import score_matrix


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


def example_text(data: Dataset, i: int) -> str:
    """Readable text of example ``i`` (``data.texts(i)`` when the dataset has it, else ``"example i"``)."""
    texts = getattr(data, "texts", None)
    return texts(i) if callable(texts) else f"example {i}"


def length_order(data: Dataset, indices: Sequence[int] | None = None) -> list[int]:
    """``indices`` (default: all) sorted by example length when ``data`` has ``lengths``, else unchanged."""
    order = list(range(len(data))) if indices is None else [int(i) for i in indices]
    lengths = getattr(data, "lengths", None)
    return sorted(order, key=lambda i: lengths[i]) if lengths is not None else order


def model_inputs(batch: dict[str, Tensor]) -> dict[str, Tensor]:
    """A dict batch without its labels, ready for ``model(**inputs)``."""
    return {key: value for key, value in batch.items() if key != "labels"}


@torch.no_grad()
def predict(model: nn.Module, data: Dataset, indices: Sequence[int] | None = None, batch_size: int = 64) -> Tensor:
    """Logits [n, C] of ``model`` (eval mode) on examples ``indices`` of a dict-batch dataset, in that order."""
    wanted = list(range(len(data))) if indices is None else [int(i) for i in indices]
    was_training = model.training
    model.eval()
    rows: dict[int, Tensor] = {}
    for chunk, batch in iter_batches(data, batch_size, length_order(data, sorted(set(wanted)))):
        rows.update(zip(chunk, model(**model_inputs(batch)).logits, strict=True))
    model.train(was_training)
    return torch.stack([rows[i] for i in wanted])


def dataset_labels(data: Dataset, batch_size: int = 256) -> Tensor:
    """Every example's label (``data.labels`` when present, else collected batch by batch)."""
    labels = getattr(data, "labels", None)
    if isinstance(labels, Tensor):
        return labels
    return torch.cat([batch["labels"] for _, batch in iter_batches(data, batch_size)])


@torch.no_grad()
def length_sorted_features(adapter: Any, data: Dataset, batch_size: int = 64) -> Tensor:
    """The adapter's kNN features [N, d] of every example, computed in length-sorted batches (row i = example i)."""
    order = length_order(data)
    rows: list[Tensor] = []
    for _, batch in iter_batches(data, batch_size, order):
        rows.append(adapter.features(adapter.to_device(batch)).detach().cpu().float())
    features = torch.cat(rows)
    result = torch.empty_like(features)
    result[torch.as_tensor(order)] = features
    return result


def build_candidate_index(
    adapter: Any, data: Dataset, config: CandidateConfig | None = None, batch_size: int = 64
) -> CandidateIndex:
    """A FAISS kNN index over the training features, built from length-sorted batches (same result, less padding)."""
    return CandidateIndex.build(length_sorted_features(adapter, data, batch_size), config)


def index_cache_folder(model_path: str | os.PathLike[str], n_train: int) -> Path:
    """Where the kNN index of a cached trained model over its first ``n_train`` training points is kept."""
    path = Path(model_path)
    return path.parent.parent / "indexes" / f"{path.name}_n{n_train}"


def cached_candidate_index(
    adapter: Any, data: Dataset, folder: str | os.PathLike[str] | None, batch_size: int = 64
) -> CandidateIndex:
    """The kNN index saved in ``folder`` when it holds one for ``len(data)`` points, else built and saved there.

    Key ``folder`` by model and training set (e.g. the trained model's fingerprint): the features depend on both.
    ``folder=None`` builds without caching.
    """
    if folder is not None and (Path(folder) / MANIFEST_FILE).is_file():
        index = CandidateIndex.load(folder)
        if index.n == len(data):
            return index
    index = build_candidate_index(adapter, data, batch_size=batch_size)
    if folder is not None:
        index.save(folder)
    return index


def candidate_scores(influence: Any, data: Dataset, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Each test point's k nearest training points and their influence scores: ``([n, k] ints, [n, k] floats)``.

    One s_test solve for all test points; each point's candidates are scored in length-sorted batches (little
    padding) and returned in nearest-first order. ``influence`` is a :class:`~fastif.influence.Influence`.
    """
    neighbours = influence.nearest(data, k)
    s_test = influence.s_test(data)
    rows = []
    for i, row in enumerate(neighbours.tolist()):
        order = length_order(influence.train, row)
        values = (
            score_matrix(
                influence.adapter, influence.flat, s_test[i : i + 1], influence.train, order, influence.score_config
            )[0]
            .detach()
            .double()
            .cpu()
            .numpy()
        )
        lookup = dict(zip(order, values.tolist(), strict=True))
        rows.append([lookup[j] for j in row])
    return neighbours.numpy().astype(np.int64), np.asarray(rows, dtype=np.float64)


def machine_info() -> dict[str, Any]:
    """Load average, core count and torch threads: the context that timings on shared machines need."""
    return {
        "loadavg_1_5_15": list(os.getloadavg()),
        "cpu_count": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
    }
