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
``relative_residuals``) in their info, from one extra HVP pass per solve (:meth:`Hessian.residual_matvec`). Exact,
CG and Arnoldi, which pass over the whole set anyway, measure it on the full H; LiSSA on the full H when the set
has no more examples than its chains touched, else on the Hessian's fixed sample (all examples up to
``sample_size`` = 1024, else a seeded subsample of that many), another matrix than the one solved.
``residual_scope`` (``"full"`` | ``"sample"``) and ``residual_examples`` say which.
"""

from .arnoldi import Arnoldi, ArnoldiConfig
from .base import REGISTRY, Solver, SolveResult, residual_info, solver_from_config
from .cg import CG, CGConfig
from .exact import Exact, ExactConfig
from .identity import Identity, IdentityConfig
from .kfac import EKFAC, KFAC, PCG, EKFACConfig, KFACConfig, PCGConfig
from .lissa import FASTIF_DEPTH, LiSSA, LiSSAConfig

SOLVERS = REGISTRY
"""Every registered solver by name, the built-in ones and any later ``class X(Solver, name=...)``."""

__all__ = [
    "CG",
    "EKFAC",
    "FASTIF_DEPTH",
    "KFAC",
    "PCG",
    "REGISTRY",
    "SOLVERS",
    "Arnoldi",
    "ArnoldiConfig",
    "CGConfig",
    "EKFACConfig",
    "Exact",
    "ExactConfig",
    "Identity",
    "IdentityConfig",
    "KFACConfig",
    "LiSSA",
    "LiSSAConfig",
    "PCGConfig",
    "SolveResult",
    "Solver",
    "residual_info",
    "solver_from_config",
]  # fmt: skip
