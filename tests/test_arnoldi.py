"""Arnoldi: exact when the Krylov space runs out (H = c·I), orthonormal in float32, positive selection, short bases."""

from __future__ import annotations

import pytest
import torch
from test_solver_properties import DenseHessian

from fastif import Arnoldi
from fastif.errors import ConfigError, SolverError
from fastif.hvp import Hessian
from fastif.solvers.arnoldi import arnoldi_iteration


def _relative_error(estimate: torch.Tensor, truth: torch.Tensor) -> float:
    return float((estimate - truth).norm() / truth.norm())


@pytest.mark.parametrize(("dtype", "tolerance"), [(torch.float64, 1e-6), (torch.float32, 1e-4)])
def test_scaled_identity_with_full_rank_is_exact(dtype, tolerance):
    size = 30
    hessian = DenseHessian((2 / 7) * torch.eye(size, dtype=dtype))
    vectors = torch.randn(3, size, dtype=dtype, generator=torch.Generator().manual_seed(0))
    solver = Arnoldi(rank=size).fit(hessian)
    result = solver.solve(vectors)
    assert _relative_error(result.x, 3.5 * vectors) < tolerance
    assert result.info["eigenpairs_found"] == size
    assert result.info["breakdown_restarts"] == size - 1  # every step finds an invariant subspace
    assert result.info["relative_residual"] < tolerance


def _low_rank_plus_diagonal(dtype: torch.dtype, size: int = 40, rank: int = 5) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)
    factor = torch.randn(size, rank, generator=generator, dtype=torch.float64)
    diagonal = 1e-2 * torch.rand(size, generator=generator, dtype=torch.float64)
    return (factor @ factor.T + torch.diag(diagonal)).to(dtype)


def _low_rank_plus_constant(dtype: torch.dtype, size: int = 40, rank: int = 5) -> torch.Tensor:
    """F Fᵀ + 0.01·I: its Krylov spaces have dimension rank + 1, far below P."""
    factor = torch.randn(size, rank, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    return (factor @ factor.T + 1e-2 * torch.eye(size, dtype=torch.float64)).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("build", [_low_rank_plus_diagonal, _low_rank_plus_constant], ids=["diagonal", "constant"])
def test_basis_stays_orthonormal(dtype, build):
    matrix = build(dtype)
    basis, projected, _ = arnoldi_iteration(DenseHessian(matrix), 40, seed=0)
    eye = torch.eye(basis.shape[0], dtype=dtype)
    eps = torch.finfo(dtype).eps
    assert basis.shape[0] == 40
    assert float((basis @ basis.T - eye).abs().max()) < 100 * eps * basis.shape[0]
    assert float((basis @ matrix @ basis.T - 0.5 * (projected + projected.T)).abs().max()) < 1e3 * eps * 40


@pytest.mark.parametrize(("dtype", "tolerance"), [(torch.float64, 1e-9), (torch.float32, 1e-3)])
def test_psd_hessian_whose_krylov_space_runs_out_is_solved_without_damping(dtype, tolerance):
    matrix = _low_rank_plus_constant(dtype)
    vectors = torch.randn(2, 40, dtype=dtype, generator=torch.Generator().manual_seed(3))
    result = Arnoldi(rank=40).fit(DenseHessian(matrix)).solve(vectors)
    truth = torch.linalg.solve(matrix.double(), vectors.double().T).T
    assert result.info["breakdown_restarts"] >= 1
    assert min(result.info["eigenvalues"]) > 0
    assert _relative_error(result.x.double(), truth) < tolerance


@pytest.mark.parametrize("select", ["magnitude", "positive"])
def test_psd_low_rank_plus_diagonal_matches_dense_solve(select):
    matrix = _low_rank_plus_diagonal(torch.float64)
    vectors = torch.randn(2, 40, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    damping = 1e-3
    truth = torch.linalg.solve(matrix + damping * torch.eye(40, dtype=torch.float64), vectors.T).T
    result = Arnoldi(rank=40, damping=damping, select=select).fit(DenseHessian(matrix)).solve(vectors)
    assert _relative_error(result.x, truth) < 1e-6
    top = torch.linalg.eigvalsh(matrix).flip(0)[:5]
    assert torch.allclose(torch.tensor(result.info["eigenvalues"][:5], dtype=torch.float64), top, rtol=1e-8)


def test_positive_selection_drops_negative_eigenvalues_and_warns_when_short():
    eigenvalues = torch.tensor([5.0, 3.0, -4.0, -1.0, 2.0], dtype=torch.float64)
    basis, _ = torch.linalg.qr(torch.randn(5, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(4)))
    hessian = DenseHessian(basis @ torch.diag(eigenvalues) @ basis.T)
    with pytest.raises(SolverError, match="select='positive'"):
        Arnoldi(rank=5).fit(hessian)
    with pytest.warns(RuntimeWarning, match="kept 3 eigenpairs, fewer than rank 5.*positive"):
        solver = Arnoldi(rank=5, select="positive").fit(hessian)
    assert torch.allclose(solver.eigenvalues, torch.tensor([5.0, 3.0, 2.0], dtype=torch.float64))


def test_rank_above_the_dimension_keeps_every_eigenpair_and_warns():
    hessian = DenseHessian(torch.diag(torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)))
    vectors = torch.ones(1, 3, dtype=torch.float64)
    with pytest.warns(RuntimeWarning, match=r"kept 3 eigenpairs, fewer than rank 10.*dimensions \(P = 3\)"):
        result = Arnoldi(rank=10).fit(hessian).solve(vectors)
    assert result.info["eigenpairs_found"] == 3
    assert _relative_error(result.x, torch.tensor([[1.0, 0.5, 1 / 3]], dtype=torch.float64)) < 1e-12


def _rank_deficient(size: int = 40, rank: int = 5) -> torch.Tensor:
    """F Fᵀ: rank 5, zero on the other 35 directions (a Gauss-Newton matrix with fewer examples than parameters)."""
    factor = torch.randn(size, rank, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    return factor @ factor.T


def test_complement_is_exact_once_the_rank_covers_h_and_dropping_it_is_not():
    matrix, damping = _rank_deficient(), 0.1
    vectors = torch.randn(3, 40, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    truth = torch.linalg.solve(matrix + damping * torch.eye(40, dtype=torch.float64), vectors.T).T
    kept = Arnoldi(rank=5, iterations=12, damping=damping, complement=True).fit(DenseHessian(matrix))
    dropped = Arnoldi(rank=5, iterations=12, damping=damping).fit(DenseHessian(matrix))
    assert _relative_error(kept.solve(vectors).x, truth) < 1e-8
    assert _relative_error(dropped.solve(vectors).x, truth) > 0.5  # 35 of 40 directions of v are lost


def test_complement_needs_a_positive_damping():
    with pytest.raises(ConfigError, match="damping > 0"):
        Arnoldi(rank=5, damping=0.0, complement=True)
    with pytest.raises(ConfigError, match=r"solver\.residual"):
        Arnoldi(rank=5, residual="none")


def test_sample_residual_checks_on_the_fixed_sample_only(ridge):
    adapter, train, _, _, _ = ridge
    hessian = Hessian(adapter, train, sample_size=16)
    vectors = torch.randn(2, hessian.dim, dtype=torch.float64, generator=torch.Generator().manual_seed(8))
    full = Arnoldi(rank=10, damping=0.1).fit(hessian).solve(vectors).info
    sample = Arnoldi(rank=10, damping=0.1, residual="sample").fit(hessian).solve(vectors).info
    assert (full["residual_scope"], full["residual_examples"]) == ("full", 100)
    assert (sample["residual_scope"], sample["residual_examples"]) == ("sample", 16)
    assert full["relative_residual"] < 1e-8  # rank 10 = P: exact on the full H, which the sample's H is not
    assert sample["relative_residual"] > 1e-3
