"""LiSSA preconditioned by EK-FAC / K-FAC: the same s_test as a dense solve, reached in far fewer steps; its
factors go through the facade's cache store; bad preconditioners are refused."""

from __future__ import annotations

import warnings

import pytest
import torch
from test_kfac import DOUBLE, forbid_factor_passes, mlp_problem, trained_mlp

from fastif import Exact, Influence, TensorData
from fastif.errors import ConfigError
from fastif.solvers import LiSSA, LiSSAConfig
from fastif.solvers.kfac import EKFACConfig, KFACConfig
from fastif.store import Store


@pytest.fixture(scope="module")
def problem() -> tuple:
    """The trained 6-16-3 MLP, 3 random right-hand sides and their dense solve at damping 1e-2."""
    hessian = trained_mlp()
    vectors = torch.randn(3, hessian.dim, generator=torch.Generator().manual_seed(0), dtype=DOUBLE)
    return hessian, vectors, Exact(damping=1e-2).fit(hessian).solve(vectors).x


def error(estimate: torch.Tensor, reference: torch.Tensor) -> float:
    return float((estimate - reference).norm() / reference.norm())


def test_full_batch_preconditioned_recursion_is_far_closer_after_the_same_steps(problem):
    """Batch = the whole set makes the recursion deterministic, so only the preconditioner differs. Measured after
    300 steps: EK-FAC 0.0069 from the dense solve, plain 0.164."""
    hessian, vectors, exact = problem
    settings = {"damping": 1e-2, "depth": 300, "batch_size": hessian.num_examples, "repeats": 1, "tail_average": 0.0}
    plain = LiSSA(**settings).fit(hessian).solve(vectors)
    preconditioned = LiSSA(**settings, preconditioner=EKFACConfig(damping=1e-2)).fit(hessian).solve(vectors)
    assert preconditioned.info["preconditioner"] == "ekfac" and plain.info["preconditioner"] is None
    assert error(preconditioned.x, exact) < error(plain.x, exact) / 5


@pytest.mark.parametrize("preconditioner", [EKFACConfig(damping=1e-2), KFACConfig(damping=1e-2)])
def test_automatic_mode_settles_on_the_dense_solve(problem, preconditioner):
    """The automatic mode to its default target (residual 0.01) lands within 0.005 of the dense solve (measured,
    3,000 steps each: EK-FAC 4e-5, K-FAC 1.1e-4; the plain recursion to the same target: 0.020)."""
    hessian, vectors, exact = problem
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # neither unsettled nor over budget
        result = LiSSA(damping=1e-2, preconditioner=preconditioner).fit(hessian).solve(vectors)
    assert result.info["converged"] and result.info["relative_residual"] <= 0.01
    assert error(result.x, exact) < 0.005


def test_the_scale_bounds_the_preconditioned_operator(problem):
    """The recursion contracts only if scale > top eigenvalue of P(H_B + damping·I) / 2: with the whole set as
    the batch, that is P(H + damping·I)'s, computed densely here from the fitted EK-FAC."""
    hessian, _, _ = problem
    solver = LiSSA(damping=1e-2, batch_size=hessian.num_examples, preconditioner=EKFACConfig(damping=1e-2))
    solver.fit(hessian)
    identity = torch.eye(hessian.dim, dtype=DOUBLE)
    dense = hessian.matvec(identity) + 1e-2 * identity
    top = float(torch.linalg.eigvals(solver.preconditioner.solve(dense).x.T).real.max())
    assert solver.top_eigenvalue == pytest.approx(top, rel=0.05)
    assert solver.scale > top / 2


def test_the_facade_keeps_the_preconditioner_in_its_cache_store(tmp_path, monkeypatch):
    """Influence(cache=store) fits LiSSA's EK-FAC through the store; a second facade reloads it without a data
    pass and gives the same s_test."""
    hessian = mlp_problem(layer_norm=True)
    adapter, train = hessian.adapter, hessian.data
    test = TensorData(tuple(tensor[:3] for tensor in train.tensors))

    def solver() -> LiSSA:
        return LiSSA(damping=1.0, depth=50, repeats=1, batch_size=8, preconditioner=EKFACConfig(damping=1.0))

    def open_store() -> Store:
        return Store.open(tmp_path / "lissa", model_fingerprint="m", data_fingerprint="d", config={})

    with open_store() as store:
        first = Influence(adapter, train, solver(), cache=store).s_test(test)
        assert store.has("ekfac-fitted")
    torch.testing.assert_close(first, Influence(adapter, train, solver()).s_test(test), rtol=1e-10, atol=0)

    forbid_factor_passes(monkeypatch)
    with open_store() as store:
        torch.testing.assert_close(Influence(adapter, train, solver(), cache=store).s_test(test), first)


def test_a_preconditioner_that_is_not_a_factor_config_is_refused():
    with pytest.raises(ConfigError, match=r"solver\.preconditioner must be an EKFACConfig, a KFACConfig or None"):
        LiSSAConfig(preconditioner="ekfac")
