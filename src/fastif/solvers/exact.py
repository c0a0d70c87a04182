"""Exact: the dense Hessian and its eigendecomposition (small P only)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..config import DEFAULT_DAMPING, check_number
from ..errors import SolverError
from ..hvp import Hessian
from .arnoldi import smallest_ritz_value
from .base import Solver, SolveResult, check_damping, residual_info


@dataclass(frozen=True)
class ExactConfig:
    """Dense Hessian + eigendecomposition; refuses more than ``max_params`` parameters (P² memory, P HVPs).

    Where the dense Hessian takes more than one pass of ``DENSE_COLUMNS`` products, ``lanczos_steps`` Lanczos
    steps first look for a negative eigenvalue (a proof that ``H + damping·I`` is indefinite), so an indefinite
    Hessian is refused after that many HVPs instead of P; 0 skips the check.
    """

    damping: float = DEFAULT_DAMPING
    max_params: int = 10_000
    lanczos_steps: int = 30

    def __post_init__(self) -> None:
        """Refuse a negative or non-finite damping, a parameter cap below 1 and a negative step count."""
        check_damping(self.damping)
        check_number("solver.max_params", self.max_params, integer=True, minimum=1)
        check_number("solver.lanczos_steps", self.lanczos_steps, integer=True, minimum=0)


DENSE_COLUMNS = 256
"""Hessian columns :meth:`Hessian.dense` forms per pass over the data (its default)."""


class Exact(Solver, name="exact"):
    """Forms ``H + damping·I`` densely and solves through its eigendecomposition."""

    config_class = ExactConfig

    def fit(self, hessian: Hessian) -> Exact:
        config = self.config
        if hessian.dim > config.max_params:
            gigabytes = hessian.dim**2 * hessian.flat.element_size() / 1e9
            raise SolverError(
                f"the exact solver needs a dense {hessian.dim} x {hessian.dim} Hessian (~{gigabytes:.2g} GB, built "
                f"from {hessian.dim} Hessian-vector products over the {hessian.num_examples} training examples) but "
                f"max_params is {config.max_params}; use CG, LiSSA or Arnoldi, or select fewer parameters"
            )
        super().fit(hessian)
        if config.lanczos_steps and hessian.dim > DENSE_COLUMNS:
            self._refuse_if_indefinite(hessian)
        matrix = hessian.dense() + config.damping * torch.eye(hessian.dim, dtype=hessian.flat.dtype)
        self.eigenvalues, self.eigenvectors = torch.linalg.eigh(matrix)
        smallest = float(self.eigenvalues.min())
        if smallest <= 1e-12 * max(1.0, float(self.eigenvalues.abs().max())):
            raise SolverError(
                f"H + damping·I is not positive definite (smallest eigenvalue {smallest:.3g}); "
                f"set damping above {max(0.0, -smallest) + config.damping:.3g}"
            )
        return self

    def _refuse_if_indefinite(self, hessian: Hessian) -> None:
        """Refuse at once when a few Lanczos steps already find curvature <= 0 in ``H + damping·I``."""
        steps, damping = self.config.lanczos_steps, self.config.damping
        bound = smallest_ritz_value(hessian, steps)
        if bound + damping <= 0:
            raise SolverError(
                f"H + damping·I is not positive definite: {min(steps, hessian.dim)} Lanczos steps found an eigenvalue "
                f"of H at most {bound:.3g} (damping {damping:g}), so the dense {hessian.dim} x {hessian.dim} Hessian "
                f"({hessian.dim} Hessian-vector products) was not formed; set damping above {-bound:.3g} (the most "
                "negative eigenvalue may be lower), or use Arnoldi(select='positive')"
            )

    def solve(self, vectors: Tensor) -> SolveResult:
        hessian = self._fitted()
        x = ((vectors @ self.eigenvectors) / self.eigenvalues) @ self.eigenvectors.T
        info = {"min_eigenvalue": float(self.eigenvalues.min())}
        return SolveResult(x, {**info, **residual_info(hessian, x, vectors, self.config.damping)})
