"""Exact: the dense Hessian and its eigendecomposition (small P only)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..config import DEFAULT_DAMPING, check_number
from ..errors import SolverError
from ..hvp import Hessian
from .base import Solver, SolveResult, check_damping, residual_info


@dataclass(frozen=True)
class ExactConfig:
    """Dense Hessian + eigendecomposition; refuses more than ``max_params`` parameters (P² memory)."""

    damping: float = DEFAULT_DAMPING
    max_params: int = 10_000

    def __post_init__(self) -> None:
        """Refuse a negative or non-finite damping and a parameter cap below 1."""
        check_damping(self.damping)
        check_number("solver.max_params", self.max_params, integer=True, minimum=1)


class Exact(Solver, name="exact"):
    """Forms ``H + damping·I`` densely and solves through its eigendecomposition."""

    config_class = ExactConfig

    def fit(self, hessian: Hessian) -> Exact:
        config = self.config
        if hessian.dim > config.max_params:
            gigabytes = hessian.dim**2 * hessian.flat.element_size() / 1e9
            raise SolverError(
                f"the exact solver needs a dense {hessian.dim} x {hessian.dim} Hessian (~{gigabytes:.1f} GB) but "
                f"max_params is {config.max_params}; use CG, LiSSA or Arnoldi, or select fewer parameters"
            )
        super().fit(hessian)
        matrix = hessian.dense() + config.damping * torch.eye(hessian.dim, dtype=hessian.flat.dtype)
        self.eigenvalues, self.eigenvectors = torch.linalg.eigh(matrix)
        smallest = float(self.eigenvalues.min())
        if smallest <= 1e-12 * max(1.0, float(self.eigenvalues.abs().max())):
            raise SolverError(
                f"H + damping·I is not positive definite (smallest eigenvalue {smallest:.3g}); "
                f"set damping above {max(0.0, -smallest) + config.damping:.3g}"
            )
        return self

    def solve(self, vectors: Tensor) -> SolveResult:
        hessian = self._fitted()
        x = ((vectors @ self.eigenvectors) / self.eigenvalues) @ self.eigenvectors.T
        info = {"min_eigenvalue": float(self.eigenvalues.min())}
        return SolveResult(x, {**info, **residual_info(hessian, x, vectors, self.config.damping)})
