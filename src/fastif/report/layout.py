"""Graph layout: test points on one circular arc per group, training points at weighted geometric medians.

A training point lands near the test points it influences most, so shared influence across groups shows up as
points pulled towards the centre and group-specific influence as points hugging one arc. A training point whose
median falls on a test point (it touches that test point alone, or mostly: every point of a pipeline run does) is
moved onto a fan inside the circle next to that test point, strongest nearest the middle, so it and its edge show.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .graph import InfluenceGraph

SIGNS = ("helpful", "harmful")


@dataclass(frozen=True)
class Layout:
    """Positions in the unit disk: ``test`` is [n_test, 2]; ``train[sign]`` is [n_train, 2], NaN where untouched;
    ``strength[sign]`` is [n_train]: the largest |score| of the point's edges of that sign over the edge scale,
    at most 1 (NaN where untouched), which sets the size its dot is drawn at."""

    test: np.ndarray
    train: dict[str, np.ndarray]
    strength: dict[str, np.ndarray]


def arc_layout(groups: list[str], gap: float = 0.25) -> np.ndarray:
    """Place points on the unit circle, one contiguous arc per group, arcs sized by group and ``gap`` radians apart.

    Groups are laid out in order of first appearance, counter-clockwise from the top of the circle.
    """
    order = list(dict.fromkeys(groups))
    members = {group: [i for i, g in enumerate(groups) if g == group] for group in order}
    step = (2 * np.pi - gap * len(order)) / max(len(groups), 1)
    angles = np.empty(len(groups))
    start = np.pi / 2
    for group in order:
        for j, i in enumerate(members[group]):
            angles[i] = start + (j + 0.5) * step
        start += len(members[group]) * step + gap
    return np.stack([np.cos(angles), np.sin(angles)], axis=1)


def geometric_median(points: np.ndarray, weights: np.ndarray, iterations: int = 200, tol: float = 1e-10) -> np.ndarray:
    """Return the point minimising sum_i w_i |y - x_i| (Weiszfeld's iterations with Vardi-Zhang's fix at anchors)."""
    points = np.asarray(points, dtype=np.float64)
    weights = np.asarray(weights, dtype=np.float64)
    y = weights @ points / weights.sum()
    for _ in range(iterations):
        new = _weiszfeld_step(points, weights, y)
        if np.linalg.norm(new - y) <= tol:
            return new
        y = new
    return y


def _weiszfeld_step(points: np.ndarray, weights: np.ndarray, y: np.ndarray) -> np.ndarray:
    """One Vardi-Zhang step: the Weiszfeld update, damped towards ``y`` when ``y`` sits on a data point."""
    distances = np.linalg.norm(points - y, axis=1)
    away = distances > 1e-12
    if not away.any():
        return y
    inverse = weights[away] / distances[away]
    target = inverse @ points[away] / inverse.sum()
    pull = np.linalg.norm(inverse @ (points[away] - y))
    anchored = weights[~away].sum()
    if pull <= anchored:
        return y
    share = anchored / pull
    return (1 - share) * target + share * y


def compute_layout(graph: InfluenceGraph, gap: float = 0.25) -> Layout:
    """Lay out ``graph``: arcs for test points, |score|-weighted geometric medians for each sign's train points,
    fanned out next to the test point where a median falls on one."""
    test = arc_layout([point.group for point in graph.test_points], gap)
    train = {sign: np.full((len(graph.train_points), 2), np.nan) for sign in SIGNS}
    strength = {sign: np.full(len(graph.train_points), np.nan) for sign in SIGNS}
    scale = strength_scale(graph)
    for sign in SIGNS:
        for index, (tests, weights) in _neighbours(graph, sign).items():
            train[sign][index] = geometric_median(test[tests], np.abs(weights))
            strength[sign][index] = min(max(np.abs(weights)) / scale, 1.0)
        _fan_out(train[sign], strength[sign], test)
    return Layout(test, train, strength)


def fan_radius(n_test: int) -> float:
    """How far inside the circle a fanned training point sits: 0.45, less when test points crowd the circle."""
    return min(0.45, 2.2 * float(np.sin(np.pi / max(n_test, 2))))


def _fan_out(train: np.ndarray, strength: np.ndarray, test: np.ndarray, tol: float = 1e-6) -> None:
    """Move training points lying on a test point onto a fan inside the circle, the strongest in the middle."""
    radius = fan_radius(len(test))
    for anchor in test:
        on_it = np.flatnonzero(np.linalg.norm(train - anchor, axis=1) < tol)  # NaN rows compare False
        if not len(on_it):
            continue
        half = min(0.9, 0.18 * (len(on_it) - 1))
        slots = sorted(np.linspace(-half, half, len(on_it)), key=abs)
        inward = np.arctan2(-anchor[1], -anchor[0])
        for index, angle in zip(on_it[np.argsort(-strength[on_it], kind="stable")], slots, strict=True):
            train[index] = anchor + radius * np.array([np.cos(inward + angle), np.sin(inward + angle)])


def _neighbours(graph: InfluenceGraph, sign: str) -> dict[int, tuple[list[int], list[float]]]:
    """Map each training index to the test indices and scores of its edges of one sign."""
    found: dict[int, tuple[list[int], list[float]]] = {}
    for edge in graph.edges:
        if (edge.score > 0) == (sign == "helpful"):
            tests, scores = found.setdefault(edge.train, ([], []))
            tests.append(edge.test)
            scores.append(edge.score)
    return found


# Matplotlib's tab10 palette, shared by the static figure and the HTML explorer so groups keep their colour.
PALETTE = ("#1f77b4", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf", "#2ca02c", "#d62728")
EDGE_COLORS = {"helpful": "#2ca02c", "harmful": "#d62728"}
TRAIN_COLOR = "#333333"


def strength_scale(graph: InfluenceGraph) -> float:
    """|score| at which edges are drawn at full width: the 95th percentile, so one outlier does not fade the rest."""
    scores = np.abs([edge.score for edge in graph.edges])
    return float(np.percentile(scores, 95)) if len(scores) else 1.0


def group_colors(groups: list[str]) -> dict[str, str]:
    """Assign each group a palette colour (green and red come last: they mean helpful and harmful edges)."""
    return {group: PALETTE[i % len(PALETTE)] for i, group in enumerate(groups)}
