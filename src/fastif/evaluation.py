"""Evaluation: how good are influence scores? Leave-one-out, linear datamodeling, kNN recall, mislabel detection.

Pure functions on NumPy arrays or torch tensors (converted to float64 / int64 NumPy); no I/O. Sign convention
as everywhere in fastif: ``score[i, j] = ∇L(test_i)ᵀ H⁻¹ ∇L(train_j)``, positive = helpful, so removing training
point ``j`` is predicted to *raise* test ``i``'s loss by ``score[i, j] / n_train``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Literal, TypeVar

import numpy as np
from scipy import stats

from .errors import DataError

Model = TypeVar("Model")


# ---------------------------------------------------------------------------------------------------------------
# input checks


def _to_numpy(x: Any, name: str, dtype: type = np.float64) -> np.ndarray:
    """Convert an array-like or (possibly grad-tracking, on-device) tensor to NumPy, refusing empty input."""
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    try:
        raw = np.asarray(x)
        arr = raw.astype(dtype)
    except (TypeError, ValueError) as exc:
        raise DataError(f"{name} must be numeric array-like, got {type(x).__name__}: {exc}") from exc
    if dtype is np.int64 and raw.dtype.kind not in "biu" and not np.array_equal(arr, raw):
        raise DataError(f"{name} must hold integers, got non-integer values of dtype {raw.dtype}")
    if arr.size == 0:
        raise DataError(f"{name} is empty (shape {arr.shape}); pass at least one value")
    if dtype is np.float64 and not np.all(np.isfinite(arr)):
        raise DataError(f"{name} contains NaN or infinite values; drop or fix them before evaluating")
    return arr


def _matrix(x: Any, name: str, dtype: type = np.float64) -> np.ndarray:
    """A non-empty 2-D array (``[rows, cols]``), else DataError naming the actual shape."""
    arr = _to_numpy(x, name, dtype)
    if arr.ndim != 2:
        raise DataError(f"{name} must be 2-D, got shape {arr.shape}")
    return arr


def _vector(x: Any, name: str, dtype: type = np.float64) -> np.ndarray:
    """A non-empty 1-D array, else DataError naming the actual shape."""
    arr = _to_numpy(x, name, dtype)
    if arr.ndim != 1:
        raise DataError(f"{name} must be 1-D, got shape {arr.shape}")
    return arr


def _bool_vector(x: Any, name: str) -> np.ndarray:
    """A non-empty 1-D boolean mask; integer 0/1 input is accepted, other values are refused."""
    arr = _vector(x, name, np.int64)
    if not np.isin(arr, (0, 1)).all():
        raise DataError(f"{name} must be a boolean mask (0/1 values), got values {np.unique(arr)[:10].tolist()}")
    return arr.astype(bool)


def _indices(x: Any, name: str, upper: int) -> np.ndarray:
    """A 1-D integer index array (possibly empty) with every value in ``[0, upper)``."""
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    arr = np.asarray(x)
    if arr.size == 0:
        return np.zeros(0, dtype=np.int64)
    if arr.ndim != 1 or not np.issubdtype(arr.dtype, np.integer):
        raise DataError(f"{name} must be a 1-D array of integer indices, got shape {arr.shape} dtype {arr.dtype}")
    if arr.min() < 0 or arr.max() >= upper:
        raise DataError(f"{name} has indices outside [0, {upper}): min {arr.min()}, max {arr.max()}")
    return arr.astype(np.int64)


def _check_varies(x: np.ndarray, name: str) -> None:
    """Correlation is undefined for fewer than two values or constant input: refuse both clearly."""
    if x.size < 2:
        raise DataError(f"{name} needs at least 2 values to correlate, got {x.size}")
    if np.ptp(x) == 0:
        raise DataError(f"{name} is constant (all {x.flat[0]!r}); correlation is undefined for constant input")


def _same_shape(a: np.ndarray, b: np.ndarray, names: str) -> None:
    """Refuse arrays whose shapes differ, naming both shapes."""
    if a.shape != b.shape:
        raise DataError(f"{names} must have the same shape, got {a.shape} and {b.shape}")


# ---------------------------------------------------------------------------------------------------------------
# correlations


def _correlations(a: np.ndarray, b: np.ndarray) -> dict[str, float]:
    """Pearson, Spearman (average ranks for ties) and Kendall tau-b of two varying 1-D arrays."""
    return {
        "pearson": float(stats.pearsonr(a, b)[0]),
        "spearman": float(stats.spearmanr(a, b)[0]),
        "kendall": float(stats.kendalltau(a, b)[0]),
    }


def score_correlation(a: Any, b: Any, per_row: bool = False) -> dict[str, float]:
    """Pearson/Spearman/Kendall agreement of two score arrays (e.g. exact vs. approximate influence).

    Flattened by default; with ``per_row=True`` both must be 2-D ``[n_test, n_train]`` and the per-row
    correlations are averaged, which ignores per-test scale differences. Constant input raises DataError.
    """
    a_arr, b_arr = _to_numpy(a, "a"), _to_numpy(b, "b")
    _same_shape(a_arr, b_arr, "a and b")
    if not per_row:
        a_flat, b_flat = a_arr.ravel(), b_arr.ravel()
        _check_varies(a_flat, "a")
        _check_varies(b_flat, "b")
        return _correlations(a_flat, b_flat)
    if a_arr.ndim != 2:
        raise DataError(f"per_row=True needs 2-D score matrices [n_test, n_train], got shape {a_arr.shape}")
    rows = [_correlations(*_varying_row(a_arr, b_arr, i)) for i in range(a_arr.shape[0])]
    return {key: float(np.mean([row[key] for row in rows])) for key in ("pearson", "spearman", "kendall")}


def _varying_row(a: np.ndarray, b: np.ndarray, i: int) -> tuple[np.ndarray, np.ndarray]:
    """Row ``i`` of both matrices, refusing a constant row by its index."""
    _check_varies(a[i], f"a[{i}]")
    _check_varies(b[i], f"b[{i}]")
    return a[i], b[i]


# ---------------------------------------------------------------------------------------------------------------
# leave-one-out retraining


def predicted_loo_changes(scores: Any, removed: Sequence[int], n_train: int | None = None) -> np.ndarray:
    """Predicted test-loss change from removing each point, ``scores[:, removed].T / n_train``, shaped like
    :func:`leave_one_out_changes` (``[len(removed), n_test]``) so the two line up without transposing by hand."""
    mat = _matrix(scores, "scores")
    n = mat.shape[1] if n_train is None else n_train
    if n < 1:
        raise DataError(f"n_train must be positive, got {n}")
    idx = _indices(removed, "removed", mat.shape[1])
    if idx.size == 0:
        raise DataError("removed is empty; pass the training indices that were left out")
    return mat[:, idx].T / n


def leave_one_out_changes(
    retrain: Callable[[np.ndarray], Model],
    test_loss: Callable[[Model], Any],
    n_train: int,
    removed: Sequence[int],
    base_model: Model,
) -> np.ndarray:
    """Actual test-loss change ``loss(retrained without j) - loss(base)`` for each ``j`` in ``removed``.

    ``retrain(kept_indices)`` fits a model on the kept training indices (sorted, one left out); ``test_loss(model)``
    returns the per-test losses ``[n_test]``. Returns ``[len(removed), n_test]``; positive = removal hurt.
    """
    if n_train < 2:
        raise DataError(f"leave-one-out needs n_train >= 2, got {n_train}")
    idx = _indices(removed, "removed", n_train)
    if idx.size == 0:
        raise DataError("removed is empty; pass at least one training index to leave out")
    base = _vector(test_loss(base_model), "test_loss(base_model)")
    everything = np.arange(n_train)
    changes = np.empty((idx.size, base.size))
    for row, j in enumerate(idx):
        loss = _vector(test_loss(retrain(np.delete(everything, j))), f"test_loss(model without {j})")
        _same_shape(loss, base, f"test_loss after removing {j} and test_loss(base_model)")
        changes[row] = loss - base
    return changes


def loo_correlation(predicted_change: Any, actual_change: Any) -> dict[str, float]:
    """Pearson and Spearman between predicted (``score / n``) and actual leave-one-out test-loss changes.

    Both arrays are flattened after checking they have the same shape; ``n`` is the number of pairs compared.
    """
    pred = _to_numpy(predicted_change, "predicted_change")
    actual = _to_numpy(actual_change, "actual_change")
    _same_shape(pred, actual, "predicted_change and actual_change")
    pred, actual = pred.ravel(), actual.ravel()
    _check_varies(pred, "predicted_change")
    _check_varies(actual, "actual_change")
    return {
        "pearson": float(stats.pearsonr(pred, actual)[0]),
        "spearman": float(stats.spearmanr(pred, actual)[0]),
        "n": int(pred.size),
    }


# ---------------------------------------------------------------------------------------------------------------
# linear datamodeling score (LDS)


def lds_subsets(n_train: int, m: int, alpha: float = 0.5, seed: int = 0) -> np.ndarray:
    """``m`` random training subsets of ``round(alpha * n_train)`` points each, as a bool mask ``[m, n_train]``."""
    if m < 2:
        raise DataError(f"LDS needs m >= 2 subsets to rank, got m={m}")
    if not 0.0 < alpha < 1.0:
        raise DataError(f"alpha is the kept fraction of the training set and must be in (0, 1), got {alpha}")
    size = round(alpha * n_train)
    if not 0 < size < n_train:
        raise DataError(f"alpha={alpha} of n_train={n_train} keeps {size} points; need between 1 and n_train - 1")
    rng = np.random.default_rng(seed)
    masks = np.zeros((m, n_train), dtype=bool)
    for row in masks:
        row[rng.choice(n_train, size=size, replace=False)] = True
    return masks


def _row_spearman(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Spearman of each column of ``x`` with the same column of ``y`` (average ranks); NaN where one is constant."""
    rx = stats.rankdata(x, axis=0) - (x.shape[0] + 1) / 2
    ry = stats.rankdata(y, axis=0) - (y.shape[0] + 1) / 2
    denom = np.sqrt((rx**2).sum(axis=0) * (ry**2).sum(axis=0))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denom > 0, (rx * ry).sum(axis=0) / denom, np.nan)


def linear_datamodeling_score(scores: Any, subset_masks: Any, actual_outputs: Any) -> tuple[float, np.ndarray]:
    """LDS: per test point, Spearman across subsets of the predicted subset sum ``Σ_{j∈S} score[i, j]`` with the
    actual output of a model trained on ``S``; returns (mean over test points, per-test array ``[n_test]``).

    ``actual_outputs[s, i]`` must be *higher = better supported* (e.g. the correct-class margin, or minus the test
    loss) to match positive = helpful scores. Test points whose predicted sums or outputs are constant across
    subsets get NaN and are left out of the mean.
    """
    mat = _matrix(scores, "scores")
    masks = _matrix(subset_masks, "subset_masks", np.int64)
    outputs = _matrix(actual_outputs, "actual_outputs")
    if not np.isin(masks, (0, 1)).all():
        raise DataError("subset_masks must be a boolean mask [m, n_train] (True = trained on that point)")
    if masks.shape[1] != mat.shape[1]:
        raise DataError(f"subset_masks has {masks.shape[1]} columns but scores has n_train={mat.shape[1]}")
    if outputs.shape != (masks.shape[0], mat.shape[0]):
        raise DataError(f"actual_outputs must be [m, n_test] = {(masks.shape[0], mat.shape[0])}, got {outputs.shape}")
    if masks.shape[0] < 2:
        raise DataError(f"LDS needs at least 2 subsets to rank, got {masks.shape[0]}")
    per_test = _row_spearman(masks.astype(np.float64) @ mat.T, outputs)
    if np.isnan(per_test).all():
        raise DataError("LDS is undefined: every test point has constant predicted sums or constant outputs")
    return float(np.nanmean(per_test)), per_test


def lds_from_retraining(
    retrain: Callable[[np.ndarray], Model],
    output_fn: Callable[[Model], Any],
    scores: Any,
    m: int,
    alpha: float = 0.5,
    seed: int = 0,
) -> tuple[float, np.ndarray]:
    """Draw ``m`` subsets, retrain on each (``retrain(kept_indices)``), and score with the LDS.

    ``output_fn(model)`` returns the per-test outputs ``[n_test]``, higher = better supported (e.g. margins).
    """
    mat = _matrix(scores, "scores")
    masks = lds_subsets(mat.shape[1], m, alpha, seed)
    outputs = np.empty((m, mat.shape[0]))
    for s, mask in enumerate(masks):
        out = _vector(output_fn(retrain(np.flatnonzero(mask))), f"output_fn(model on subset {s})")
        if out.size != mat.shape[0]:
            raise DataError(
                f"output_fn returned {out.size} outputs on subset {s}, but scores has n_test={mat.shape[0]}"
            )
        outputs[s] = out
    return linear_datamodeling_score(mat, masks, outputs)


# ---------------------------------------------------------------------------------------------------------------
# kNN candidate recall


def _candidate_rows(candidates: Any, n_test: int, n_train: int) -> list[np.ndarray]:
    """Candidate index sets per test point, from a ``[n_test, k]`` array or a list of index arrays."""
    if hasattr(candidates, "detach"):
        candidates = candidates.detach().cpu().numpy()
    if isinstance(candidates, np.ndarray) and candidates.ndim != 2:
        raise DataError(f"candidates must be [n_test, k] or a list of index arrays, got shape {candidates.shape}")
    if len(candidates) != n_test:
        raise DataError(f"candidates has {len(candidates)} rows but scores has n_test={n_test}")
    return [_indices(row, f"candidates[{i}]", n_train) for i, row in enumerate(candidates)]


def topm_recall(scores: Any, candidates: Any, m: int, sign: Literal["helpful", "harmful"] = "helpful") -> np.ndarray:
    """Per test point, the share of its top-``m`` helpful (largest) or harmful (most negative) training points,
    ranked by the full scores, that the candidate set contains: how much a kNN pre-filter loses.

    Ties at the top-``m`` boundary are broken by the lower training index.
    """
    mat = _matrix(scores, "scores")
    n_test, n_train = mat.shape
    if not 1 <= m <= n_train:
        raise DataError(f"m must be between 1 and n_train={n_train}, got m={m}")
    if sign not in ("helpful", "harmful"):
        raise DataError(f"sign must be 'helpful' or 'harmful', got {sign!r}")
    rows = _candidate_rows(candidates, n_test, n_train)
    ranked = -mat if sign == "helpful" else mat
    top = np.argsort(ranked, axis=1, kind="stable")[:, :m]
    return np.array([np.isin(top[i], rows[i]).sum() / m for i in range(n_test)])


def chance_recall(k: int, n: int) -> float:
    """Expected :func:`topm_recall` of ``k`` candidates drawn uniformly from ``n`` training points: ``k / n``
    (the same for every ``m``), the baseline a kNN pre-filter must beat."""
    if n < 1:
        raise DataError(f"n (training set size) must be positive, got {n}")
    if not 0 <= k <= n:
        raise DataError(f"k (candidates per test point) must be between 0 and n={n}, got {k}")
    return k / n


# ---------------------------------------------------------------------------------------------------------------
# mislabel detection


def flip_labels(labels: Any, fraction: float, num_classes: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Flip exactly ``round(fraction * n)`` uniformly chosen labels, each to a different uniformly random class,
    to plant known mislabels; returns ``(new_labels, flipped_mask)``."""
    orig = _vector(labels, "labels", np.int64)
    if num_classes < 2:
        raise DataError(f"num_classes must be >= 2 to flip a label to a different class, got {num_classes}")
    if orig.min() < 0 or orig.max() >= num_classes:
        raise DataError(f"labels must lie in [0, {num_classes}), got min {orig.min()}, max {orig.max()}")
    if not 0.0 <= fraction <= 1.0:
        raise DataError(f"fraction must be in [0, 1], got {fraction}")
    rng = np.random.default_rng(seed)
    chosen = rng.choice(orig.size, size=round(fraction * orig.size), replace=False)
    new = orig.copy()
    new[chosen] = (orig[chosen] + rng.integers(1, num_classes, size=chosen.size)) % num_classes
    flipped = np.zeros(orig.size, dtype=bool)
    flipped[chosen] = True
    return new, flipped


def _suspicion_and_mask(suspicion: Any, flipped_mask: Any) -> tuple[np.ndarray, np.ndarray]:
    """Validated 1-D suspicion scores and flipped mask of equal length with at least one flipped point."""
    susp = _vector(suspicion, "suspicion")
    mask = _bool_vector(flipped_mask, "flipped_mask")
    _same_shape(susp, mask, "suspicion and flipped_mask")
    if not mask.any():
        raise DataError("flipped_mask has no flipped points; nothing to detect")
    return susp, mask


def mislabel_auc(suspicion: Any, flipped_mask: Any) -> float:
    """ROC AUC of a suspicion score (larger = more suspicious) at separating flipped from clean labels.

    For self-influence the suspicion is ``∇L(z)ᵀ H⁻¹ ∇L(z)``: points the model can only fit by bending around them.
    """
    susp, mask = _suspicion_and_mask(suspicion, flipped_mask)
    if mask.all():
        raise DataError("flipped_mask has no clean points; AUC needs both flipped and clean examples")
    ranks = stats.rankdata(susp)  # average ranks: a tie between a flipped and a clean point counts one half
    flipped, clean = int(mask.sum()), int((~mask).sum())
    return float((ranks[mask].sum() - flipped * (flipped + 1) / 2) / (flipped * clean))


def detection_curve(suspicion: Any, flipped_mask: Any) -> tuple[np.ndarray, np.ndarray]:
    """Fraction of flipped labels found after inspecting the most suspicious fraction of the data, from (0, 0).

    Returns ``(fraction_inspected, fraction_found)``, each ``[n + 1]``; ties in suspicion keep the data order.
    """
    susp, mask = _suspicion_and_mask(suspicion, flipped_mask)
    order = np.argsort(-susp, kind="stable")
    found = np.concatenate([[0], np.cumsum(mask[order])]) / mask.sum()
    inspected = np.arange(susp.size + 1) / susp.size
    return inspected, found
