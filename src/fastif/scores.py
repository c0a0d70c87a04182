"""Score stage: ``scores[i, j] = s_test_iᵀ ∇L(train_j)`` with ``s_test_i = (H + damping·I)⁻¹ ∇L(test_i)``.

Positive = helpful: upweighting training point j lowers test i's loss; removing it is predicted to raise that loss
by ``score / n``. Two exact paths give the same numbers:

* ``"grad"``: per-example gradients [B, P] of each training batch (vmap of grad), then one matrix product with all
  s_test vectors: one pass whatever the number of test points.
* ``"jvp"``: one forward-mode ``jvp`` of the training batch's loss vector along each s_test: no [B, P] matrix,
  but one pass per test point.

``"auto"`` takes ``"jvp"`` for a single s_test (it never materialises gradients) and ``"grad"`` otherwise.

Precision (kronfluence's ``per_sample_gradient_dtype`` / ``score_dtype``): ``ScoreConfig(grad_dtype=...)`` rounds
each per-example gradient block to that dtype as soon as it is formed (bfloat16 or float16 halve its memory), and
``score_dtype`` is the dtype the dot products with s_test accumulate in (float64 for sums with cancellation).
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
from .errors import ConfigError, DataError
from .grads import directional_derivatives, per_example_grads
from .model.adapter import ModelAdapter

ScoreMethod = Literal["auto", "grad", "jvp"]
DTypeName = Literal["float16", "bfloat16", "float32", "float64"]


@dataclass(frozen=True)
class ScoreConfig:
    """How training gradients meet s_test: the path, training batch size, vmap chunk size and precision.

    ``grad_dtype`` rounds the per-example gradients to that dtype once formed; ``score_dtype`` is the dtype their
    dot products with s_test accumulate in (and the scores'); unset = the model's. Either one set makes ``"auto"``
    take the gradient path; ``"jvp"`` refuses them, its product being formed inside the model's forward pass.
    """

    method: ScoreMethod = "auto"
    batch_size: int = 64
    chunk_size: int = 32
    grad_dtype: DTypeName | None = None
    score_dtype: DTypeName | None = None

    def __post_init__(self) -> None:
        """Refuse an unknown method or dtype, sizes below 1, and dtypes on the JVP path at construction."""
        check_choice("scoring.method", self.method, typing.get_args(ScoreMethod))
        check_number("scoring.batch_size", self.batch_size, integer=True, minimum=1)
        check_number("scoring.chunk_size", self.chunk_size, integer=True, minimum=1)
        for key in ("grad_dtype", "score_dtype"):
            if getattr(self, key) is not None:
                check_choice(f"scoring.{key}", getattr(self, key), typing.get_args(DTypeName))
        if self.method == "jvp" and self.casts:
            raise ConfigError(
                "grad_dtype and score_dtype apply to per-example gradient dot products, which method='jvp' never "
                "forms; use method='grad' (or 'auto')"
            )

    @property
    def casts(self) -> bool:
        """True when a gradient or score dtype is set (the scores then run on the gradient path)."""
        return self.grad_dtype is not None or self.score_dtype is not None


def choose_method(config: ScoreConfig, num_tests: int) -> Literal["grad", "jvp"]:
    """Resolve ``"auto"``: JVP for one s_test, per-example gradients for several or when a dtype is set."""
    if config.method != "auto":
        return config.method
    return "jvp" if num_tests == 1 and not config.casts else "grad"


def score_dtype(config: ScoreConfig, s_test: Tensor) -> torch.dtype:
    """The dtype the scores accumulate in and come back in: ``config.score_dtype``, else s_test's (the model's)."""
    return s_test.dtype if config.score_dtype is None else getattr(torch, config.score_dtype)


def _rounded(gradients: Tensor, dtype: DTypeName | None) -> Tensor:
    """``gradients`` in ``dtype`` (unchanged if unset); ConfigError if rounding overflows it (float16's ±65,504)."""
    if dtype is None:
        return gradients
    rounded = gradients.to(getattr(torch, dtype))
    if not bool(torch.isfinite(rounded).all()) and bool(torch.isfinite(gradients).all()):
        raise ConfigError(f"per-example gradients overflow grad_dtype={dtype}; use bfloat16 or float32")
    return rounded


def batch_scores(
    adapter: ModelAdapter,
    flat: Tensor,
    s_test: Tensor,
    batch,
    method: Literal["grad", "jvp"],
    chunk_size: int = 32,
    config: ScoreConfig | None = None,
) -> Tensor:
    """Scores [k, B] of one training batch against the s_test rows [k, P] (at ``config``'s dtypes, if given)."""
    config = config or ScoreConfig()
    if method == "grad":
        gradients = _rounded(per_example_grads(adapter, flat, batch, chunk_size), config.grad_dtype)
        accumulate = score_dtype(config, s_test)
        return s_test.to(accumulate) @ gradients.to(accumulate).T
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
            scores = batch_scores(adapter, flat, s_test, batch, method, config.chunk_size, config)
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
        return torch.empty(s_test.shape[0], 0, dtype=score_dtype(config or ScoreConfig(), s_test), device=s_test.device)
    ordered = torch.cat(parts, dim=1)
    scores = torch.empty_like(ordered)
    scores[:, order] = ordered
    return scores
