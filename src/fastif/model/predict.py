"""Batched prediction with a classifier that takes dict batches (``model(**inputs).logits``), in length order so
padded batches waste little work, and its accuracy / mean cross-entropy."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..data import Dataset, iter_batches, length_order


def model_inputs(batch: dict[str, Tensor]) -> dict[str, Tensor]:
    """A dict batch without its labels, ready for ``model(**inputs)``."""
    return {key: value for key, value in batch.items() if key != "labels"}


def dataset_labels(data: Dataset, batch_size: int = 256) -> Tensor:
    """Every example's label (``data.labels`` when present, else collected batch by batch)."""
    labels = getattr(data, "labels", None)
    if isinstance(labels, Tensor):
        return labels
    return torch.cat([batch["labels"] for _, batch in iter_batches(data, batch_size)])


@torch.no_grad()
def predict(model: nn.Module, data: Dataset, indices: Sequence[int] | None = None, batch_size: int = 64) -> Tensor:
    """Logits [n, C] of ``model`` (eval mode) on examples ``indices`` (default: all) of a dict-batch dataset."""
    wanted = list(range(len(data))) if indices is None else [int(i) for i in indices]
    unique = sorted(set(wanted))
    order = [unique[position] for position in length_order(data, unique)]
    was_training = model.training
    model.eval()
    rows: dict[int, Tensor] = {}
    for chunk, batch in iter_batches(data, batch_size, order):
        rows.update(zip(chunk, model(**model_inputs(batch)).logits, strict=True))
    model.train(was_training)
    return torch.stack([rows[i] for i in wanted])


def predict_logits(model: nn.Module, data: Dataset, batch_size: int = 64) -> Tensor:
    """Logits for every example of ``data`` (eval mode; batched by length to minimise padding)."""
    return predict(model, data, None, batch_size)


def evaluate_classifier(model: nn.Module, data: Dataset, batch_size: int = 64) -> dict[str, float]:
    """Accuracy and mean cross-entropy of ``model`` on ``data``."""
    logits = predict_logits(model, data, batch_size)
    labels = dataset_labels(data)
    return {
        "accuracy": float((logits.argmax(-1) == labels).float().mean()),
        "loss": float(F.cross_entropy(logits, labels)),
    }
