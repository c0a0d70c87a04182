"""Property-based checks (hypothesis): every solver solves random SPD systems (H + damping·I) x = v."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fastif import CG, Arnoldi, Exact, LiSSA


class DenseHessian:
    """A test double with the Hessian interface the solvers use, backed by an explicit SPD matrix."""

    def __init__(self, matrix: torch.Tensor) -> None:
        self.matrix = matrix
        self.flat = torch.zeros(matrix.shape[0], dtype=matrix.dtype)
        self.dim = matrix.shape[0]
        self.num_examples = 1

    def matvec(self, vectors: torch.Tensor) -> torch.Tensor:
        return vectors @ self.matrix

    def batch_matvec(self, vectors: torch.Tensor, indices) -> torch.Tensor:
        return self.matvec(vectors)

    def dense(self) -> torch.Tensor:
        return self.matrix


@st.composite
def spd_systems(draw):
    """A random SPD matrix (eigenvalues in [0.1, 10]), right-hand sides and a damping."""
    dim = draw(st.integers(2, 12))
    seed = draw(st.integers(0, 2**31 - 1))
    generator = torch.Generator().manual_seed(seed)
    basis, _ = torch.linalg.qr(torch.randn(dim, dim, generator=generator, dtype=torch.float64))
    eigenvalues = 0.1 + 9.9 * torch.rand(dim, generator=generator, dtype=torch.float64)
    matrix = basis @ torch.diag(eigenvalues) @ basis.T
    vectors = torch.randn(draw(st.integers(1, 3)), dim, generator=generator, dtype=torch.float64)
    damping = draw(st.sampled_from([0.0, 1e-3, 0.5]))
    return 0.5 * (matrix + matrix.T), vectors, damping


def _relative_residual(matrix, damping, x, vectors) -> float:
    shifted = matrix + damping * torch.eye(matrix.shape[0], dtype=matrix.dtype)
    return float((x @ shifted - vectors).norm() / vectors.norm())


@settings(max_examples=25, deadline=None)
@given(spd_systems())
def test_exact_cg_and_full_rank_arnoldi_solve_spd_systems(system):
    matrix, vectors, damping = system
    hessian = DenseHessian(matrix)
    for solver, tolerance in (
        (Exact(damping=damping), 1e-9),
        (CG(damping=damping, tolerance=1e-12, max_iterations=200), 1e-8),
        (Arnoldi(damping=damping, rank=matrix.shape[0]), 1e-6),
    ):
        result = solver.fit(hessian).solve(vectors)
        assert _relative_residual(matrix, damping, result.x, vectors) < tolerance, type(solver).__name__


@settings(max_examples=10, deadline=None)
@given(spd_systems())
def test_lissa_with_exact_hessian_steps_converges_to_the_solution(system):
    matrix, vectors, damping = system
    result = LiSSA(damping=damping, depth=4000).fit(DenseHessian(matrix)).solve(vectors)
    assert _relative_residual(matrix, damping, result.x, vectors) < 1e-4
    assert result.info["converged"]
