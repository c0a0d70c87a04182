"""Score stage: ``scores[i, j] = s_test_iᵀ ∇L(train_j)`` with ``s_test_i = (H + damping·I)⁻¹ ∇L(test_i)``.

Positive = helpful: upweighting training point j lowers test i's loss; removing it is predicted to raise that loss
by ``score / n``. Two exact paths give the same numbers:

* ``"grad"``: per-example gradients [B, P] of each training batch (vmap of grad), then one matrix product with all
  s_test vectors: one pass whatever the number of test points.
* ``"jvp"``: one forward-mode ``jvp`` of the training batch's loss vector along each s_test: no [B, P] matrix,
  but one pass per test point.

``"auto"`` takes ``"jvp"`` for a single s_test (it never materialises gradients) and ``"grad"`` otherwise.
"""

from __future__ import annotations

import typing
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from . import progress
from .config import check_choice, check_number
from .data import Dataset, iter_batches, length_order
from .errors import DataError
from .grads import directional_derivatives, per_example_grads
from .model.adapter import ModelAdapter

ScoreMethod = Literal["auto", "grad", "jvp"]


@dataclass(frozen=True)
class ScoreConfig:
    """How training gradients meet s_test: the path, training batch size, and vmap chunk size."""

    method: ScoreMethod = "auto"
    batch_size: int = 64
    chunk_size: int = 32

    def __post_init__(self) -> None:
        """Refuse an unknown method and sizes below 1 at construction."""
        check_choice("scoring.method", self.method, typing.get_args(ScoreMethod))
        check_number("scoring.batch_size", self.batch_size, integer=True, minimum=1)
        check_number("scoring.chunk_size", self.chunk_size, integer=True, minimum=1)


def choose_method(config: ScoreConfig, num_tests: int) -> Literal["grad", "jvp"]:
    """Resolve ``"auto"``: JVP for one s_test, per-example gradients for several."""
    if config.method != "auto":
        return config.method
    return "jvp" if num_tests == 1 else "grad"


def batch_scores(
    adapter: ModelAdapter, flat: Tensor, s_test: Tensor, batch, method: Literal["grad", "jvp"], chunk_size: int = 32
) -> Tensor:
    """Scores [k, B] of one training batch against the s_test rows [k, P]."""
    if method == "grad":
        return s_test @ per_example_grads(adapter, flat, batch, chunk_size).T
    return torch.stack([directional_derivatives(adapter, flat, batch, tangent) for tangent in s_test])


def iter_scores(
    adapter: ModelAdapter,
    flat: Tensor,
    s_test: Tensor,
    train: Dataset,
    indices: Sequence[int] | None = None,
    config: ScoreConfig | None = None,
) -> Iterator[tuple[list[int], Tensor]]:
    """Stream ``(train indices, scores [k, b])`` batch by batch, so memory stays bounded in the pool size."""
    config = config or ScoreConfig()
    method = choose_method(config, s_test.shape[0])
    with progress.task("scores", len(train) if indices is None else len(indices), "ex") as advance:
        for chunk, batch in iter_batches(train, config.batch_size, indices):
            scores = batch_scores(adapter, flat, s_test, batch, method, config.chunk_size)
            bad = [chunk[j] for j in (~torch.isfinite(scores)).any(dim=0).nonzero().flatten().tolist()]
            if bad:
                where = adapter.locate_nonfinite(flat, train.batch(bad[:10]))
                raise DataError(f"non-finite loss gradient for training example(s) {bad[:10]}: {where}")
            advance(len(chunk))
            yield chunk, scores


def score_matrix(
    adapter: ModelAdapter,
    flat: Tensor,
    s_test: Tensor,
    train: Dataset,
    indices: Sequence[int] | None = None,
    config: ScoreConfig | None = None,
) -> Tensor:
    """All scores [k, n] of the training examples ``indices`` (default: all) against the s_test rows, in the order
    of ``indices``; computed shortest example first when the dataset knows its lengths (less padding)."""
    positions = list(range(len(train))) if indices is None else [int(i) for i in indices]
    order = length_order(train, positions)
    parts = [scores for _, scores in iter_scores(adapter, flat, s_test, train, [positions[p] for p in order], config)]
    if not parts:
        return torch.empty(s_test.shape[0], 0, dtype=s_test.dtype, device=s_test.device)
    ordered = torch.cat(parts, dim=1)
    scores = torch.empty_like(ordered)
    scores[:, order] = ordered
    return scores
