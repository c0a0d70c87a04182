"""K-FAC / EK-FAC factors over the ranks of a :mod:`fastif.runner` backend (local processes or torchrun).

Each rank sums the pending stage's factors over a strided share of the training set (examples ``rank``,
``rank + world_size``, ...), the sums are all-reduced, and every rank finishes the stage from the same totals; the
true Fisher's draws are seeded per example, so the fit equals one process's (``tests/test_kfac.py``).
"""

from __future__ import annotations

from ..errors import SolverError
from ..hvp import Hessian
from ..solvers.kfac.solvers import EKFAC, KFAC, EKFACConfig, KFACConfig
from .group import RankGroup, dispatched


class FactorRanks(RankGroup):
    """A rank group that fits K-FAC / EK-FAC factors: ``with FactorRanks(build, config) as ranks: ranks.fit(c)``."""

    @dispatched
    def fit(self, config: KFACConfig | EKFACConfig | None = None) -> KFAC:
        """Fit ``config``'s solver (read on the main rank) with every rank summing its share; returns it."""
        header, _ = self._on_main(lambda: (self._plan(config), None))
        p = self.problem
        hessian = Hessian(p.adapter, p.train, p.adapter.flat_params(), p.hessian_batch_size, p.hvp_method)
        solver = (EKFAC if isinstance(header, EKFACConfig) else KFAC)(header).begin(hessian)
        share = range(self.rank, hessian.num_examples, self.world_size)
        while solver.pending is not None:
            part, error = self._attempt(lambda: solver.partial_factors(share))
            self._agree(error)
            solver.absorb({key: self._all_reduce(part[key]) for key in sorted(part)})
        return solver

    def _plan(self, config: KFACConfig | EKFACConfig | None) -> KFACConfig | EKFACConfig:
        """Main rank: check the config and that every rank gets at least one example."""
        if not isinstance(config, KFACConfig | EKFACConfig):
            raise SolverError(f"FactorRanks.fit takes a KFACConfig or EKFACConfig, got {type(config).__name__}")
        if len(self.problem.train) < self.world_size:
            raise SolverError(
                f"{len(self.problem.train)} training examples cannot be shared by {self.world_size} ranks; "
                "use fewer workers"
            )
        return config
