"""Gradient-store retrieval through the facade: rerank = full scan on the candidates, and a recall you can see."""

from __future__ import annotations

from unittest import mock

import pytest
import torch
from test_frozen import TokenData, _adapter
from torch import nn

from fastif import CG, Arnoldi, Exact, Influence, TensorData, TorchAdapter
from fastif.errors import DataError
from fastif.gradient_store import GradientStoreConfig
from fastif.projection import ProjectionConfig


def test_identity_projection_on_the_frozen_path_finds_the_exact_top_k(tmp_path) -> None:
    """With a projection that keeps every coordinate, retrieval + rerank returns the full scan's top-k, the reranked
    scores equal the full scan's on those candidates, and the recall estimate says so."""
    adapter = _adapter("bert", 1)
    train, test = TokenData(40, 21), TokenData(2, 22)
    influence = Influence(adapter, train, Exact(damping=100.0), frozen="on")
    projection = ProjectionConfig(kind="identity", dim=adapter.num_params)
    report = influence.build_gradient_store(tmp_path / "grads", GradientStoreConfig(projection, "float32", 16))
    assert report.num_shards == 3 and report.dim == adapter.num_params
    full = influence.candidate_scores(test)
    retrieved = influence.candidate_scores(test, num_candidates=12, method="gradients", recall_k=3)
    for row in range(2):
        exact = full.scores[row, retrieved.indices[row]]
        torch.testing.assert_close(retrieved.scores[row], exact, rtol=1e-6, atol=1e-9 * float(exact.abs().max()))
    top_full, top_retrieved = full.top_k(3), retrieved.top_k(3)
    assert torch.equal(top_full.helpful_indices, top_retrieved.helpful_indices)
    assert torch.equal(top_full.harmful_indices, top_retrieved.harmful_indices)
    assert retrieved.recall is not None
    assert all(row[side].estimate >= 0.95 for row in retrieved.recall for side in ("helpful", "harmful"))


def _logistic(n: int = 600, d: int = 30, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=generator, dtype=torch.float64)
    y = (x @ torch.randn(d, generator=generator, dtype=torch.float64) > 0).long()
    model = nn.Linear(d, 2).double()
    torch.manual_seed(seed)
    return TorchAdapter(model, nn.CrossEntropyLoss(reduction="none")), TensorData((x, y))


def test_compressed_store_recall_estimate_tracks_the_measured_recall(tmp_path) -> None:
    """A JL store of 24 dimensions for 62 parameters: the recall estimate of the exact top-10 is within 0.1 of the
    recall measured against a full scan, on average over the test points and both sides."""
    adapter, data = _logistic()
    train, test = data.subset(range(500)), data.subset(range(500, 520))
    influence = Influence(adapter, train, CG(damping=1e-2))
    config = GradientStoreConfig(ProjectionConfig(kind="gaussian", dim=24, seed=1), dtype="float32")
    influence.build_gradient_store(tmp_path / "grads", config)
    full = influence.candidate_scores(test).top_k(10)
    retrieved = influence.candidate_scores(test, num_candidates=60, method="gradients", recall_k=10)
    measured, estimated = [], []
    for row in range(20):
        for side, truth in (("helpful", full.helpful_indices[row]), ("harmful", full.harmful_indices[row])):
            found = set(retrieved.indices[row].tolist())
            measured.append(sum(int(i) in found for i in truth) / 10)
            estimated.append(retrieved.recall[row][side].estimate)
    mean_measured, mean_estimated = sum(measured) / len(measured), sum(estimated) / len(estimated)
    assert abs(mean_measured - mean_estimated) <= 0.1, (mean_measured, mean_estimated)


def test_gradient_method_needs_a_store_and_a_count() -> None:
    adapter, data = _logistic(n=50)
    influence = Influence(adapter, data, CG(damping=1e-2))
    with pytest.raises(DataError, match="build_gradient_store"):
        influence.candidate_scores(data.subset([0]), num_candidates=10, method="gradients")
    with pytest.raises(DataError, match="needs num_candidates"):
        influence.candidate_scores(data.subset([0]), method="features")
    with pytest.raises(DataError, match="method must be"):
        influence.candidate_scores(data.subset([0]), num_candidates=10, method="bm25")  # type: ignore[arg-type]


def test_a_second_solver_shares_the_training_pass_and_is_fitted_once(tmp_path) -> None:
    """use_solver swaps CG for an Arnoldi inverse that covers all of H (rank = P, complement kept): retrieval with
    it gives CG's scores, and switching back and forth fits neither solver again."""
    adapter, data = _logistic(n=200, d=8)
    train, test = data.subset(range(180)), data.subset(range(180, 183))
    influence = Influence(adapter, train, CG(damping=1e-2, tolerance=1e-12))
    influence.build_gradient_store(tmp_path / "grads", GradientStoreConfig(ProjectionConfig(kind="identity")))
    accurate = influence.candidate_scores(test, num_candidates=20, method="gradients")
    cg = influence.solver
    fast = Arnoldi(damping=1e-2, rank=adapter.num_params, complement=True)
    with (
        mock.patch.object(Arnoldi, "fit", autospec=True, side_effect=Arnoldi.fit) as arnoldi_fit,
        mock.patch.object(CG, "fit", autospec=True, side_effect=CG.fit) as cg_fit,
    ):
        quick = influence.use_solver(fast).candidate_scores(test, num_candidates=20, method="gradients")
        influence.use_solver(cg).candidate_scores(test, num_candidates=20, method="gradients")
        influence.use_solver(fast).candidate_scores(test, num_candidates=20, method="gradients")
    assert (arnoldi_fit.call_count, cg_fit.call_count) == (1, 0)
    assert torch.equal(quick.indices, accurate.indices)
    torch.testing.assert_close(quick.scores, accurate.scores, rtol=1e-7, atol=1e-10)
