"""Identity: H replaced by I (gradient similarity, single-checkpoint TracIn)."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from .base import Solver, SolveResult


@dataclass(frozen=True)
class IdentityConfig:
    """No options: ``H`` is replaced by the identity."""


class Identity(Solver, name="identity"):
    """Returns ``v`` unchanged: scores become gradient dot products (single-checkpoint TracIn)."""

    config_class = IdentityConfig

    def solve(self, vectors: Tensor) -> SolveResult:
        return SolveResult(vectors.clone(), {})
