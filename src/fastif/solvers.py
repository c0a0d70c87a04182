"""Inverse-HVP stage: solvers for ``s = (H + damping·I)⁻¹ v``, one interface, one typed config each.

Every solver inverts the same matrix ``H + damping·I``, where ``H`` is the Hessian of the training objective
(mean loss + L2 term, see :mod:`fastif.hvp`) and ``damping`` is an absolute number:

* :class:`Exact` forms ``H`` densely and solves by eigendecomposition (small P only).
* :class:`CG` runs conjugate gradients with full-data HVPs.
* :class:`LiSSA` runs FastIF's stochastic recursion ``h_j = v + (1 - d)·h_{j-1} - H_B h_{j-1} / scale`` with
  ``d = damping / scale`` and a fresh random batch ``H_B`` of ``batch_size`` examples per step, returns
  ``h_J / scale`` averaged over ``repeats`` chains; its fixed point is ``(H + damping·I)⁻¹ v``. FastIF's
  (damp, scale) correspond to ``damping = damp·scale`` (see :meth:`LiSSAConfig.from_fastif`).
* :class:`Arnoldi` (Schioppa et al. 2022) finds the top eigenpairs (λ_i, u_i) of ``H`` by Arnoldi iteration and
  returns ``Σ_i u_i u_iᵀ v / (λ_i + damping)``: the inverse restricted to that subspace.
* :class:`Identity` returns ``v`` (``H`` replaced by ``I``): gradient similarity, single-checkpoint TracIn.
"""

from __future__ import annotations

import math
import warnings
from abc import ABC, abstractmethod
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor

from .errors import SolverError
from .hvp import Hessian


@dataclass
class SolveResult:
    """Solution ``x`` [k, P] of ``(H + damping·I) x = v`` and the solver's diagnostics (convergence traces)."""

    x: Tensor
    info: dict[str, Any] = field(default_factory=dict)


class Solver(ABC):
    """An inverse-HVP solver: ``fit`` once on a Hessian, then ``solve`` any stack of vectors [k, P]."""

    config_class: ClassVar[type]

    def __init__(self, config: Any = None, **options: Any) -> None:
        if config is not None and options:
            raise TypeError("pass either a config or keyword options, not both")
        self.config = config if config is not None else self.config_class(**options)
        self.hessian: Hessian | None = None

    def fit(self, hessian: Hessian) -> Solver:
        """Prepare for solves against ``hessian`` (factorise, find eigenpairs, pick a scale); returns self."""
        self.hessian = hessian
        return self

    def _fitted(self) -> Hessian:
        if self.hessian is None:
            raise SolverError(f"{type(self).__name__} is not fitted: call .fit(hessian) first")
        return self.hessian

    @abstractmethod
    def solve(self, vectors: Tensor) -> SolveResult:
        """Return ``(H + damping·I)⁻¹ v`` for each row of ``vectors`` ([k, P])."""


def _check_damping(damping: float) -> None:
    if not damping >= 0:
        raise SolverError(f"damping must be >= 0, got {damping}")


# ---------------------------------------------------------------------------------------------- Exact


@dataclass(frozen=True)
class ExactConfig:
    """Dense Hessian + eigendecomposition; refuses more than ``max_params`` parameters (P² memory)."""

    damping: float = 0.0
    max_params: int = 10_000


class Exact(Solver):
    """Forms ``H + damping·I`` densely and solves through its eigendecomposition."""

    config_class = ExactConfig

    def fit(self, hessian: Hessian) -> Exact:
        config = self.config
        _check_damping(config.damping)
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
        self._fitted()
        coefficients = (vectors @ self.eigenvectors) / self.eigenvalues
        return SolveResult(coefficients @ self.eigenvectors.T, {"min_eigenvalue": float(self.eigenvalues.min())})


# ---------------------------------------------------------------------------------------------- CG


@dataclass(frozen=True)
class CGConfig:
    """Conjugate gradients on ``H + damping·I`` with full-data HVPs; stops at relative residual ``tolerance``."""

    damping: float = 0.0
    max_iterations: int = 200
    tolerance: float = 1e-8


def _check_cg_residual(trace: list[float], damping: float) -> None:
    """Stop CG at once when its residual turns NaN or Inf (a NaN compares as converged and would end it silently)."""
    if not math.isfinite(trace[-1]):
        raise SolverError(
            f"CG diverged at iteration {len(trace)}: the residual is {trace[-1]}, so the Hessian-vector products are "
            f"not finite; check the model's training loss for NaN/Inf, or increase damping (now {damping})"
        )


class CG(Solver):
    """Conjugate gradients, vectorised over the rows of ``vectors``; reports the residual trace."""

    config_class = CGConfig

    def fit(self, hessian: Hessian) -> CG:
        _check_damping(self.config.damping)
        if self.config.max_iterations < 1:
            raise SolverError(f"CG max_iterations must be at least 1, got {self.config.max_iterations}")
        return super().fit(hessian)  # type: ignore[return-value]

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
                raise SolverError(
                    "CG met non-positive curvature: H + damping·I is not positive definite; increase damping "
                    f"(now {config.damping})"
                )
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
        return SolveResult(x, {"converged": converged, "iterations": len(trace), "residual_trace": trace})


# ---------------------------------------------------------------------------------------------- LiSSA


@dataclass(frozen=True)
class LiSSAConfig:
    """FastIF's stochastic recursion; ``scale=None`` picks ``scale_margin`` × the top batch-Hessian eigenvalue.

    ``batch_size=1`` with many ``repeats`` is FastIF's fast s_test; each chain ``r`` draws its batches from its own
    seed ``(seed, r)``, so results do not depend on which worker ran which chain. ``tail_average`` > 0 averages the
    iterates of that final fraction of steps instead of taking the last one (FastIF: 0): the chain's stationary
    mean is the same fixed point, and averaging cuts the minibatch noise that the last iterate keeps.
    """

    damping: float = 0.0
    scale: float | None = None
    depth: int = 1000
    repeats: int = 1
    batch_size: int = 1
    seed: int = 0
    scale_margin: float = 1.5
    power_iterations: int = 20
    scale_samples: int = 8
    tail_average: float = 0.0

    @classmethod
    def from_fastif(cls, damp: float, scale: float, **options: Any) -> LiSSAConfig:
        """Translate FastIF's relative ``damp`` and ``scale`` (e.g. 5e-3 and 1e4) into this config."""
        return cls(damping=damp * scale, scale=scale, **options)


def _power_iteration(matvec, dim: int, iterations: int, generator: torch.Generator, like: Tensor) -> float:
    """Largest-magnitude eigenvalue estimate of a symmetric operator by power iteration."""
    vector = torch.randn(dim, generator=generator, dtype=like.dtype).to(like.device)
    vector /= vector.norm()
    estimate = 0.0
    for _ in range(iterations):
        product = matvec(vector)
        estimate = float(vector @ product)
        norm = product.norm()
        if not torch.isfinite(norm) or norm == 0:
            break
        vector = product / norm
    return abs(estimate)


class LiSSA(Solver):
    """LiSSA with a contraction-safe automatic scale, divergence detection and per-chain norm traces."""

    config_class = LiSSAConfig

    def fit(self, hessian: Hessian) -> LiSSA:
        config = self.config
        _check_damping(config.damping)
        if config.depth <= 0 or config.repeats <= 0 or config.batch_size <= 0:
            raise SolverError("LiSSA depth, repeats and batch_size must all be positive")
        if not 0.0 <= config.tail_average < 1.0:
            raise SolverError(f"LiSSA tail_average must lie in [0, 1), got {config.tail_average}")
        super().fit(hessian)
        self.top_eigenvalue: float | None = None
        if config.scale is None:
            self.top_eigenvalue = self._estimate_top_eigenvalue(hessian)
            self.scale = max(config.scale_margin * (self.top_eigenvalue + config.damping), 1e-12)
        else:
            if config.scale <= 0:
                raise SolverError(f"LiSSA scale must be positive, got {config.scale}")
            self.scale = config.scale
        return self

    def _estimate_top_eigenvalue(self, hessian: Hessian) -> float:
        """Max over a few random batches of the batch Hessian's top eigenvalue: what the recursion must contract."""
        generator = torch.Generator().manual_seed(self.config.seed)
        rng = np.random.default_rng((self.config.seed, 2**31))
        estimates = []
        for _ in range(self.config.scale_samples):
            indices = self._draw(rng, hessian.num_examples)
            estimates.append(
                _power_iteration(
                    lambda v, i=indices: hessian.batch_matvec(v, i),
                    hessian.dim,
                    self.config.power_iterations,
                    generator,
                    hessian.flat,
                )
            )
        return max(estimates)

    def _draw(self, rng: np.random.Generator, n: int) -> list[int]:
        return rng.choice(n, size=min(self.config.batch_size, n), replace=False).tolist()

    def run_chain(self, vectors: Tensor, repeat: int) -> tuple[Tensor, Tensor]:
        """One chain (number ``repeat``): its estimate ``h_J / scale`` [k, P] and its norm trace ‖h_j‖ [depth]."""
        hessian, config = self._fitted(), self.config
        rng = np.random.default_rng((config.seed, repeat))
        decay = 1.0 - config.damping / self.scale
        estimate = vectors.clone()
        averaged_steps = max(1, round(config.tail_average * config.depth))
        tail_sum = torch.zeros_like(vectors)
        trace = torch.empty(config.depth, dtype=torch.float64)
        for step in range(config.depth):
            product = hessian.batch_matvec(estimate, self._draw(rng, hessian.num_examples))
            estimate = vectors + decay * estimate - product / self.scale
            trace[step] = float(estimate.norm())
            self._check_divergence(trace, step, repeat)
            if step >= config.depth - averaged_steps:
                tail_sum += estimate
        return tail_sum / (averaged_steps * self.scale), trace

    def _check_divergence(self, trace: Tensor, step: int, repeat: int) -> None:
        """Stop when ‖h‖ is non-finite or grows geometrically (three 20-step windows each ×1.5)."""
        norm = float(trace[step])
        window = 20
        growing = step >= 4 * window and all(
            trace[step - i * window] > 1.5 * trace[step - (i + 1) * window] for i in range(3)
        )
        if math.isfinite(norm) and not growing:
            return
        eigen = "" if self.top_eigenvalue is None else f"; top batch-Hessian eigenvalue ≈ {self.top_eigenvalue:.3g}"
        raise SolverError(
            f"LiSSA diverged in chain {repeat} at step {step + 1} (‖h‖ = {norm:.3g}): the recursion does not "
            f"contract. Increase scale (now {self.scale:.3g}{eigen}) or damping (now {self.config.damping:.3g}; "
            "non-convex models need damping above minus the most negative Hessian eigenvalue)"
        )

    def solve(self, vectors: Tensor) -> SolveResult:
        chains = [self.run_chain(vectors, repeat) for repeat in range(self.config.repeats)]
        estimate = torch.stack([chain for chain, _ in chains]).mean(dim=0)
        traces = torch.stack([trace for _, trace in chains])
        info = self.diagnostics(traces)
        self.warn_if_unsettled(info, stacklevel=3)
        return SolveResult(estimate, info)

    @staticmethod
    def warn_if_unsettled(info: dict[str, Any], stacklevel: int = 2) -> None:
        """Warn (RuntimeWarning) when :meth:`diagnostics` says the chains have not settled; shared with the runner."""
        if not info["converged"]:
            warnings.warn(
                f"LiSSA has not settled: ‖h‖ still grew by {max(info['late_growth']):.0%} between the third and last "
                "quarter of the chain. Raise depth; if the model is non-convex, raise damping above minus the most "
                "negative Hessian eigenvalue (a slowly diverging chain looks like this too)",
                RuntimeWarning,
                stacklevel=stacklevel,
            )

    def diagnostics(self, traces: Tensor) -> dict[str, Any]:
        """Convergence summary of the chains' norm traces [repeats, depth].

        ``late_growth`` compares the mean ‖h‖ over the last quarter of each chain with the third quarter: means
        smooth out minibatch noise, and a chain that settled shows ~0 while one still growing (too short, or
        slowly diverging on an indefinite Hessian) shows clear growth. ``converged`` = every chain below 5%.
        """
        quarter = max(1, traces.shape[1] // 4)
        last = traces[:, -quarter:].mean(dim=1)
        third = traces[:, -2 * quarter : -quarter].mean(dim=1) if traces.shape[1] >= 2 * quarter else last
        growth = ((last - third) / third.clamp_min(1e-300)).tolist()
        return {
            "scale": self.scale,
            "top_eigenvalue": self.top_eigenvalue,
            "norm_trace": traces,
            "late_growth": growth,
            "converged": all(g < 0.05 for g in growth),
        }


# ---------------------------------------------------------------------------------------------- Arnoldi


@dataclass(frozen=True)
class ArnoldiConfig:
    """Top-``rank`` eigenpairs of H from ``iterations`` Arnoldi steps (default ``min(P, 2·rank)``)."""

    damping: float = 0.0
    rank: int = 20
    iterations: int | None = None
    seed: int = 0


class Arnoldi(Solver):
    """Arnoldi iteration with full reorthogonalisation; inverts ``H + damping·I`` in the top eigen-subspace."""

    config_class = ArnoldiConfig

    def fit(self, hessian: Hessian) -> Arnoldi:
        config = self.config
        _check_damping(config.damping)
        if config.rank <= 0:
            raise SolverError(f"Arnoldi rank must be positive, got {config.rank}")
        super().fit(hessian)
        iterations = min(hessian.dim, config.iterations or 2 * config.rank)
        basis, hessenberg = self._arnoldi(hessian, max(iterations, min(config.rank, hessian.dim)))
        values, vectors = torch.linalg.eigh(0.5 * (hessenberg + hessenberg.T))
        keep = values.abs().argsort(descending=True)[: config.rank]
        self.eigenvalues = values[keep]
        self.eigenvectors = basis.T @ vectors[:, keep]  # [P, rank]
        smallest = float((self.eigenvalues + config.damping).min())
        if smallest <= 0:
            raise SolverError(
                f"H + damping·I has a non-positive eigenvalue ({smallest:.3g}) in the Arnoldi subspace; "
                f"increase damping above {config.damping - smallest:.3g}"
            )
        return self

    def _arnoldi(self, hessian: Hessian, iterations: int) -> tuple[Tensor, Tensor]:
        """Orthonormal Krylov basis Q [m, P] and the projected matrix Qᵀ H Q [m, m]."""
        generator = torch.Generator().manual_seed(self.config.seed)
        start = torch.randn(hessian.dim, generator=generator, dtype=hessian.flat.dtype).to(hessian.flat.device)
        basis = [start / start.norm()]
        projected = torch.zeros(iterations + 1, iterations, dtype=start.dtype, device=start.device)
        for j in range(iterations):
            product = hessian.matvec(basis[j])
            scale = float(product.norm())
            for _ in range(2):  # classical Gram-Schmidt twice: orthogonal to working precision
                stack = torch.stack(basis)
                coefficients = stack @ product
                product = product - coefficients @ stack
                projected[: j + 1, j] += coefficients
            norm = product.norm()
            projected[j + 1, j] = norm
            if float(norm) <= 1e-10 * max(scale, 1e-30) or j + 1 == iterations:
                size = j + 1
                return torch.stack(basis[:size]), projected[:size, :size]
            basis.append(product / norm)
        raise AssertionError("unreachable")

    def solve(self, vectors: Tensor) -> SolveResult:
        self._fitted()
        coefficients = (vectors @ self.eigenvectors) / (self.eigenvalues + self.config.damping)
        return SolveResult(coefficients @ self.eigenvectors.T, {"eigenvalues": self.eigenvalues.tolist()})


# ---------------------------------------------------------------------------------------------- Identity


@dataclass(frozen=True)
class IdentityConfig:
    """No options: ``H`` is replaced by the identity."""


class Identity(Solver):
    """Returns ``v`` unchanged: scores become gradient dot products (single-checkpoint TracIn)."""

    config_class = IdentityConfig

    def solve(self, vectors: Tensor) -> SolveResult:
        return SolveResult(vectors.clone(), {})


SOLVERS: dict[str, type[Solver]] = {"exact": Exact, "cg": CG, "lissa": LiSSA, "arnoldi": Arnoldi, "identity": Identity}


def solver_from_config(config: Any) -> Solver:
    """The solver whose config class ``config`` is an instance of."""
    for solver in SOLVERS.values():
        if isinstance(config, solver.config_class):
            return solver(config)
    raise SolverError(f"no solver takes a {type(config).__name__}")


def with_damping(config: Any, damping: float) -> Any:
    """A copy of a solver config with another damping (Identity has none)."""
    return replace(config, damping=damping) if hasattr(config, "damping") else config
