"""LiSSA to a stated accuracy: its default (automatic) mode reaches the residual target and Exact's LOO Pearson."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from helpers import fit_logistic, logistic_adapter, logistic_data
from scipy.stats import pearsonr
from sklearn.datasets import load_breast_cancer, load_wine

from fastif import Exact, Hessian, Influence, LiSSA, LiSSAConfig


def _problem(name: str, seed: int, l2: float) -> dict:
    """Standardised breast_cancer or wine (class 0 vs rest), an 80/20 split by ``seed``, fitted L2 logistic model."""
    data = load_breast_cancer() if name == "breast_cancer" else load_wine()
    x = (data.data - data.data.mean(0)) / data.data.std(0)
    y = (data.target == 0).astype(np.float64) if name == "wine" else data.target.astype(np.float64)
    order = np.random.default_rng(seed).permutation(len(y))
    cut = int(0.8 * len(y))
    train, test = order[:cut], order[cut:]
    return {"x": x, "y": y, "train": train, "test": test, "l2": l2, "theta": fit_logistic(x[train], y[train], l2)}


def _loo_pearsons(problem: dict, solvers: list, test_points: int = 2, removals: int = 12) -> list[float]:
    """Each solver's Pearson between predicted (score / n) and retrained test-loss changes, on Exact's top points."""
    x, y, train, l2, theta = problem["x"], problem["y"], problem["train"], problem["l2"], problem["theta"]
    n, test = len(train), problem["test"][:test_points]
    scores = [
        Influence(logistic_adapter(problem), logistic_data(problem, train), solver=solver)
        .scores(logistic_data(problem, test))
        .numpy()
        for solver in solvers
    ]
    predicted, actual = [[] for _ in solvers], []
    for row, test_index in enumerate(test):
        design = np.append(x[test_index], 1.0)

        def test_loss(parameters, design=design, target=y[test_index]):
            logit = design @ parameters
            return np.logaddexp(0.0, logit) - target * logit

        for j in np.argsort(-np.abs(scores[0][row]))[:removals]:
            weights = np.ones(n)
            weights[j] = 0.0
            refit = fit_logistic(x[train], y[train], l2, weights=weights, start=theta)
            actual.append(test_loss(refit) - test_loss(theta))
            for column, matrix in zip(predicted, scores, strict=True):
                column.append(matrix[row, j] / n)
    return [float(pearsonr(column, actual).statistic) for column in predicted]


@pytest.mark.slow
@pytest.mark.parametrize("l2", [1e-2, 1e-3])
@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("name", ["breast_cancer", "wine"])
def test_default_lissa_is_within_001_of_exact_on_leave_one_out(name, seed, l2):
    problem = _problem(name, seed, l2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the defaults must settle without a warning
        exact, lissa = _loo_pearsons(problem, [Exact(), LiSSA()])
    assert lissa >= exact - 0.01


def _ridge_solve(ridge, **options):
    adapter, train, _, x, l2 = ridge
    vectors = torch.randn(3, adapter.num_params, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    result = LiSSA(**options).fit(Hessian(adapter, train)).solve(vectors)
    hessian = x.T @ x / x.shape[0] + l2 * torch.eye(x.shape[1], dtype=torch.float64)
    residual = float(((result.x @ hessian - vectors).norm(dim=1) / vectors.norm(dim=1)).max())
    return result, residual


def test_default_lissa_meets_its_residual_target_on_ridge(ridge):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result, residual = _ridge_solve(ridge)
    assert result.info["converged"]
    assert residual <= LiSSAConfig().target_residual == 0.01
    assert result.info["relative_residual"] == pytest.approx(residual, rel=1e-9)
    assert [a["depth"] for a in result.info["attempts"]] == [100 * 2**i for i in range(len(result.info["attempts"]))]


def test_a_tighter_target_is_met_too(ridge):
    result, residual = _ridge_solve(ridge, target_residual=0.002)
    assert residual <= 0.002 < result.info["attempts"][0]["relative_residual"]


def test_lissa_says_when_its_budget_cannot_reach_the_target(ridge):
    with pytest.warns(RuntimeWarning, match=r"LiSSA stopped at relative residual .* > target 0.001 after 200 steps"):
        result, residual = _ridge_solve(ridge, target_residual=1e-3, max_steps=500)
    assert not result.info["converged"]
    assert result.info["steps"] == 200
    assert residual > 1e-3


@pytest.mark.filterwarnings("ignore:LiSSA has not settled")
def test_explicit_settings_are_honoured_exactly(ridge):
    adapter, train, *_ = ridge
    hessian = Hessian(adapter, train)
    solver = LiSSA(depth=30, batch_size=4, repeats=3, tail_average=0.5, damping=0.1).fit(hessian)
    assert (solver.depth, solver.batch_size, solver.repeats, solver.tail_average) == (30, 4, 3, 0.5)
    result = solver.solve(torch.ones(1, adapter.num_params, dtype=torch.float64))
    assert result.info["norm_trace"].shape == (3, 30)
    assert "attempts" not in result.info
    chains = [solver.run_chain(torch.ones(1, adapter.num_params, dtype=torch.float64), r)[0] for r in range(3)]
    assert torch.equal(result.x, torch.stack(chains).mean(dim=0))


def test_fastif_literal_setting_by_name(ridge):
    adapter, train, *_ = ridge
    config = LiSSAConfig.from_fastif(5e-3, 1e4)
    assert not config.adaptive and config.damping == pytest.approx(50.0)
    solver = LiSSA(config).fit(Hessian(adapter, train))
    assert (solver.depth, solver.batch_size, solver.repeats, solver.tail_average) == (1000, 1, 1, 0.0)
    fixed = LiSSA(depth=40).fit(Hessian(adapter, train))
    assert (fixed.batch_size, fixed.repeats, fixed.tail_average) == (1, 1, 0.0)
