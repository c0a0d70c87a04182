"""The facade: influence of training examples on test examples in a few lines.

    >>> inf = Influence(adapter, train, solver=CG(damping=1e-3))
    >>> scores = inf.scores(test)            # [n_test, n_train]; positive = helpful
    >>> top = inf.top_k(test, k=10)          # most helpful and most harmful training points per test point

``scores[i, j] = ∇L(test_i)ᵀ (H + damping·I)⁻¹ ∇L(train_j)``, with H the Hessian of the training objective (mean
training loss + L2 term). Positive = helpful: upweighting training point j lowers test i's loss, and removing it
is predicted to raise that loss by ``scores[i, j] / n``. This is the negative of Koh & Liang's ``I_up,loss``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .candidates import CandidateConfig, CandidateIndex, compute_features
from .data import Dataset, as_dataset
from .errors import DataError
from .grads import dataset_grads, mean_loss_grad
from .hvp import Hessian, HVPMethod
from .model.adapter import ModelAdapter
from .scores import ScoreConfig, score_matrix
from .solvers import CG, Solver


@dataclass
class TopK:
    """The ``k`` most helpful and most harmful training points per test point: indices into the training set."""

    helpful_indices: Tensor  # [n_test, k], highest score first
    helpful_scores: Tensor
    harmful_indices: Tensor  # [n_test, k], most negative score first
    harmful_scores: Tensor


class Influence:
    """Influence of the training set ``train`` on test examples, for the model behind ``adapter``.

    ``solver`` picks how ``H⁻¹`` is applied (default: :class:`~fastif.solvers.CG` without damping); it is fitted
    once, lazily, on the Hessian over all of ``train``. ``candidates`` configures the FAISS index over the
    adapter's features that ``top_k(..., candidates=K)`` uses to score only the K nearest training points.
    """

    def __init__(
        self,
        adapter: ModelAdapter,
        train: Any,
        solver: Solver | None = None,
        score: ScoreConfig | None = None,
        hessian_batch_size: int = 64,
        hvp_method: HVPMethod = "double-backward",
        candidates: CandidateConfig | None = None,
    ) -> None:
        self.adapter = adapter
        self.train = as_dataset(train)
        if len(self.train) == 0:
            raise DataError("the training set is empty; influence needs at least one training example")
        self.solver = solver or CG()
        self.score_config = score or ScoreConfig()
        self.flat = adapter.flat_params()
        self.hessian = Hessian(adapter, self.train, self.flat, hessian_batch_size, hvp_method)
        self.candidate_config = candidates or CandidateConfig()
        self.index: CandidateIndex | None = None
        self.last_solve: dict[str, Any] = {}
        self._fitted = False

    def fit(self) -> Influence:
        """Fit the solver on the training Hessian (runs once; later calls are free)."""
        if not self._fitted:
            self.solver.fit(self.hessian)
            self._fitted = True
        return self

    def test_grads(self, test: Any) -> Tensor:
        """Per-example loss gradients [n_test, P] of the test examples."""
        test = _non_empty(as_dataset(test), "test")
        return dataset_grads(
            self.adapter,
            self.flat,
            test,
            batch_size=self.score_config.batch_size,
            chunk_size=self.score_config.chunk_size,
        )

    def s_test(self, test: Any, group: bool = False) -> Tensor:
        """``(H + damping·I)⁻¹ ∇L`` per test example [n_test, P], or for the group's mean loss [1, P]."""
        test = _non_empty(as_dataset(test), "test")
        gradients = (
            mean_loss_grad(self.adapter, self.flat, test, self.score_config.batch_size)[None]
            if group
            else self.test_grads(test)
        )
        _check_finite(gradients, "test-loss gradient")
        result = self.fit().solver.solve(gradients)
        self.last_solve = result.info
        _check_finite(result.x, "s_test")
        return result.x

    def scores(self, test: Any, train_indices: Sequence[int] | None = None, group: bool = False) -> Tensor:
        """Scores [n_test, n] (or [1, n] with ``group``) of training points ``train_indices`` (default: all)."""
        _check_indices(train_indices, len(self.train))
        return score_matrix(
            self.adapter, self.flat, self.s_test(test, group), self.train, train_indices, self.score_config
        )

    def build_index(self, index: CandidateIndex | None = None) -> CandidateIndex:
        """The kNN index over the training features (built once; pass a saved ``index`` to reuse one)."""
        if index is not None:
            self.index = index
        if self.index is None:
            features = compute_features(self.adapter, self.train, self.score_config.batch_size)
            self.index = CandidateIndex.build(features, self.candidate_config)
        return self.index

    def nearest(self, test: Any, k: int, group: bool = False) -> Tensor:
        """Indices [n_test, k] of each test point's k nearest training points (or [1, k] for the group's mean)."""
        test = _non_empty(as_dataset(test), "test")
        features = compute_features(self.adapter, test, self.score_config.batch_size)
        index = self.build_index()
        if group:
            return torch.as_tensor(index.search_mean(features, k))[None]
        return torch.as_tensor(index.search(features, k)[1])

    def self_influence(self, indices: Sequence[int] | None = None, chunk: int | None = None) -> Tensor:
        """``∇L(z)ᵀ (H + damping·I)⁻¹ ∇L(z)`` per training point [n] (default: all): large = suspicious label.

        Solves ``chunk`` gradients at a time (default: the score batch size), so memory stays [chunk, P].
        """
        _check_indices(indices, len(self.train))
        order = list(range(len(self.train))) if indices is None else [int(i) for i in indices]
        step = self.score_config.batch_size if chunk is None else chunk
        if step < 1:
            raise DataError(f"chunk must be a positive number of training points, got {step}")
        self.fit()
        return torch.cat([self._self_influence_chunk(order[i : i + step]) for i in range(0, len(order), step)])

    def _self_influence_chunk(self, indices: list[int]) -> Tensor:
        """Self-influence of one chunk of training points: their gradients, one batched solve, row-wise dots."""
        gradients = dataset_grads(
            self.adapter, self.flat, self.train, indices, len(indices), self.score_config.chunk_size
        )
        result = self.solver.solve(gradients)
        self.last_solve = result.info
        return (gradients * result.x).sum(dim=1)

    def top_k(
        self,
        test: Any,
        k: int = 10,
        train_indices: Sequence[int] | None = None,
        group: bool = False,
        candidates: int | None = None,
    ) -> TopK:
        """The ``k`` most helpful (largest) and most harmful (most negative) training points per test point.

        With ``candidates=K`` only each test point's K nearest training points (FAISS over the adapter's features)
        are scored: FastIF's kNN speed-up. Without it, all of ``train_indices`` (default: every point) are scored.
        """
        if candidates is None:
            _check_k(k, len(self.train) if train_indices is None else len(train_indices))
            return top_k_from_scores(self.scores(test, train_indices, group), k, train_indices)
        if train_indices is not None:
            raise DataError("give either train_indices or candidates, not both")
        _check_k(candidates, len(self.train), "candidates")
        _check_k(k, candidates)
        neighbours = self.nearest(test, candidates, group)
        s_test = self.s_test(test, group)
        rows = [
            top_k_from_scores(
                score_matrix(self.adapter, self.flat, s_test[i : i + 1], self.train, row.tolist(), self.score_config),
                k,
                row.tolist(),
            )
            for i, row in enumerate(neighbours)
        ]
        return TopK(*(torch.cat([getattr(row, name) for row in rows]) for name in TopK.__dataclass_fields__))


def top_k_from_scores(scores: Tensor, k: int, train_indices: Sequence[int] | None = None) -> TopK:
    """Select the top-``k`` helpful and harmful columns of ``scores``, mapped to global training indices."""
    helpful_scores, helpful = scores.topk(k, dim=1, largest=True)
    harmful_scores, harmful = scores.topk(k, dim=1, largest=False)
    if train_indices is not None:
        mapping = torch.as_tensor(list(train_indices), dtype=torch.long, device=scores.device)
        helpful, harmful = mapping[helpful], mapping[harmful]
    return TopK(helpful, helpful_scores, harmful, harmful_scores)


def _check_finite(values: Tensor, what: str) -> None:
    """Refuse NaN/Inf in gradients or solver output, naming the rows, instead of returning meaningless scores."""
    bad = (~torch.isfinite(values)).reshape(values.shape[0], -1).any(dim=1).nonzero().flatten().tolist()
    if bad:
        raise DataError(
            f"non-finite {what} for test row(s) {bad[:10]}: the loss or its gradient is NaN/Inf there; check those "
            "inputs and labels, or the model's numerical stability (e.g. log of zero)"
        )


def _check_k(k: int, pool: int, name: str = "k") -> None:
    if not 0 < k <= pool:
        raise DataError(f"{name} must lie in [1, {pool}] (the number of training points available), got {k}")


def _non_empty(data: Dataset, role: str) -> Dataset:
    if len(data) == 0:
        raise DataError(f"the {role} set is empty; give at least one {role} example")
    return data


def _check_indices(indices: Sequence[int] | None, n: int) -> None:
    if indices is None:
        return
    if len(indices) == 0:
        raise DataError("train_indices is empty; give at least one training index (or None for all)")
    if min(indices) < 0 or max(indices) >= n:
        raise DataError(f"train_indices must lie in [0, {n - 1}] for a training set of {n} examples")
