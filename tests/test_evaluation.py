"""Tests for fastif.evaluation: hand-computed cases, closed-form leave-one-out, and agreement with scipy/sklearn."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats

from fastif.errors import DataError
from fastif.evaluation import (
    chance_recall,
    detection_curve,
    flip_labels,
    lds_from_retraining,
    lds_subsets,
    leave_one_out_changes,
    linear_datamodeling_score,
    loo_correlation,
    mislabel_auc,
    predicted_loo_changes,
    score_correlation,
    topm_recall,
)

# ---------------------------------------------------------------------------------------------------------------
# linear datamodeling score


def test_lds_hand_computed_with_a_tie():
    # 2 test x 4 train x 3 subsets, each subset keeps 2 of the 4 training points.
    scores = np.array([[1.0, 2.0, 3.0, 4.0], [1.0, 1.0, 1.0, 2.0]])
    masks = np.array([[1, 1, 0, 0], [0, 1, 1, 0], [0, 0, 1, 1]], dtype=bool)
    outputs = np.array([[0.1, 1.0], [0.2, 2.0], [0.3, 3.0]])  # [m, n_test], strictly increasing for both tests
    # Test 0: subset sums 1+2=3, 2+3=5, 3+4=7 -> ranks (1, 2, 3) against output ranks (1, 2, 3): Spearman 1.
    # Test 1: subset sums 1+1=2, 1+1=2, 1+2=3 -> tied, average ranks (1.5, 1.5, 3) against (1, 2, 3).
    #   Centred: (-0.5, -0.5, 1) and (-1, 0, 1); dot = 0.5 + 0 + 1 = 1.5; norms sqrt(1.5) and sqrt(2);
    #   Spearman = 1.5 / sqrt(3) = sqrt(3) / 2 ≈ 0.866.
    mean, per_test = linear_datamodeling_score(scores, masks, outputs)
    np.testing.assert_allclose(per_test, [1.0, np.sqrt(3) / 2])
    assert mean == pytest.approx((1 + np.sqrt(3) / 2) / 2)
    assert per_test[1] == pytest.approx(stats.spearmanr([2, 2, 3], [1, 2, 3])[0])


def test_lds_perfect_additive_model_is_one():
    rng = np.random.default_rng(0)
    scores = rng.normal(size=(5, 30))
    masks = lds_subsets(30, m=20, alpha=0.5, seed=1)
    outputs = masks.astype(float) @ scores.T + 3.0  # the model's output is exactly the sum of the scores
    mean, per_test = linear_datamodeling_score(scores, masks, outputs)
    assert mean == pytest.approx(1.0)
    np.testing.assert_allclose(per_test, 1.0)


def test_lds_matches_scipy_and_accepts_tensors():
    rng = np.random.default_rng(2)
    scores = rng.normal(size=(4, 12))
    masks = lds_subsets(12, m=9, alpha=0.25, seed=3)
    outputs = rng.normal(size=(9, 4))
    mean, per_test = linear_datamodeling_score(torch.tensor(scores, requires_grad=True), masks, torch.tensor(outputs))
    sums = masks.astype(float) @ scores.T
    expected = [stats.spearmanr(sums[:, i], outputs[:, i])[0] for i in range(4)]
    np.testing.assert_allclose(per_test, expected)
    assert mean == pytest.approx(np.mean(expected))


def test_lds_constant_test_point_is_nan_and_left_out_of_mean():
    scores = np.array([[1.0, 2.0, 3.0, 4.0], [1.0, 1.0, 1.0, 1.0]])
    masks = np.array([[1, 1, 0, 0], [0, 1, 1, 0], [0, 0, 1, 1]], dtype=bool)
    outputs = np.array([[0.1, 1.0], [0.2, 2.0], [0.3, 3.0]])
    mean, per_test = linear_datamodeling_score(scores, masks, outputs)
    assert per_test[0] == pytest.approx(1.0) and np.isnan(per_test[1])
    assert mean == pytest.approx(1.0)
    with pytest.raises(DataError, match="undefined"):
        linear_datamodeling_score(scores[1:], masks, outputs[:, 1:])


def test_lds_subsets_sizes_and_reproducibility():
    masks = lds_subsets(11, m=6, alpha=0.3, seed=5)
    assert masks.shape == (6, 11) and masks.dtype == bool
    assert (masks.sum(axis=1) == round(0.3 * 11)).all()
    np.testing.assert_array_equal(masks, lds_subsets(11, m=6, alpha=0.3, seed=5))
    assert not np.array_equal(masks, lds_subsets(11, m=6, alpha=0.3, seed=6))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"m": 1}, "m >= 2"), ({"alpha": 1.0}, "alpha"), ({"alpha": 0.01}, "keeps 0 points")],
)
def test_lds_subsets_rejects_bad_arguments(kwargs, match):
    with pytest.raises(DataError, match=match):
        lds_subsets(**{"n_train": 10, "m": 4, **kwargs})


def test_lds_rejects_mismatched_shapes():
    scores = np.zeros((2, 4))
    masks = np.ones((3, 4), dtype=bool)
    with pytest.raises(DataError, match="columns"):
        linear_datamodeling_score(scores, np.ones((3, 5), dtype=bool), np.zeros((3, 2)))
    with pytest.raises(DataError, match=r"\[m, n_test\]"):
        linear_datamodeling_score(scores, masks, np.zeros((2, 3)))
    with pytest.raises(DataError, match="boolean"):
        linear_datamodeling_score(scores, masks * 2, np.zeros((3, 2)))
    with pytest.raises(DataError, match="empty"):
        linear_datamodeling_score(np.zeros((0, 4)), masks, np.zeros((3, 0)))


def test_lds_from_retraining_with_additive_model():
    rng = np.random.default_rng(7)
    scores = rng.normal(size=(3, 16))
    seen: list[np.ndarray] = []

    def retrain(kept: np.ndarray) -> np.ndarray:
        seen.append(kept)
        return kept

    mean, per_test = lds_from_retraining(retrain, lambda kept: scores[:, kept].sum(axis=1), scores, m=8, seed=4)
    assert mean == pytest.approx(1.0)
    assert per_test.shape == (3,)
    masks = lds_subsets(16, 8, 0.5, 4)
    assert all(np.array_equal(kept, np.flatnonzero(mask)) for kept, mask in zip(seen, masks, strict=True))
    with pytest.raises(DataError, match="n_test=3"):
        lds_from_retraining(retrain, lambda kept: np.zeros(2), scores, m=8)


# ---------------------------------------------------------------------------------------------------------------
# kNN recall


def test_topm_recall_helpful_and_harmful_by_hand():
    scores = np.array([[5.0, -3.0, 1.0, 4.0, -1.0], [0.0, 2.0, -4.0, -5.0, 3.0]])
    # Row 0: top-2 helpful = {0, 3}; top-2 harmful = {1, 4}.  Row 1: top-2 helpful = {4, 1}; harmful = {3, 2}.
    candidates = np.array([[0, 1, 2], [3, 4, 0]])
    np.testing.assert_allclose(topm_recall(scores, candidates, m=2), [0.5, 0.5])
    np.testing.assert_allclose(topm_recall(scores, candidates, m=2, sign="harmful"), [0.5, 0.5])
    np.testing.assert_allclose(topm_recall(scores, [[0, 3], [1, 4, 2]], m=2), [1.0, 1.0])
    np.testing.assert_allclose(topm_recall(scores, [[2], []], m=2, sign="harmful"), [0.0, 0.0])
    np.testing.assert_allclose(topm_recall(scores, candidates, m=5), [0.6, 0.6])


def test_topm_recall_ties_broken_by_lower_index_and_duplicates_ignored():
    scores = np.array([[1.0, 1.0, 1.0, 0.0]])
    np.testing.assert_allclose(topm_recall(scores, [[0, 0, 1]], m=2), [1.0])
    np.testing.assert_allclose(topm_recall(scores, [[2]], m=2), [0.0])


def test_topm_recall_validation():
    scores = np.zeros((2, 4))
    with pytest.raises(DataError, match="m must be between"):
        topm_recall(scores, [[0], [1]], m=5)
    with pytest.raises(DataError, match="rows"):
        topm_recall(scores, [[0]], m=1)
    with pytest.raises(DataError, match="outside"):
        topm_recall(scores, [[0], [4]], m=1)
    with pytest.raises(DataError, match="sign"):
        topm_recall(scores, [[0], [1]], m=1, sign="useful")  # type: ignore[arg-type]
    with pytest.raises(DataError, match="integer"):
        topm_recall(scores, np.array([[0.5], [1.0]]), m=1)


def test_chance_recall_matches_random_candidates():
    assert chance_recall(10, 100) == pytest.approx(0.1)
    assert chance_recall(0, 5) == 0.0 and chance_recall(5, 5) == 1.0
    rng = np.random.default_rng(0)
    scores = rng.normal(size=(2000, 50))
    candidates = np.stack([rng.choice(50, size=10, replace=False) for _ in range(2000)])
    assert topm_recall(scores, candidates, m=5).mean() == pytest.approx(chance_recall(10, 50), abs=0.02)
    with pytest.raises(DataError):
        chance_recall(6, 5)
    with pytest.raises(DataError):
        chance_recall(1, 0)


# ---------------------------------------------------------------------------------------------------------------
# score correlation


def test_score_correlation_matches_scipy_flattened_and_per_row():
    rng = np.random.default_rng(1)
    a = rng.normal(size=(3, 20))
    b = a + 0.5 * rng.normal(size=(3, 20))
    flat = score_correlation(a, b)
    assert flat["pearson"] == pytest.approx(stats.pearsonr(a.ravel(), b.ravel())[0])
    assert flat["spearman"] == pytest.approx(stats.spearmanr(a.ravel(), b.ravel())[0])
    assert flat["kendall"] == pytest.approx(stats.kendalltau(a.ravel(), b.ravel())[0])
    rows = score_correlation(torch.tensor(a), torch.tensor(b), per_row=True)
    assert rows["spearman"] == pytest.approx(np.mean([stats.spearmanr(a[i], b[i])[0] for i in range(3)]))
    assert rows["kendall"] == pytest.approx(np.mean([stats.kendalltau(a[i], b[i])[0] for i in range(3)]))


def test_score_correlation_refuses_constant_and_mismatched_input():
    with pytest.raises(DataError, match="constant"):
        score_correlation(np.ones(5), np.arange(5.0))
    a = np.array([[1.0, 2.0, 3.0], [2.0, 2.0, 2.0]])
    with pytest.raises(DataError, match=r"a\[1\] is constant"):
        score_correlation(a, np.arange(6.0).reshape(2, 3), per_row=True)
    with pytest.raises(DataError, match="same shape"):
        score_correlation(np.arange(3.0), np.arange(4.0))
    with pytest.raises(DataError, match="2-D"):
        score_correlation(np.arange(3.0), np.arange(3.0), per_row=True)
    with pytest.raises(DataError, match="NaN"):
        score_correlation(np.array([1.0, np.nan]), np.arange(2.0))
    with pytest.raises(DataError, match="empty"):
        score_correlation([], [])


# ---------------------------------------------------------------------------------------------------------------
# leave-one-out retraining on ridge regression (closed form via Sherman-Morrison)


def _ridge_problem(n: int = 12, d: int = 3, n_test: int = 4, lam: float = 0.5):
    """A tiny ridge regression: fit minimises sum_j 0.5 (x_jᵀθ - y_j)² + (lam / 2)‖θ‖² on the kept rows."""
    rng = np.random.default_rng(0)
    x, x_test = rng.normal(size=(n, d)), rng.normal(size=(n_test, d))
    w = rng.normal(size=d)
    y, y_test = x @ w + 0.3 * rng.normal(size=n), x_test @ w + 0.3 * rng.normal(size=n_test)

    def retrain(kept: np.ndarray) -> np.ndarray:
        xk = x[kept]
        return np.linalg.solve(xk.T @ xk + lam * np.eye(d), xk.T @ y[kept])

    def test_loss(theta: np.ndarray) -> np.ndarray:
        return 0.5 * (x_test @ theta - y_test) ** 2

    return x, y, x_test, y_test, lam, retrain, test_loss


def test_leave_one_out_changes_match_closed_form():
    x, y, _, _, lam, retrain, test_loss = _ridge_problem()
    n, d = x.shape
    theta = retrain(np.arange(n))
    a_inv = np.linalg.inv(x.T @ x + lam * np.eye(d))
    removed = [0, 5, 11]
    changes = leave_one_out_changes(retrain, test_loss, n, removed, theta)
    assert changes.shape == (3, 4)
    for row, j in enumerate(removed):
        # Sherman-Morrison: θ_{-j} = θ - A⁻¹ x_j r_j / (1 - h_j), r_j = y_j - x_jᵀθ, h_j = x_jᵀ A⁻¹ x_j.
        residual, leverage = y[j] - x[j] @ theta, x[j] @ a_inv @ x[j]
        theta_j = theta - a_inv @ x[j] * residual / (1 - leverage)
        np.testing.assert_allclose(changes[row], test_loss(theta_j) - test_loss(theta), rtol=1e-8, atol=1e-12)


def test_influence_predicts_ridge_leave_one_out_with_positive_sign():
    x, y, x_test, y_test, lam, retrain, test_loss = _ridge_problem(n=40)
    n, d = x.shape
    theta = retrain(np.arange(n))
    # Training objective mean_j L_j + (lam / n / 2)‖θ‖²: H = (XᵀX + lam I) / n, ∇L(z) = x (xᵀθ - y).
    hessian = (x.T @ x + lam * np.eye(d)) / n
    grad_train, grad_test = x * (x @ theta - y)[:, None], x_test * (x_test @ theta - y_test)[:, None]
    scores = grad_test @ np.linalg.solve(hessian, grad_train.T)  # [n_test, n_train], positive = helpful
    removed = np.arange(n)
    actual = leave_one_out_changes(retrain, test_loss, n, removed, theta)
    predicted = predicted_loo_changes(scores, removed)
    np.testing.assert_allclose(predicted, scores.T / n)
    result = loo_correlation(predicted, actual)
    assert result["n"] == n * 4
    assert result["pearson"] > 0.95 and result["spearman"] > 0.9


def test_leave_one_out_validation():
    _, _, _, _, _, retrain, test_loss = _ridge_problem()
    theta = retrain(np.arange(12))
    with pytest.raises(DataError, match="outside"):
        leave_one_out_changes(retrain, test_loss, 12, [12], theta)
    with pytest.raises(DataError, match="empty"):
        leave_one_out_changes(retrain, test_loss, 12, [], theta)
    with pytest.raises(DataError, match="same shape"):
        leave_one_out_changes(lambda kept: kept, lambda model: np.zeros(model.size), 12, [0], np.arange(12))
    with pytest.raises(DataError, match="same shape"):
        loo_correlation(np.zeros(3), np.zeros(4))
    with pytest.raises(DataError, match="constant"):
        loo_correlation(np.zeros(3), np.arange(3.0))


# ---------------------------------------------------------------------------------------------------------------
# mislabel detection


def test_flip_labels_exact_fraction_different_class_reproducible():
    labels = np.random.default_rng(0).integers(0, 3, size=200)
    new, flipped = flip_labels(labels, 0.15, num_classes=3, seed=9)
    assert flipped.sum() == 30
    assert (new[flipped] != labels[flipped]).all()
    np.testing.assert_array_equal(new[~flipped], labels[~flipped])
    assert ((new >= 0) & (new < 3)).all()
    new2, flipped2 = flip_labels(torch.tensor(labels), 0.15, num_classes=3, seed=9)
    np.testing.assert_array_equal(new, new2)
    np.testing.assert_array_equal(flipped, flipped2)


@settings(max_examples=30, deadline=None)
@given(
    labels=st.lists(st.integers(0, 4), min_size=1, max_size=60),
    fraction=st.floats(0.0, 1.0),
    seed=st.integers(0, 2**32 - 1),
)
def test_flip_labels_properties(labels, fraction, seed):
    new, flipped = flip_labels(labels, fraction, num_classes=5, seed=seed)
    assert flipped.sum() == round(fraction * len(labels))
    assert (new[flipped] != np.asarray(labels)[flipped]).all()
    assert (new[~flipped] == np.asarray(labels)[~flipped]).all()


def test_flip_labels_spreads_over_other_classes():
    labels = np.zeros(3000, dtype=int)
    new, _ = flip_labels(labels, 1.0, num_classes=4, seed=0)
    counts = np.bincount(new, minlength=4)
    assert counts[0] == 0 and (np.abs(counts[1:] - 1000) < 150).all()


def test_flip_labels_validation():
    with pytest.raises(DataError, match="num_classes"):
        flip_labels([0, 1], 0.5, num_classes=1)
    with pytest.raises(DataError, match=r"\[0, 2\)"):
        flip_labels([0, 2], 0.5, num_classes=2)
    with pytest.raises(DataError, match="fraction"):
        flip_labels([0, 1], 1.5, num_classes=2)
    with pytest.raises(DataError, match="integers"):
        flip_labels([0.5, 1.0], 0.5, num_classes=2)
    with pytest.raises(DataError, match="empty"):
        flip_labels([], 0.5, num_classes=2)


def test_mislabel_auc_perfect_and_random():
    flipped = np.zeros(400, dtype=bool)
    flipped[::10] = True
    assert mislabel_auc(flipped.astype(float) + 0.001 * np.arange(400), flipped) == pytest.approx(1.0)
    assert mislabel_auc(-flipped.astype(float), flipped) == pytest.approx(0.0)
    rng = np.random.default_rng(0)
    big = rng.random(5000) < 0.1
    assert mislabel_auc(rng.normal(size=5000), big) == pytest.approx(0.5, abs=0.04)
    with pytest.raises(DataError, match="no clean"):
        mislabel_auc(np.arange(3.0), np.ones(3, dtype=bool))
    with pytest.raises(DataError, match="no flipped"):
        mislabel_auc(np.arange(3.0), np.zeros(3, dtype=bool))
    with pytest.raises(DataError, match="same shape"):
        mislabel_auc(np.arange(3.0), np.array([True, False]))


def test_detection_curve_by_hand():
    suspicion = np.array([0.9, 0.1, 0.5, 0.7])
    flipped = np.array([True, False, False, True])
    inspected, found = detection_curve(suspicion, flipped)
    # Inspection order by suspicion: 0 (flipped), 3 (flipped), 2, 1.
    np.testing.assert_allclose(inspected, [0.0, 0.25, 0.5, 0.75, 1.0])
    np.testing.assert_allclose(found, [0.0, 0.5, 1.0, 1.0, 1.0])


def test_mislabel_auc_matches_scikit_learn_with_ties():
    """The rank-statistic AUC equals scikit-learn's ROC AUC, ties counted one half."""
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(1)
    flipped = rng.random(300) < 0.2
    suspicion = np.round(rng.normal(size=300) + flipped, 1)  # rounded: many ties
    assert mislabel_auc(suspicion, flipped) == pytest.approx(roc_auc_score(flipped, suspicion), abs=1e-12)
