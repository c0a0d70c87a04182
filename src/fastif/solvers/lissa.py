"""LiSSA: FastIF's stochastic recursion, automatic (to a target residual) or FastIF's literal setting."""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .. import progress
from ..config import DEFAULT_DAMPING, check_number
from ..errors import SolverError
from ..hvp import Hessian
from .arnoldi import smallest_ritz_value
from .base import Solver, SolveResult, check_damping, check_seed, residual_info
from .cg import LANCZOS_STEPS
from .kfac import EKFAC, KFAC, EKFACConfig, KFACConfig, check_preconditioner

FASTIF_DEPTH = 1000
"""Steps per chain of :meth:`LiSSAConfig.from_fastif` unless given (this library's long-standing default)."""


@dataclass(frozen=True)
class LiSSAConfig:
    """FastIF's stochastic recursion; ``scale=None`` picks ``scale_margin`` × the top batch-Hessian eigenvalue.

    **Automatic mode** (``depth=None``, the default): chains run in attempts of doubling depth, each warm-started
    from the last estimate, until the relative residual ‖(H + damping·I)s − v‖ / ‖v‖ on the full H is at most
    ``target_residual`` (0.01: on the MiniLM NLI head the error against CG runs 2-5× the residual, and 0.01 keeps
    it below 0.05, ``benchmarks/results/lissa_vs_cg.json``), or the next attempt would pass ``max_steps`` (steps
    summed over chains and attempts). The full H is checked once the example-HVPs spent so far reach the set's
    size; before that the Hessian's fixed sample is, and its residual never settles a solve (on a large set it is
    another matrix). If the budget runs out first it warns and says so in the info. Unset options are chosen:
    ``batch_size`` starts at min(n, 32) and doubles with the depth, 2 ``repeats``, ``tail_average`` 0.5; set ones
    are kept as given.

    **Fixed mode** (``depth`` set): exactly the given recursion, unset options at FastIF's values (``batch_size``
    1, 1 repeat, last iterate); :meth:`from_fastif` names FastIF's literal setting. Each chain ``r`` draws its
    batches from its own seed ``(seed, r)``, so results do not depend on which worker ran which chain.
    ``tail_average`` > 0 averages the iterates of that final fraction of steps instead of taking the last one: the
    chain's stationary mean is the same fixed point, and averaging cuts the minibatch noise the last iterate keeps.

    ``LiSSA()`` is the automatic mode, and so are the pipeline's and the CLI's defaults (``SolverStageConfig``
    takes these defaults; docs/cli.md), pinned by ``tests/test_api_defaults.py``.

    ``preconditioner`` (a K-FAC or EK-FAC config, default None) runs the recursion on ``P(H + damping·I)``, with
    ``P`` that solver's approximate inverse: each step is ``x ← x + P(v − (H_B + damping·I)x) / scale``, started at
    ``x = Pv``, and ``scale`` is ``scale_margin`` × the top eigenvalue of ``P(H_B + damping·I)``. The fixed point
    is the same s_test. On the digits models it ends orders of magnitude closer to it after the same steps, but at
    small batches ``P`` also amplifies ``H_B − H``, and on the NLI head it gains nothing
    (``benchmarks/results/preconditioned.md``).
    """

    damping: float = DEFAULT_DAMPING
    scale: float | None = None
    depth: int | None = None
    repeats: int | None = None
    batch_size: int | None = None
    seed: int = 0
    scale_margin: float = 1.5
    power_iterations: int = 20
    scale_samples: int = 8
    tail_average: float | None = None
    target_residual: float = 0.01
    max_steps: int = 20_000
    preconditioner: EKFACConfig | KFACConfig | None = None

    def __post_init__(self) -> None:
        """Refuse values that cannot run: sizes below 1, a tail outside [0, 1), a scale or target not > 0, a
        ``scale_margin`` <= 0.5 (the recursion contracts only when scale > (top eigenvalue + damping) / 2), and a
        preconditioner that is not a K-FAC / EK-FAC config."""
        check_damping(self.damping)
        check_preconditioner(self.preconditioner)
        check_seed(self.seed)
        check_number("solver.scale", self.scale, above=0, optional=True)
        for name in ("depth", "repeats", "batch_size"):
            check_number(f"solver.{name}", getattr(self, name), integer=True, minimum=1, optional=True)
        for name in ("power_iterations", "scale_samples", "max_steps"):
            check_number(f"solver.{name}", getattr(self, name), integer=True, minimum=1)
        check_number("solver.scale_margin", self.scale_margin, above=0.5)
        check_number("solver.tail_average", self.tail_average, minimum=0, below=1, optional=True)
        check_number("solver.target_residual", self.target_residual, above=0)

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

STALL_RATIO = 0.9
"""An attempt whose full-H residual is above this fraction of the last one's has stalled (a settling solve falls by
a third or more per doubling, benchmarks/results/lissa_vs_cg.json): a Lanczos check then tells an indefinite
H + damping·I, on which the chains never settle, from minibatch noise."""


def first_attempt(config: LiSSAConfig, num_examples: int) -> tuple[int, int, int]:
    """(depth, batch size, chains) of the first run of chains on ``num_examples`` points: the set ones, else the
    mode's choice (the whole solve in the fixed mode; the automatic mode then doubles depth and unset batch)."""
    auto = config.adaptive
    batch_size = config.batch_size or (min(num_examples, AUTO_BATCH) if auto else 1)
    return config.depth or AUTO_START_DEPTH, batch_size, config.repeats or (AUTO_REPEATS if auto else 1)


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


class LiSSA(Solver, name="lissa"):
    """LiSSA with a contraction-safe automatic scale, divergence detection and per-chain norm traces.

    ``fit`` resolves the unset options (see :class:`LiSSAConfig`) into ``depth``, ``batch_size``, ``repeats`` and
    ``tail_average`` attributes; in the automatic mode ``depth`` and ``batch_size`` are the first attempt's.
    """

    config_class = LiSSAConfig
    iterative = True

    def fit(self, hessian: Hessian, preconditioner: KFAC | None = None) -> LiSSA:
        """Resolve the options, fit the preconditioner (or take ``preconditioner``, already fitted on
        ``hessian``) and pick the scale; returns self."""
        config = self.config
        super().fit(hessian)
        if preconditioner is None and config.preconditioner is not None:
            preconditioner = self.unfitted_preconditioner().fit(hessian)
        self.preconditioner = preconditioner
        auto = config.adaptive
        self.depth, self.batch_size, self.repeats = first_attempt(config, hessian.num_examples)
        self.tail_average = config.tail_average if config.tail_average is not None else (AUTO_TAIL if auto else 0.0)
        self.top_eigenvalue: float | None = None
        if config.scale is None:
            self.top_eigenvalue = self._estimate_top_eigenvalue(hessian)
            damping = 0.0 if self.preconditioner is not None else config.damping  # P's operator includes it
            self.scale = max(config.scale_margin * (self.top_eigenvalue + damping), 1e-12)
        else:
            self.scale = config.scale
        return self

    def unfitted_preconditioner(self) -> KFAC | None:
        """The K-FAC or EK-FAC solver of ``config.preconditioner``, not fitted (None when there is none)."""
        options = self.config.preconditioner
        if options is None:
            return None
        return (EKFAC if isinstance(options, EKFACConfig) else KFAC)(options)

    def _precondition(self, vectors: Tensor) -> Tensor:
        """``P vectors`` for a [k, P] stack or one [P] vector (the identity without a preconditioner)."""
        if self.preconditioner is None:
            return vectors
        return self.preconditioner.solve(vectors.reshape(-1, vectors.shape[-1])).x.reshape(vectors.shape)

    def _estimate_top_eigenvalue(self, hessian: Hessian, batch_size: int | None = None) -> float:
        """Max over a few random batches (of ``batch_size``, default the fitted one) of the top eigenvalue of the
        batch Hessian (preconditioned: of ``P(H_B + damping·I)``): what the recursion must contract."""
        generator = torch.Generator().manual_seed(self.config.seed)
        rng = np.random.default_rng((self.config.seed, 2**31))
        damping = self.config.damping
        estimates = []
        for _ in range(self.config.scale_samples):
            indices = self._draw(rng, hessian.num_examples, batch_size)
            if self.preconditioner is None:
                matvec = lambda v, i=indices: hessian.batch_matvec(v, i)  # noqa: E731
            else:
                matvec = lambda v, i=indices: self._precondition(hessian.batch_matvec(v, i) + damping * v)  # noqa: E731
            iterations = self.config.power_iterations
            estimates.append(_power_iteration(matvec, hessian.dim, iterations, generator, hessian.flat))
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
        """``depth`` steps at ``batch_size`` from ``h_0 = start`` (default ``v``; preconditioned: ``scale·Pv``),
        batches drawn from ``stream``. ``h = scale·x``: without a preconditioner ``h ← v + (1 − damping/scale)h −
        H_B h / scale``, with one ``h ← Pv + h − P(H_B h + damping·h) / scale``."""
        hessian, damping = self._fitted(), self.config.damping
        rng = np.random.default_rng(stream)
        decay = 1.0 - damping / self.scale
        preconditioned = self._precondition(vectors)
        if start is None:
            start = vectors if self.preconditioner is None else self.scale * preconditioned
        estimate = start.clone()
        averaged_steps = max(1, round(self.tail_average * depth))
        tail_sum = torch.zeros_like(vectors)
        trace = torch.empty(depth, dtype=torch.float64)
        with progress.task(f"s_test: LiSSA chain {repeat}", depth, "step") as advance:
            for step in range(depth):
                product = hessian.batch_matvec(estimate, self._draw(rng, hessian.num_examples, batch_size))
                if self.preconditioner is None:
                    estimate = vectors + decay * estimate - product / self.scale
                else:
                    estimate = preconditioned + estimate - self._precondition(product + damping * estimate) / self.scale
                trace[step] = float(estimate.norm())
                self._check_divergence(trace, step, repeat)
                if step >= depth - averaged_steps:
                    tail_sum += estimate
                advance(1)
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
        operator = "batch-Hessian" if self.preconditioner is None else "preconditioned batch operator"
        eigen = "" if self.top_eigenvalue is None else f"; top {operator} eigenvalue ≈ {self.top_eigenvalue:.3g}"
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
        work = self.repeats * self.depth * self.batch_size  # the check may cost what the solve did: full H if N fits
        return SolveResult(estimate, {**info, **residual_info(hessian, estimate, vectors, self.config.damping, work)})

    def _solve_adaptive(self, vectors: Tensor) -> SolveResult:
        """Attempts of doubling depth (and batch size, if unset), warm-started, until the residual target is met."""
        hessian, config = self._fitted(), self.config
        depth, batch_size, start, steps, work, attempts = self.depth, self.batch_size, None, 0, 0, []
        checked = False  # the Lanczos check runs at the first stall only
        while True:
            stream = len(attempts)
            chains = [
                self._chain(vectors, r, depth, batch_size, start, (config.seed, r, stream)) for r in range(self.repeats)
            ]
            estimate = torch.stack([chain for chain, _ in chains]).mean(dim=0)
            steps, work = steps + self.repeats * depth, work + self.repeats * depth * batch_size
            residual = residual_info(hessian, estimate, vectors, config.damping, work)  # full H once N ≤ work
            attempts.append(
                {
                    "depth": depth,
                    "batch_size": batch_size,
                    "relative_residual": residual["relative_residual"],
                    "residual_scope": residual["residual_scope"],
                }
            )
            # the sample is another matrix (CG's exact solution can read 0.05 on it): only the full H settles
            settled = residual["relative_residual"] <= config.target_residual and residual["residual_scope"] == "full"
            if not settled and not checked and self._stalled(attempts):
                checked = True
                self._refuse_if_indefinite(attempts)
            if settled or steps + 2 * self.repeats * depth > config.max_steps:
                break
            depth, grown = (
                2 * depth,
                batch_size if config.batch_size is not None else min(2 * batch_size, hessian.num_examples),
            )
            if grown != batch_size:
                self._rescale(grown)
            batch_size, start = grown, self.scale * estimate
        info = self.diagnostics(torch.stack([trace for _, trace in chains]))
        info.update(residual, converged=settled, attempts=attempts, steps=steps, target_residual=config.target_residual)
        if not settled:
            warnings.warn(
                f"LiSSA stopped at relative residual {residual['relative_residual']:.3g} (on the "
                f"{residual['residual_scope']} H) > target {config.target_residual:g} after {steps} steps (budget "
                f"max_steps={config.max_steps}; last attempt depth {depth}, batch {batch_size}); raise max_steps or "
                "damping, or use CG",
                RuntimeWarning,
                stacklevel=3,
            )
        return SolveResult(estimate, info)

    def _rescale(self, batch_size: int) -> None:
        """Preconditioned, with an automatic scale: re-estimate it for the next attempt's larger batches. P inverts
        H's small eigenvalues, where a small batch's H_B can be far larger, so small batches need a far larger scale
        (slower steps) than large ones; the plain recursion keeps its first scale."""
        if self.preconditioner is not None and self.config.scale is None:
            self.top_eigenvalue = self._estimate_top_eigenvalue(self._fitted(), batch_size)
            self.scale = max(self.config.scale_margin * self.top_eigenvalue, 1e-12)

    @staticmethod
    def _stalled(attempts: list[dict[str, Any]]) -> bool:
        """True when the last two attempts were both checked on the full H and the residual fell by less than
        :data:`STALL_RATIO`."""
        full = [attempt["relative_residual"] for attempt in attempts[-2:] if attempt["residual_scope"] == "full"]
        return len(full) == 2 and full[1] > STALL_RATIO * full[0]

    def _refuse_if_indefinite(self, attempts: list[dict[str, Any]]) -> None:
        """After a stall: ``LANCZOS_STEPS`` full HVPs bound H's smallest eigenvalue; if H + damping·I is proven not
        positive definite the chains cannot settle at any depth, so stop now and say which damping would do."""
        hessian, damping = self._fitted(), self.config.damping
        steps = min(LANCZOS_STEPS, hessian.dim)
        lowest = smallest_ritz_value(hessian, steps, self.config.seed)
        if lowest + damping > 0:
            return
        before, after = (attempt["relative_residual"] for attempt in attempts[-2:])
        raise SolverError(
            f"LiSSA stalled: the relative residual on the full H went from {before:.3g} to {after:.3g} over attempt "
            f"{len(attempts)} (depth {attempts[-1]['depth']}), because H + damping·I is not positive definite "
            f"(damping {damping:g}): with {steps} Lanczos steps H has an eigenvalue at most {lowest:.3g}: set "
            f"damping above {-lowest:.3g} (the most negative eigenvalue may be lower)"
        )

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
            "preconditioner": None if self.preconditioner is None else self.preconditioner.name,
            "norm_trace": traces,
            "late_growth": growth,
            "converged": all(g < 0.05 for g in growth),
        }
