"""Recall you can see: how much of the exact top-k a reranked candidate set holds, estimated from its own errors.

After retrieval by approximate (projected) scores a_j and exact reranking of the K candidates, the points that can
still be missing from the exact top-k are the non-candidates whose exact score beats the k-th best exact score τ
found among the candidates. Their exact scores are unknown, so the projection's error is modelled and calibrated
on the candidates, where both scores are known:

* **Error model.** exact_j = a_j + σ·s_j·t_j with t_j ~ N(0, 1) and s_j a per-point scale. JL error is
  proportional to the projected norms (its std is about ‖q‖‖g_j‖/√d), so pass s_j = ‖P g_j‖
  (``GradientStore.norms``); without a scale the error is taken as homoscedastic.
* **Calibration.** exact ≈ α + β·a_j + σ·s_j·t_j is fitted by weighted least squares on the K candidates (a
  fitted β ≤ 0, possible on a narrow candidate range, falls back to β = 1). The
  candidates were selected on a, and selecting on the regressor leaves the regression of exact on a unbiased, so
  the fit carries over to the non-candidates just below the cut, the only ones that matter; it also captures the
  shrinkage of exact scores towards the bulk (β < 1) that a plain "exact = a + noise" model misses, which on the
  test's synthetic case made that model's estimate 0.1-0.16 too low. σ's confidence interval comes from the χ² law
  with K - 2 degrees of freedom (the uncertainty of α and β is not propagated).
* **Misses.** Non-candidate j beats τ with probability Φ̄((τ − α − β a_j)/(σ s_j)). A seeded Monte Carlo draws the
  exact scores of every non-candidate with a non-negligible probability (by inverse transform, so only the draws
  that beat τ become scores), recomputes the exact top-k of candidates plus draws, and counts how many of its
  members are non-candidates: recall = 1 − misses/k. ``estimate`` is its mean at σ; ``lower`` / ``upper`` are the
  (1 ∓ confidence)/2 quantiles at σ's upper / lower confidence limit, a prediction interval for the realised
  recall that also covers the calibration's uncertainty.
* **Warning.** When the estimate is below ``threshold`` the result says so and suggests the K at which the
  expected misses fall to (1 − threshold)·k (taking the most likely missing points into the candidates first).

The other option, scoring a seeded random sample of non-candidates exactly, was not used: the top-k points are a
tiny fraction of N, so a sample affordable at query time almost never contains one and bounds nothing useful.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.stats import chi2, norm

from .errors import DataError

NEGLIGIBLE = 1e-7
"""Non-candidates less likely than this (at σ's upper limit) to beat τ are left out of the simulation."""


@dataclass(frozen=True)
class RecallEstimate:
    """Estimated recall@k of a candidate set, a prediction interval for it, and a warning when K is too small."""

    estimate: float
    lower: float
    upper: float
    expected_misses: float  # Σ_j P(non-candidate j beats τ) at σ (an upper bound on the expected misses)
    sigma: float  # calibrated error scale
    suggested_k: int  # candidates needed for expected misses <= (1 - threshold)·k
    warning: str | None


def _vector(values: np.ndarray, what: str, length: int | None = None) -> np.ndarray:
    """A finite float64 vector (of ``length``), or DataError saying what is wrong."""
    array = np.asarray(values, dtype=np.float64).reshape(-1)
    if length is not None and array.shape[0] != length:
        raise DataError(f"{what} has {array.shape[0]} values but needs {length}; pass one value per point")
    if not np.isfinite(array).all():
        raise DataError(f"{what} holds NaN or Inf values; compute the scores again (float32 overflow?)")
    return array


def _candidates(candidates: np.ndarray, n: int, k: int) -> np.ndarray:
    """Unique int64 candidate indices in 0..n-1, at least k (and 3) of them."""
    index = np.asarray(candidates).reshape(-1)
    if index.dtype.kind not in "iu" or len(np.unique(index)) != index.size:
        raise DataError("candidates must be unique integer indices of the points")
    if index.size and (index.min() < 0 or index.max() >= n):
        raise DataError(f"candidate indices must lie in 0..{n - 1}")
    if index.size < max(k, 3):
        raise DataError(f"{index.size} candidates cannot hold the top-{k}; retrieve K >= max(k, 3) candidates")
    return index.astype(np.int64)


def _calibrate(approx: np.ndarray, index: np.ndarray, exact: np.ndarray, scale: np.ndarray) -> tuple[np.ndarray, float]:
    """Fit exact ≈ α + β·approx on the candidates (weights 1/s²): the fitted scores of all points and the residual
    scale σ (RMS of the standardised residuals, K - 2 degrees of freedom).

    A fitted β ≤ 0 is replaced by 1 and α refitted: a free fit over the candidates' narrow score range can fall,
    which gives every non-candidate the same fitted score and collapses the estimate to 0 or 1 (measured: 0.0 with
    interval [0, 0] on an MNLI query at N = 40,000 whose measured recall was 0.3-1.0)."""
    weight = 1.0 / scale[index]
    design = np.stack([np.ones(index.size), approx[index]], axis=1)
    slope = np.linalg.lstsq(design * weight[:, None], exact * weight, rcond=None)[0][1]
    slope = float(slope) if slope > 0 else 1.0
    w2 = weight * weight
    intercept = float(np.sum(w2 * (exact - slope * approx[index])) / np.sum(w2))
    fitted = intercept + slope * approx
    residual = (exact - fitted[index]) * weight
    return fitted, float(np.sqrt(np.sum(residual * residual) / (index.size - 2)))


POINT_CHUNK = 8192
"""Non-candidates simulated at a time (bounds the uniforms held in memory to draws × POINT_CHUNK)."""


def _simulated_recalls(
    top: np.ndarray, fitted: np.ndarray, scale: np.ndarray, sigmas: list[float], k: int, draws: int, seed: int
) -> list[np.ndarray]:
    """Recall per draw at each σ in ``sigmas``: the share of the exact top-k of (candidates' top-k ∪ simulated
    non-candidates) that are candidates.

    Non-candidate j's simulated exact score is fitted_j + σ·s_j·Φ̄⁻¹(u_j) with u_j uniform (inverse transform, the
    same uniforms at every σ), so it beats τ = top[-1] iff u_j < Φ̄((τ − fitted_j)/(σ s_j)). Only those few are
    turned into scores: a query costs one uniform per kept non-candidate and draw, not a normal and a partition.
    """
    rng = np.random.default_rng(seed)
    hits: list[list[tuple[np.ndarray, np.ndarray]]] = [[] for _ in sigmas]
    for start in range(0, fitted.size, POINT_CHUNK):
        a, s = fitted[start : start + POINT_CHUNK], scale[start : start + POINT_CHUNK]
        uniforms = rng.random((draws, a.size))
        for found, sigma in zip(hits, sigmas, strict=True):
            spread = np.maximum(sigma * s, 1e-300)
            draw, point = np.nonzero(uniforms < norm.sf((top[-1] - a) / spread))
            found.append((draw, a[point] + spread[point] * norm.isf(uniforms[draw, point])))
    return [_recall_per_draw(top, found, k, draws) for found in hits]


def _recall_per_draw(top: np.ndarray, found: list[tuple[np.ndarray, np.ndarray]], k: int, draws: int) -> np.ndarray:
    """1 − (simulated scores in each draw's pooled top-k) / k: the r-th best simulated score of a draw (from 0) is
    in the top-k iff r < k and it is at least the (k − r)-th best candidate score ``top[k − 1 − r]``."""
    draw = np.concatenate([d for d, _ in found]) if found else np.zeros(0, dtype=np.int64)
    value = np.concatenate([v for _, v in found]) if found else np.zeros(0)
    order = np.lexsort((-value, draw))
    draw, value = draw[order], value[order]
    rank = np.arange(draw.size) - np.searchsorted(draw, draw)
    inside = rank < k
    inside[inside] = value[inside] >= top[k - 1 - rank[inside]]
    return 1.0 - np.bincount(draw[inside], minlength=draws) / k


def estimate_recall(
    approx: np.ndarray,
    candidates: np.ndarray,
    exact: np.ndarray,
    k: int,
    *,
    scale: np.ndarray | None = None,
    largest: bool = True,
    threshold: float = 0.9,
    confidence: float = 0.9,
    draws: int = 512,
    seed: int = 0,
) -> RecallEstimate:
    """Estimate recall@k of the candidates: ``approx`` [N] approximate scores of all points, ``candidates`` [K]
    their indices, ``exact`` [K] their exact scores. ``largest=False`` asks about the most negative (harmful)."""
    approx = _vector(approx, "approx")
    n = approx.shape[0]
    if not isinstance(k, int) or isinstance(k, bool) or not 0 < k <= n:
        raise DataError(f"k must be an integer in 1..{n}, got {k!r}")
    index = _candidates(candidates, n, k)
    exact = _vector(exact, "exact", index.size)
    scale = np.ones(n) if scale is None else np.maximum(_vector(scale, "scale", n), 1e-300)
    if not largest:
        approx, exact = -approx, -exact
    fitted, sigma = _calibrate(approx, index, exact, scale)
    dof = index.size - 2
    tail = (1.0 - confidence) / 2
    sigma_hi = sigma * np.sqrt(dof / chi2.ppf(tail, dof))
    sigma_lo = sigma * np.sqrt(dof / chi2.ppf(1.0 - tail, dof))
    top = np.sort(exact)[::-1][:k]
    others = np.ones(n, dtype=bool)
    others[index] = False
    a, s = fitted[others], scale[others]
    gap = (top[-1] - a) / s
    keep = norm.sf(gap / max(sigma_hi, 1e-300)) > NEGLIGIBLE
    a, s, gap = a[keep], s[keep], gap[keep]
    beat = norm.sf(gap / max(sigma, 1e-300))
    at_sigma, at_high, at_low = _simulated_recalls(top, a, s, [sigma, sigma_hi, sigma_lo], k, draws, seed)
    estimate = float(at_sigma.mean())
    lower = float(np.quantile(at_high, tail))
    upper = float(np.quantile(at_low, 1.0 - tail))
    suggested = index.size + _extra_candidates(beat, (1.0 - threshold) * k)
    warning = None
    if estimate < threshold:
        warning = (
            f"estimated recall@{k} is {estimate:.2f} (interval {min(lower, estimate):.2f}-{max(upper, estimate):.2f}),"
            f" below {threshold}: K={index.size} candidates are too few; retrieve about K={suggested}"
        )
    return RecallEstimate(
        estimate, min(lower, estimate), max(upper, estimate), float(beat.sum()), sigma, suggested, warning
    )


def _extra_candidates(beat: np.ndarray, allowed: float) -> int:
    """How many of the likeliest non-candidates must join the candidates for the rest's Σ P(beat) <= allowed."""
    remaining = beat.sum() - np.concatenate([[0.0], np.cumsum(np.sort(beat)[::-1])])
    return int(np.argmax(remaining <= allowed))
