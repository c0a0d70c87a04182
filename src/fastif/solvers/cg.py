"""CG: conjugate gradients on H + damping·I with full-data Hessian-vector products."""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from ..config import DEFAULT_DAMPING, check_number
from ..errors import SolverError
from ..hvp import Hessian

if TYPE_CHECKING:
    from .kfac import PCGConfig

from .arnoldi import smallest_ritz_value
from .base import Solver, SolveResult, check_damping, residual_info


@dataclass(frozen=True)
class CGConfig:
    """Conjugate gradients on ``H + damping·I`` with full-data HVPs; stops at relative residual ``tolerance``."""

    damping: float = DEFAULT_DAMPING
    max_iterations: int = 200
    tolerance: float = 1e-8

    def __post_init__(self) -> None:
        """Refuse a negative or non-finite damping, fewer than one iteration, a tolerance not > 0."""
        check_cg_options(self)


def check_cg_options(config: CGConfig | PCGConfig) -> None:
    """The checks CG and PCG share: damping >= 0, max_iterations >= 1, tolerance > 0, all finite."""
    check_damping(config.damping)
    check_number("solver.max_iterations", config.max_iterations, integer=True, minimum=1)
    check_number("solver.tolerance", config.tolerance, above=0)


LANCZOS_STEPS = 30
"""Lanczos steps (HVPs) spent, after CG meets non-positive curvature, to bound H's smallest eigenvalue."""


def _check_cg_residual(trace: list[float], damping: float) -> None:
    """Stop CG at once when its residual turns NaN or Inf (a NaN compares as converged and would end it silently)."""
    if not math.isfinite(trace[-1]):
        raise SolverError(
            f"CG diverged at iteration {len(trace)}: the residual is {trace[-1]}, so the Hessian-vector products are "
            f"not finite; check the model's training loss for NaN/Inf, or increase damping (now {damping})"
        )


def indefinite_error(
    name: str, hessian: Hessian, damping: float, directions: Tensor, curvatures: Tensor, iteration: int
) -> SolverError:
    """The error for a search direction d with dᵀ(H + damping·I)d <= 0: the curvature seen, a Lanczos bound on H's
    smallest eigenvalue, and the damping above which neither can be non-positive (a lower bound on what is needed)."""
    rayleigh = float((curvatures / (directions * directions).sum(dim=1)).min())
    steps = min(LANCZOS_STEPS, hessian.dim)
    lowest = min(smallest_ritz_value(hessian, steps), rayleigh - damping)
    return SolverError(
        f"{name} met non-positive curvature at iteration {iteration + 1}: dᵀ(H + damping·I)d / ‖d‖² = {rayleigh:.3g} "
        f"along a search direction, so H + damping·I is not positive definite (damping {damping:g}); with "
        f"{steps} Lanczos steps H has an eigenvalue at most {lowest:.3g}: set damping above {-lowest:.3g} (the most "
        "negative eigenvalue may be lower), or use Arnoldi(select='positive')"
    )


class CG(Solver, name="cg"):
    """Conjugate gradients, vectorised over the rows of ``vectors``; reports the residual trace."""

    config_class = CGConfig
    iterative = True

    def solve(self, vectors: Tensor) -> SolveResult:
        hessian, config = self._fitted(), self.config
        x = torch.zeros_like(vectors)
        residual = vectors.clone()
        direction = residual.clone()
        squared = (residual * residual).sum(dim=1)
        norms = vectors.norm(dim=1).clamp_min(torch.finfo(vectors.dtype).tiny)
        trace: list[float] = []
        for _ in range(config.max_iterations):
            active = squared.sqrt() / norms > config.tolerance
            if not bool(active.any()):
                break
            product = hessian.matvec(direction) + config.damping * direction
            curvature = (direction * product).sum(dim=1)
            if bool((curvature[active] <= 0).any()):
                raise indefinite_error("CG", hessian, config.damping, direction[active], curvature[active], len(trace))
            step = torch.where(active, squared / torch.where(active, curvature, 1.0), 0.0)
            x += step[:, None] * direction
            residual -= step[:, None] * product
            new_squared = (residual * residual).sum(dim=1)
            direction = (
                residual + (new_squared / squared.clamp_min(torch.finfo(vectors.dtype).tiny))[:, None] * direction
            )
            squared = new_squared
            trace.append(float((squared.sqrt() / norms).max()))
            _check_cg_residual(trace, config.damping)
        converged = bool((squared.sqrt() / norms <= config.tolerance).all())
        if not converged:
            warnings.warn(
                f"CG stopped after {config.max_iterations} iterations at relative residual {trace[-1]:.2e} > "
                f"{config.tolerance:g}; raise max_iterations or damping",
                RuntimeWarning,
                stacklevel=2,
            )
        info = {"converged": converged, "iterations": len(trace), "residual_trace": trace}
        return SolveResult(x, {**info, **residual_info(hessian, x, vectors, config.damping)})
