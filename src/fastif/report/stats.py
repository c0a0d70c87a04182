"""Summary statistics of an influence graph: helpful/harmful shares per group and cross-group correlations.

FastIF compares groups by correlating each training point's influence on them (0.99 across HANS heuristics,
0.67 between the constituent heuristic and MNLI): high correlation means the groups rely on the same data.
"""

from __future__ import annotations

import itertools
import math
from typing import Any

import numpy as np

from .graph import InfluenceGraph

MIN_SHARED = 3


def graph_statistics(graph: InfluenceGraph) -> dict[str, Any]:
    """Return per-group edge shares by sign and Pearson correlations of per-training-point influence between groups."""
    per_group = _influence_per_group(graph)
    return {
        "n_test": len(graph.test_points),
        "n_train": len(graph.train_points),
        "n_edges": len(graph.edges),
        "groups": {group: _sign_shares(graph, group) for group in graph.groups},
        "correlations": [
            _correlation(a, b, per_group[a], per_group[b]) for a, b in itertools.combinations(graph.groups, 2)
        ],
    }


def _sign_shares(graph: InfluenceGraph, group: str) -> dict[str, Any]:
    """Count a group's helpful and harmful edges and their shares of its edges and of its total |score|."""
    scores = np.array([edge.score for edge in graph.edges if graph.test_points[edge.test].group == group])
    helpful, harmful = scores[scores > 0], scores[scores < 0]
    total_mass = np.abs(scores).sum()
    return {
        "n_test": sum(point.group == group for point in graph.test_points),
        "n_edges": len(scores),
        "n_helpful": len(helpful),
        "n_harmful": len(harmful),
        "helpful_share": len(helpful) / len(scores) if len(scores) else math.nan,
        "harmful_share": len(harmful) / len(scores) if len(scores) else math.nan,
        "helpful_mass_share": float(helpful.sum() / total_mass) if total_mass else math.nan,
        "harmful_mass_share": float(-harmful.sum() / total_mass) if total_mass else math.nan,
    }


def _influence_per_group(graph: InfluenceGraph) -> dict[str, dict[int, float]]:
    """Sum each training point's edge scores to the test points of every group it touches."""
    sums: dict[str, dict[int, float]] = {group: {} for group in graph.groups}
    for edge in graph.edges:
        group = sums[graph.test_points[edge.test].group]
        group[edge.train] = group.get(edge.train, 0.0) + edge.score
    return sums


def _correlation(a: str, b: str, left: dict[int, float], right: dict[int, float]) -> dict[str, Any]:
    """Pearson correlation over training points touched by both groups; NaN with a note when undefined."""
    shared = sorted(left.keys() & right.keys())
    x = np.array([left[i] for i in shared])
    y = np.array([right[i] for i in shared])
    result: dict[str, Any] = {"groups": [a, b], "n_shared": len(shared), "pearson": math.nan, "note": None}
    if len(shared) < MIN_SHARED:
        result["note"] = f"only {len(shared)} training point(s) shared; need at least {MIN_SHARED}"
    elif x.std() == 0 or y.std() == 0:
        result["note"] = "influence is constant over the shared training points in one group"
    else:
        result["pearson"] = float(np.corrcoef(x, y)[0, 1])
    return result
