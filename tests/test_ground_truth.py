"""Solvers and scores against closed forms (ridge) and leave-one-out retraining (logistic regression)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import fit_logistic, logistic_adapter, logistic_data
from scipy.stats import pearsonr

from fastif import CG, Arnoldi, Exact, Hessian, Influence, LiSSA


def _closed_form_inverse(x: torch.Tensor, l2: float, v: torch.Tensor) -> torch.Tensor:
    hessian = x.T @ x / x.shape[0] + l2 * torch.eye(x.shape[1], dtype=x.dtype)
    return torch.linalg.solve(hessian, v.T).T


def _relative_error(estimate: torch.Tensor, truth: torch.Tensor) -> float:
    return float((estimate - truth).norm() / truth.norm())


@pytest.mark.parametrize(
    ("solver", "tolerance"),
    [
        (Exact(), 1e-5),
        (CG(tolerance=1e-12), 1e-5),
        (Arnoldi(rank=10), 1e-3),
        (LiSSA(depth=2000, repeats=4, batch_size=10, seed=1, tail_average=0.5), 2e-2),
    ],
    ids=["exact", "cg", "arnoldi-full-rank", "lissa"],
)
def test_inverse_hvp_matches_ridge_closed_form(ridge, solver, tolerance):
    adapter, train, _, x, l2 = ridge
    hessian = Hessian(adapter, train)
    vectors = torch.randn(3, adapter.num_params, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    estimate = solver.fit(hessian).solve(vectors).x
    assert _relative_error(estimate, _closed_form_inverse(x, l2, vectors)) < tolerance


def test_damping_adds_to_the_diagonal_for_every_solver(ridge):
    adapter, train, _, x, l2 = ridge
    hessian = Hessian(adapter, train)
    vector = torch.randn(1, adapter.num_params, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    truth = _closed_form_inverse(x, l2 + 0.5, vector)
    for solver in (Exact(damping=0.5), CG(damping=0.5, tolerance=1e-12), Arnoldi(rank=10, damping=0.5)):
        assert _relative_error(solver.fit(hessian).solve(vector).x, truth) < 1e-5


def _loo_pearson(problem, solver, test_points: int = 3, removals: int = 40) -> float:
    """Pearson between predicted (score / n) and actual test-loss changes after retraining without top points."""
    x, y, train, l2, theta = problem["x"], problem["y"], problem["train"], problem["l2"], problem["theta"]
    n = len(train)
    influence = Influence(logistic_adapter(problem), logistic_data(problem, train), solver=solver)
    test = problem["test"][:test_points]
    scores = influence.scores(logistic_data(problem, test)).numpy()
    predicted, actual = [], []
    for row, test_index in enumerate(test):
        design = np.append(x[test_index], 1.0)

        def test_loss(parameters, design=design, target=y[test_index]):
            logit = design @ parameters
            return np.logaddexp(0.0, logit) - target * logit

        for j in np.argsort(-np.abs(scores[row]))[:removals]:
            weights = np.ones(n)
            weights[j] = 0.0  # objective: sum over kept points / n + L2, i.e. upweighting z_j by -1/n
            refit = fit_logistic(x[train], y[train], l2, weights=weights, start=theta)
            predicted.append(scores[row, j] / n)
            actual.append(test_loss(refit) - test_loss(theta))
    return float(pearsonr(predicted, actual).statistic)


@pytest.mark.parametrize(
    ("solver", "threshold"),
    [(Exact(), 0.95), (CG(tolerance=1e-10), 0.95), (LiSSA(depth=800, repeats=2, batch_size=8, tail_average=0.5), 0.9)],
    ids=["exact", "cg", "lissa"],
)
def test_scores_predict_leave_one_out_retraining(logistic, solver, threshold):
    assert _loo_pearson(logistic, solver) >= threshold
