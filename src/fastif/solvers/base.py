"""The solver interface: one ``fit`` / ``solve`` contract, results with diagnostics, and the registry."""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor

from ..config import check_number
from ..errors import SolverError
from ..hvp import Hessian

REGISTRY: dict[str, type[Solver]] = {}
"""Every registered solver by name (filled by subclassing with ``name=``)."""


@dataclass
class SolveResult:
    """Solution ``x`` [k, P] of ``(H + damping·I) x = v`` and the solver's diagnostics (convergence traces)."""

    x: Tensor
    info: dict[str, Any] = field(default_factory=dict)


class Solver(ABC):
    """An inverse-HVP solver: ``fit`` once on a Hessian, then ``solve`` any stack of vectors [k, P].

    A solver registers itself by subclassing with a name, ``class CG(Solver, name="cg")``: the pipeline, the CLI
    and config files then know it by that name (:data:`REGISTRY`), and nothing else has to change.
    """

    config_class: ClassVar[type]
    name: ClassVar[str]
    iterative: ClassVar[bool] = False
    """True when every solve runs Hessian-vector products (CG, PCG, LiSSA), so n right-hand sides cost n solves'
    products; False when ``fit`` does the Hessian work and a solve only applies what it stored."""

    def __init_subclass__(cls, name: str | None = None, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if name is not None:
            cls.name = name
            REGISTRY[name] = cls

    def __init__(self, config: Any = None, **options: Any) -> None:
        if config is not None and options:
            raise TypeError("pass either a config or keyword options, not both")
        self.config = config if config is not None else self.config_class(**options)
        self.hessian: Hessian | None = None

    def fit(self, hessian: Hessian) -> Solver:
        """Prepare for solves against ``hessian`` (factorise, find eigenpairs, pick a scale); returns self."""
        self.hessian = hessian
        return self

    def unfitted_preconditioner(self) -> Solver | None:
        """The solver this one is preconditioned by, not yet fitted (None: none). The facade fits it through its
        cache store and passes it to ``fit(hessian, preconditioner)``."""
        return None

    def _fitted(self) -> Hessian:
        if self.hessian is None:
            raise SolverError(f"{type(self).__name__} is not fitted: call .fit(hessian) first")
        return self.hessian

    @abstractmethod
    def solve(self, vectors: Tensor) -> SolveResult:
        """Return ``(H + damping·I)⁻¹ v`` for each row of ``vectors`` ([k, P])."""


def residual_info(
    hessian: Hessian, x: Tensor, vectors: Tensor, damping: float, budget_examples: float = math.inf
) -> dict[str, Any]:
    """Each row's relative residual ‖(H + damping·I)x − v‖ / ‖v‖, from one HVP pass (:meth:`Hessian.residual_matvec`).

    Measured on the full H unless a pass over it costs more than ``budget_examples`` example-HVPs (solvers that make
    full passes anyway leave the default: always full); then on the Hessian's fixed sample. ``relative_residual`` is
    the largest row's, ``residual_scope`` says ``"full"`` or ``"sample"`` and ``residual_examples`` how many
    training examples that matrix averages.
    """
    if hasattr(hessian, "residual_matvec"):
        product, scope, examples = hessian.residual_matvec(x, budget_examples)
    else:  # an operator without a sample: its full H
        product, scope, examples = hessian.matvec(x), "full", hessian.num_examples
    residual = product + damping * x - vectors
    norms = vectors.norm(dim=1).clamp_min(torch.finfo(vectors.dtype).tiny)
    residuals = (residual.norm(dim=1) / norms).tolist()
    return {
        "relative_residual": max(residuals),
        "relative_residuals": residuals,
        "residual_scope": scope,
        "residual_examples": examples,
    }


def check_damping(damping: float) -> None:
    """Refuse a damping that is negative, NaN or infinite (at config construction, key ``solver.damping``)."""
    check_number("solver.damping", damping, minimum=0)


def check_seed(seed: int) -> None:
    """Refuse a seed that torch and numpy cannot both take (they need 0 <= seed < 2**32)."""
    check_number("solver.seed", seed, integer=True, minimum=0, below=2**32)


def solver_from_config(config: Any) -> Solver:
    """The solver whose config class ``config`` is an instance of (exact type first, so subclasses stay apart)."""
    for solver in REGISTRY.values():
        if type(config) is solver.config_class:
            return solver(config)
    raise SolverError(f"no solver takes a {type(config).__name__}; known: {sorted(REGISTRY)}")
