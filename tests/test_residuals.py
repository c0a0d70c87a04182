"""Every solver reports its relative residual ‖(H + damping·I)s − v‖ / ‖v‖, on the Hessian's fixed sample."""

from __future__ import annotations

import pytest
import torch

from fastif import CG, Arnoldi, Exact, Hessian, LiSSA


def _closed_form_residuals(x: torch.Tensor, l2: float, damping: float, s: torch.Tensor, v: torch.Tensor) -> list[float]:
    shifted = x.T @ x / x.shape[0] + (l2 + damping) * torch.eye(x.shape[1], dtype=x.dtype)
    return ((s @ shifted - v).norm(dim=1) / v.norm(dim=1)).tolist()


@pytest.mark.filterwarnings("ignore:CG stopped")
@pytest.mark.parametrize(
    "solver",
    [Exact(damping=0.1), CG(damping=0.1, max_iterations=3), Arnoldi(rank=3, damping=0.1), LiSSA(damping=0.1)],
    ids=["exact", "cg", "arnoldi", "lissa"],
)
def test_reported_residual_is_the_closed_form_one(ridge, solver):
    adapter, train, _, x, l2 = ridge
    vectors = torch.randn(2, adapter.num_params, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    result = solver.fit(Hessian(adapter, train)).solve(vectors)
    truth = _closed_form_residuals(x, l2, 0.1, result.x, vectors)
    assert result.info["residual_examples"] == 100
    assert result.info["relative_residuals"] == pytest.approx(truth, rel=1e-9, abs=1e-12)
    assert result.info["relative_residual"] == pytest.approx(max(truth), rel=1e-9, abs=1e-12)


@pytest.mark.filterwarnings("ignore:CG stopped")
def test_large_sets_measure_on_a_fixed_seeded_subsample(ridge):
    adapter, train, _, x, l2 = ridge
    hessian = Hessian(adapter, train, sample_size=30, sample_seed=7)
    assert hessian.sample == Hessian(adapter, train, sample_size=30, sample_seed=7).sample
    assert len(set(hessian.sample)) == 30
    vectors = torch.randn(1, adapter.num_params, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    result = CG(max_iterations=2).fit(hessian).solve(vectors)
    sampled = x[torch.tensor(hessian.sample)]
    assert result.info["residual_examples"] == 30
    assert result.info["relative_residual"] == pytest.approx(
        _closed_form_residuals(sampled, l2, 0.0, result.x, vectors)[0], rel=1e-9
    )
    assert result.info["relative_residual"] != pytest.approx(_closed_form_residuals(x, l2, 0.0, result.x, vectors)[0])


def test_small_sets_measure_on_every_example(ridge):
    adapter, train, *_ = ridge
    assert Hessian(adapter, train, sample_size=100).sample == list(range(100))
    assert Hessian(adapter, train).sample_examples == 100
