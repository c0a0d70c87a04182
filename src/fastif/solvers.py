"""Inverse-HVP stage: solvers for ``s = (H + damping·I)⁻¹ v``, one interface, one typed config each.

Every solver inverts the same matrix ``H + damping·I``, where ``H`` is the Hessian of the training objective
(mean loss + L2 term, see :mod:`fastif.hvp`) and ``damping`` is an absolute number:

* :class:`Exact` forms ``H`` densely and solves by eigendecomposition (small P only).
* :class:`CG` runs conjugate gradients with full-data HVPs.
* :class:`LiSSA` runs FastIF's stochastic recursion ``h_j = v + (1 - d)·h_{j-1} - H_B h_{j-1} / scale`` with
  ``d = damping / scale`` and a fresh random batch ``H_B`` of ``batch_size`` examples per step, returns
  ``h_J / scale`` averaged over ``repeats`` chains; its fixed point is ``(H + damping·I)⁻¹ v``. By default it
  picks depth and batch size to reach a relative residual of 0.05 (see :class:`LiSSAConfig`). FastIF's
  (damp, scale) correspond to ``damping = damp·scale`` (see :meth:`LiSSAConfig.from_fastif`).
* :class:`Arnoldi` (Schioppa et al. 2022) finds the top eigenpairs (λ_i, u_i) of ``H`` by Arnoldi iteration and
  returns ``Σ_i u_i u_iᵀ v / (λ_i + damping)``: the inverse restricted to that subspace.
* :class:`Identity` returns ``v`` (``H`` replaced by ``I``): gradient similarity, single-checkpoint TracIn.

Exact, CG, LiSSA and Arnoldi report ``relative_residual`` ‖(H + damping·I)s − v‖ / ‖v‖ (worst row; per row in
``relative_residuals``) in their info, measured on the Hessian's fixed sample (:meth:`Hessian.sample_matvec`:
all examples up to ``sample_size`` = 1024, else a seeded subsample of that many): one extra HVP pass per solve.
"""

from __future__ import annotations

import math
import warnings
from abc import ABC, abstractmethod
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar, Literal

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


def residual_info(hessian: Hessian, x: Tensor, vectors: Tensor, damping: float) -> dict[str, Any]:
    """Each row's relative residual ‖(H + damping·I)x − v‖ / ‖v‖ on the Hessian's fixed sample (one HVP pass).

    ``relative_residual`` is the largest; ``residual_examples`` says how many training examples the sample holds.
    """
    matvec = getattr(hessian, "sample_matvec", hessian.matvec)  # operators without a sample: their full H
    residual = matvec(x) + damping * x - vectors
    norms = vectors.norm(dim=1).clamp_min(torch.finfo(vectors.dtype).tiny)
    residuals = (residual.norm(dim=1) / norms).tolist()
    return {
        "relative_residual": max(residuals),
        "relative_residuals": residuals,
        "residual_examples": getattr(hessian, "sample_examples", hessian.num_examples),
    }


def _check_damping(damping: float) -> None:
    if not 0 <= damping < math.inf:
        raise SolverError(f"damping must be >= 0 and finite, got {damping}")


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
        hessian = self._fitted()
        x = ((vectors @ self.eigenvectors) / self.eigenvalues) @ self.eigenvectors.T
        info = {"min_eigenvalue": float(self.eigenvalues.min())}
        return SolveResult(x, {**info, **residual_info(hessian, x, vectors, self.config.damping)})


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
        if not 0 < self.config.tolerance < math.inf:
            raise SolverError(f"CG tolerance must be a finite number > 0, got {self.config.tolerance}")
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
        info = {"converged": converged, "iterations": len(trace), "residual_trace": trace}
        return SolveResult(x, {**info, **residual_info(hessian, x, vectors, config.damping)})


# ---------------------------------------------------------------------------------------------- LiSSA


FASTIF_DEPTH = 1000
"""Steps per chain of :meth:`LiSSAConfig.from_fastif` unless given (this library's long-standing default)."""


@dataclass(frozen=True)
class LiSSAConfig:
    """FastIF's stochastic recursion; ``scale=None`` picks ``scale_margin`` × the top batch-Hessian eigenvalue.

    **Automatic mode** (``depth=None``, the default): chains run in attempts of doubling depth, each warm-started
    from the last estimate, until the relative residual ‖(H + damping·I)s − v‖ / ‖v‖ on the Hessian's fixed sample
    is at most ``target_residual`` (0.05) or the next attempt would pass ``max_steps`` (steps summed over chains
    and attempts); then it warns and says so in the info. Unset options are chosen: ``batch_size`` starts at
    min(n, 32) and doubles with the depth, 2 ``repeats``, ``tail_average`` 0.5; set ones are kept as given.

    **Fixed mode** (``depth`` set): exactly the given recursion, unset options at FastIF's values (``batch_size``
    1, 1 repeat, last iterate); :meth:`from_fastif` names FastIF's literal setting. Each chain ``r`` draws its
    batches from its own seed ``(seed, r)``, so results do not depend on which worker ran which chain.
    ``tail_average`` > 0 averages the iterates of that final fraction of steps instead of taking the last one: the
    chain's stationary mean is the same fixed point, and averaging cuts the minibatch noise the last iterate keeps.
    """

    damping: float = 0.0
    scale: float | None = None
    depth: int | None = None
    repeats: int | None = None
    batch_size: int | None = None
    seed: int = 0
    scale_margin: float = 1.5
    power_iterations: int = 20
    scale_samples: int = 8
    tail_average: float | None = None
    target_residual: float = 0.05
    max_steps: int = 20_000

    @property
    def adaptive(self) -> bool:
        """True in the automatic mode (``depth`` unset): the solve picks its depth to reach ``target_residual``."""
        return self.depth is None

    @classmethod
    def from_fastif(cls, damp: float, scale: float, **options: Any) -> LiSSAConfig:
        """FastIF's literal setting: its relative ``damp`` and ``scale`` (e.g. 5e-3 and 1e4), B = 1, last iterate,
        fixed depth (default :data:`FASTIF_DEPTH`); ``options`` override any field."""
        settings = {"depth": FASTIF_DEPTH, "batch_size": 1, "repeats": 1, "tail_average": 0.0, **options}
        return cls(damping=damp * scale, scale=scale, **settings)


AUTO_BATCH, AUTO_REPEATS, AUTO_TAIL, AUTO_START_DEPTH = 32, 2, 0.5, 100
"""The automatic mode's starting batch size (capped at n), chains, tail fraction and first attempt's depth."""


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


def _check_lissa_config(config: LiSSAConfig) -> None:
    _check_damping(config.damping)
    sizes = {"depth": config.depth, "repeats": config.repeats, "batch_size": config.batch_size}
    if any(value is not None and value <= 0 for value in sizes.values()) or config.max_steps <= 0:
        raise SolverError("LiSSA depth, repeats, batch_size and max_steps must all be positive")
    if config.tail_average is not None and not 0.0 <= config.tail_average < 1.0:
        raise SolverError(f"LiSSA tail_average must lie in [0, 1), got {config.tail_average}")
    if not config.target_residual > 0:
        raise SolverError(f"LiSSA target_residual must be positive, got {config.target_residual}")


class LiSSA(Solver):
    """LiSSA with a contraction-safe automatic scale, divergence detection and per-chain norm traces.

    ``fit`` resolves the unset options (see :class:`LiSSAConfig`) into ``depth``, ``batch_size``, ``repeats`` and
    ``tail_average`` attributes; in the automatic mode ``depth`` and ``batch_size`` are the first attempt's.
    """

    config_class = LiSSAConfig

    def fit(self, hessian: Hessian) -> LiSSA:
        config = self.config
        _check_lissa_config(config)
        super().fit(hessian)
        auto = config.adaptive
        self.depth = config.depth or AUTO_START_DEPTH
        self.batch_size = config.batch_size or (min(hessian.num_examples, AUTO_BATCH) if auto else 1)
        self.repeats = config.repeats or (AUTO_REPEATS if auto else 1)
        self.tail_average = config.tail_average if config.tail_average is not None else (AUTO_TAIL if auto else 0.0)
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

    def _draw(self, rng: np.random.Generator, n: int, batch_size: int | None = None) -> list[int]:
        """One step's batch: ``batch_size`` (default: the fitted one) distinct indices below ``n``."""
        size = self.batch_size if batch_size is None else batch_size
        return rng.choice(n, size=min(size, n), replace=False).tolist()

    def run_chain(self, vectors: Tensor, repeat: int) -> tuple[Tensor, Tensor]:
        """One chain (number ``repeat``) at the fitted settings: its estimate ``h / scale`` [k, P] (last iterate or
        tail average) and its norm trace ‖h_j‖ [depth]."""
        return self._chain(vectors, repeat, self.depth, self.batch_size, None, (self.config.seed, repeat))

    def _chain(
        self, vectors: Tensor, repeat: int, depth: int, batch_size: int, start: Tensor | None, stream: tuple[int, ...]
    ) -> tuple[Tensor, Tensor]:
        """``depth`` steps at ``batch_size`` from ``h_0 = start`` (default ``v``), batches drawn from ``stream``."""
        hessian = self._fitted()
        rng = np.random.default_rng(stream)
        decay = 1.0 - self.config.damping / self.scale
        estimate = vectors.clone() if start is None else start.clone()
        averaged_steps = max(1, round(self.tail_average * depth))
        tail_sum = torch.zeros_like(vectors)
        trace = torch.empty(depth, dtype=torch.float64)
        for step in range(depth):
            product = hessian.batch_matvec(estimate, self._draw(rng, hessian.num_examples, batch_size))
            estimate = vectors + decay * estimate - product / self.scale
            trace[step] = float(estimate.norm())
            self._check_divergence(trace, step, repeat)
            if step >= depth - averaged_steps:
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
        hessian = self._fitted()
        if self.config.adaptive:
            return self._solve_adaptive(vectors)
        chains = [self.run_chain(vectors, repeat) for repeat in range(self.repeats)]
        estimate = torch.stack([chain for chain, _ in chains]).mean(dim=0)
        info = self.diagnostics(torch.stack([trace for _, trace in chains]))
        self.warn_if_unsettled(info, stacklevel=3)
        return SolveResult(estimate, {**info, **residual_info(hessian, estimate, vectors, self.config.damping)})

    def _solve_adaptive(self, vectors: Tensor) -> SolveResult:
        """Attempts of doubling depth (and batch size, if unset), warm-started, until the residual target is met."""
        hessian, config = self._fitted(), self.config
        depth, batch_size, start, steps, attempts = self.depth, self.batch_size, None, 0, []
        while True:
            stream = len(attempts)
            chains = [
                self._chain(vectors, r, depth, batch_size, start, (config.seed, r, stream)) for r in range(self.repeats)
            ]
            estimate = torch.stack([chain for chain, _ in chains]).mean(dim=0)
            steps += self.repeats * depth
            residual = residual_info(hessian, estimate, vectors, config.damping)
            attempts.append(
                {"depth": depth, "batch_size": batch_size, "relative_residual": residual["relative_residual"]}
            )
            settled = residual["relative_residual"] <= config.target_residual
            if settled or steps + 2 * self.repeats * depth > config.max_steps:
                break
            depth, start = 2 * depth, self.scale * estimate
            batch_size = batch_size if config.batch_size is not None else min(2 * batch_size, hessian.num_examples)
        info = self.diagnostics(torch.stack([trace for _, trace in chains]))
        info.update(residual, converged=settled, attempts=attempts, steps=steps, target_residual=config.target_residual)
        if not settled:
            warnings.warn(
                f"LiSSA stopped at relative residual {residual['relative_residual']:.3g} > target "
                f"{config.target_residual:g} after {steps} steps (budget max_steps={config.max_steps}; last attempt "
                f"depth {depth}, batch {batch_size}); raise max_steps or damping, or use CG",
                RuntimeWarning,
                stacklevel=3,
            )
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


ArnoldiSelect = Literal["magnitude", "positive"]


@dataclass(frozen=True)
class ArnoldiConfig:
    """Top-``rank`` eigenpairs of H from ``iterations`` Arnoldi steps (default ``min(P, 2·rank)``).

    ``select="magnitude"`` keeps the largest-|λ| eigenpairs and refuses a non-positive ``λ + damping`` among them;
    ``select="positive"`` (captum's choice) keeps the largest positive ones and drops the rest.
    """

    damping: float = 0.0
    rank: int = 20
    iterations: int | None = None
    seed: int = 0
    select: ArnoldiSelect = "magnitude"


def _orthogonalise(vector: Tensor, basis: list[Tensor]) -> tuple[Tensor, Tensor]:
    """``vector`` minus its projection on the orthonormal ``basis``, by classical Gram-Schmidt twice.

    Twice is enough (Kahan-Parlett): the result is orthogonal to working precision. Returns it and the coefficients.
    """
    stack = torch.stack(basis)
    coefficients = torch.zeros(len(basis), dtype=vector.dtype, device=vector.device)
    for _ in range(2):
        step = stack @ vector
        vector = vector - step @ stack
        coefficients += step
    return vector, coefficients


class Arnoldi(Solver):
    """Arnoldi (Lanczos) iteration with full re-orthogonalisation; inverts ``H + damping·I`` in the top subspace.

    A breakdown (the Krylov space is invariant: the new direction is below the dtype's rounding, ``100·eps`` × the
    largest ‖H q‖) restarts from a random direction orthogonal to the basis, so H = c·I with rank = P is exact.
    When fewer than ``rank`` eigenpairs can be kept (P < rank, or too few positive ones) it keeps those found,
    records ``eigenpairs_found`` in the info and warns.
    """

    config_class = ArnoldiConfig

    def fit(self, hessian: Hessian) -> Arnoldi:
        config = self.config
        _check_damping(config.damping)
        if config.rank <= 0:
            raise SolverError(f"Arnoldi rank must be positive, got {config.rank}")
        if config.select not in ("magnitude", "positive"):
            raise SolverError(f"Arnoldi select must be 'magnitude' or 'positive', got {config.select!r}")
        super().fit(hessian)
        iterations = min(hessian.dim, max(config.iterations or 2 * config.rank, config.rank))
        basis, projected, self.restarts = self._arnoldi(hessian, iterations)
        values, vectors = torch.linalg.eigh(0.5 * (projected + projected.T))
        keep = self._select(values)
        self.eigenvalues = values[keep]
        self.eigenvectors = basis.T @ vectors[:, keep]  # [P, kept]
        self._warn_if_short(basis.shape[0])
        smallest = float((self.eigenvalues + config.damping).min())
        if smallest <= 0:
            raise SolverError(
                f"H + damping·I has a non-positive eigenvalue ({smallest:.3g}) in the Arnoldi subspace; "
                f"increase damping above {config.damping - smallest:.3g}, or use select='positive'"
            )
        return self

    def _select(self, values: Tensor) -> Tensor:
        """Indices of the kept eigenvalues: largest |λ|, or largest λ above rounding (``select='positive'``)."""
        rank = self.config.rank
        if self.config.select == "magnitude":
            return values.abs().argsort(descending=True)[:rank]
        floor = 100 * torch.finfo(values.dtype).eps * float(values.abs().max())
        order = values.argsort(descending=True)
        return order[values[order] > floor][:rank]

    def _warn_if_short(self, basis_size: int) -> None:
        kept = int(self.eigenvalues.numel())
        if kept == 0:
            raise SolverError("Arnoldi found no positive eigenvalue of H; use select='magnitude' with damping")
        if kept < self.config.rank:
            reason = "positive eigenvalues" if kept < basis_size else f"dimensions (P = {self.hessian.dim})"
            warnings.warn(
                f"Arnoldi kept {kept} eigenpairs, fewer than rank {self.config.rank}: there are only {kept} "
                f"{reason}; the inverse is restricted to that subspace",
                RuntimeWarning,
                stacklevel=3,
            )

    def _arnoldi(self, hessian: Hessian, iterations: int) -> tuple[Tensor, Tensor, int]:
        """Orthonormal basis Q [m, P], the projected matrix Qᵀ H Q [m, m] and the number of breakdown restarts."""
        generator = torch.Generator().manual_seed(self.config.seed)
        like = hessian.flat
        eps = torch.finfo(like.dtype).eps

        def random_direction() -> Tensor:
            return torch.randn(hessian.dim, generator=generator, dtype=like.dtype).to(like.device)

        start = random_direction()
        basis = [start / start.norm()]
        projected = torch.zeros(iterations, iterations, dtype=like.dtype, device=like.device)
        largest, restarts = 0.0, 0
        for j in range(iterations - 1):
            product = hessian.matvec(basis[j])
            largest = max(largest, float(product.norm()))
            product, coefficients = _orthogonalise(product, basis)
            projected[: j + 1, j] = coefficients
            norm = float(product.norm())
            if norm > 100 * eps * largest:
                projected[j + 1, j] = norm
                basis.append(product / norm)
                continue
            restarts += 1  # invariant subspace found: go on from a fresh direction (the coupling stays 0)
            fresh, _ = _orthogonalise(random_direction(), basis)  # len(basis) < P, so it is not 0
            basis.append(fresh / fresh.norm())
        size = len(basis)
        last = hessian.matvec(basis[-1])
        projected[:size, size - 1] = torch.stack(basis) @ last
        return torch.stack(basis), projected[:size, :size], restarts

    def solve(self, vectors: Tensor) -> SolveResult:
        hessian = self._fitted()
        coefficients = (vectors @ self.eigenvectors) / (self.eigenvalues + self.config.damping)
        x = coefficients @ self.eigenvectors.T
        info = {
            "eigenvalues": self.eigenvalues.tolist(),
            "eigenpairs_found": int(self.eigenvalues.numel()),
            "breakdown_restarts": self.restarts,
        }
        return SolveResult(x, {**info, **residual_info(hessian, x, vectors, self.config.damping)})


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
