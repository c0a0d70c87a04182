"""Recall estimates: within ±0.05 of the measured recall on a synthetic JL retrieval, a warning at tiny K."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fastif.errors import DataError
from fastif.projection import DenseProjection, ProjectionConfig
from fastif.recall import _calibrate, _recall_per_draw, estimate_recall


@pytest.fixture(scope="module")
def retrieval():
    """2,000 low-rank-plus-noise gradients (P = 1,000) with lognormal norms, JL-projected to d = 64, and 15 queries:
    (exact scores [15, N], approximate scores [15, N], projected norms [N])."""
    generator = torch.Generator().manual_seed(0)
    n, p, rank = 2000, 1000, 10
    basis = torch.randn(rank, p, generator=generator, dtype=torch.float64)
    spread = torch.exp(0.7 * torch.randn(n, 1, generator=generator, dtype=torch.float64))
    grads = torch.randn(n, rank, generator=generator, dtype=torch.float64) * spread @ basis
    grads += 0.5 * torch.randn(n, p, generator=generator, dtype=torch.float64)
    queries = torch.randn(15, rank, generator=generator, dtype=torch.float64) @ basis
    queries += torch.randn(15, p, generator=generator, dtype=torch.float64)
    projection = DenseProjection(["w"], [p], ProjectionConfig(kind="rademacher", dim=64, seed=0))
    projected = projection.project_flat(grads)
    approx = projection.project_flat(queries) @ projected.T
    return (queries @ grads.T).numpy(), approx.numpy(), projected.norm(dim=1).numpy()


def _run(retrieval, candidates: int, k: int = 10):
    """Mean estimated and measured recall@k over the queries, both sides; and the estimates."""
    exact, approx, norms = retrieval
    estimates, measured = [], []
    for row in range(exact.shape[0]):
        for sign in (1.0, -1.0):
            chosen = np.argsort(-sign * approx[row])[:candidates]
            truth = np.argsort(-sign * exact[row])[:k]
            result = estimate_recall(approx[row], chosen, exact[row, chosen], k, scale=norms, largest=sign > 0)
            estimates.append(result)
            measured.append(len(set(truth) & set(chosen)) / k)
    return float(np.mean([e.estimate for e in estimates])), float(np.mean(measured)), estimates


@pytest.mark.parametrize("candidates", [15, 40])
def test_estimate_is_within_005_of_the_measured_recall(retrieval, candidates):
    estimate, measured, results = _run(retrieval, candidates)
    assert 0.5 < measured < 1.0  # the case is neither trivial nor hopeless
    assert abs(estimate - measured) <= 0.05
    assert all(r.lower <= r.estimate <= r.upper for r in results)


def test_warns_at_tiny_k_and_suggests_a_larger_one(retrieval):
    _, _, small = _run(retrieval, 10)
    warned = [r for r in small if r.warning is not None]
    assert len(warned) > len(small) / 2
    assert all("too few" in r.warning and r.suggested_k > 10 for r in warned)
    _, _, large = _run(retrieval, 200)
    assert sum(r.warning is not None for r in large) < len(large) / 4


def test_refuses_bad_inputs():
    approx = np.arange(10.0)
    with pytest.raises(DataError, match="cannot hold"):
        estimate_recall(approx, np.array([9, 8]), np.array([1.0, 2.0]), 5)
    with pytest.raises(DataError, match="unique"):
        estimate_recall(approx, np.array([9, 9, 8]), np.ones(3), 2)
    with pytest.raises(DataError, match="needs 3"):
        estimate_recall(approx, np.array([9, 8, 7]), np.ones(2), 2)


def test_a_falling_candidate_fit_does_not_collapse_the_estimate():
    """Candidates whose exact scores fall as the approximate ones rise (β < 0 free) fall back to slope 1, and the
    estimate stays strictly between 0 and 1 instead of calling every non-candidate certain to win or lose."""
    rng = np.random.default_rng(0)
    approx = rng.standard_normal(2000)
    candidates = np.argsort(-approx)[:40]
    exact = 3.0 - 0.5 * (approx[candidates] - approx[candidates].mean()) + 0.05 * rng.standard_normal(40)
    fitted, sigma = _calibrate(approx, candidates, exact, np.ones(2000))
    slope = (fitted[1] - fitted[0]) / (approx[1] - approx[0])
    assert slope == pytest.approx(1.0)
    assert sigma > 0
    result = estimate_recall(approx, candidates, exact, 10)
    assert 0.0 <= result.lower <= result.estimate <= result.upper <= 1.0
    assert result.lower < result.upper


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 6), st.integers(0, 2**31 - 1))
def test_sparse_draw_counting_equals_the_dense_pooled_top_k(k, seed):
    """Counting only the scores that beat τ gives the per-draw recall of ranking every pooled score (a loop)."""
    rng = np.random.default_rng(seed)
    draws, m = 9, int(rng.integers(0, 12))
    top = np.sort(rng.normal(size=k))[::-1]
    simulated = rng.normal(size=(draws, m)).round(1)  # rounding makes ties
    ranked = [sorted([(-v, 0) for v in row] + [(-t, 1) for t in top])[:k] for row in simulated]  # ties: simulated first
    dense = np.array([1.0 - sum(is_candidate == 0 for _, is_candidate in best) / k for best in ranked])
    draw, point = np.nonzero(simulated >= top[-1])
    sparse = _recall_per_draw(top, [(draw, simulated[draw, point])], k, draws)
    np.testing.assert_allclose(sparse, dense, rtol=0, atol=1e-12)
