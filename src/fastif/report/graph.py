"""The train<->test influence graph (FastIF application 2): points, top-k signed edges, and its JSON form.

Scores follow the package sign convention: positive = helpful (upweighting the training point lowers the test loss).
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ConfigError, DataError
from ..files import atomic_write_json

GRAPH_FORMAT = "fastif.influence_graph"
GRAPH_VERSION = 1


@dataclass(frozen=True)
class TestPoint:
    """One evaluated example: its id, the group it belongs to (e.g. a HANS heuristic), text and labels."""

    __test__ = False  # a library class, not a pytest test class

    id: str
    group: str
    text: str
    gold: str
    predicted: str


@dataclass(frozen=True)
class TrainPoint:
    """One training example that influences at least one test point."""

    id: str
    text: str
    label: str


@dataclass(frozen=True)
class Edge:
    """An influence score between ``test_points[test]`` and ``train_points[train]`` (positive = helpful)."""

    test: int
    train: int
    score: float


@dataclass(frozen=True)
class InfluenceGraph:
    """Test points, the training points they touch, and the signed influence edges between them."""

    test_points: tuple[TestPoint, ...]
    train_points: tuple[TrainPoint, ...]
    edges: tuple[Edge, ...]

    def __post_init__(self) -> None:
        """Refuse edges that point outside the point lists, and non-finite scores."""
        for edge in self.edges:
            if not (0 <= edge.test < len(self.test_points) and 0 <= edge.train < len(self.train_points)):
                raise DataError(
                    f"edge {edge} points outside the {len(self.test_points)} test / "
                    f"{len(self.train_points)} train points; build edges from valid indices"
                )
            if not np.isfinite(edge.score):
                raise DataError(f"edge {edge} has a non-finite score; drop NaN/inf scores before building the graph")

    @property
    def groups(self) -> list[str]:
        """Distinct test-point groups in order of first appearance (the order of the arcs and legends)."""
        return list(dict.fromkeys(point.group for point in self.test_points))

    @classmethod
    def from_scores(
        cls,
        test_points: Sequence[TestPoint],
        train_points: Sequence[TrainPoint],
        scores: np.ndarray,
        candidates: np.ndarray | None = None,
        top: int = 5,
    ) -> InfluenceGraph:
        """Keep each test point's ``top`` most helpful and ``top`` most harmful edges from a score matrix.

        ``scores`` is ``[n_test, n_cand]`` with training indices ``candidates`` of the same shape (kNN-pruned
        FastIF), or dense ``[n_test, n_train]`` when ``candidates`` is None. Zero scores are neither helpful nor
        harmful and are dropped; training points without a kept edge are left out and the rest re-indexed.
        """
        if top < 1:
            raise ConfigError(f"top must be >= 1 (edges kept per test point and sign), got {top}")
        scores, candidates = _check_scores(len(test_points), len(train_points), scores, candidates)
        picked = [(i, int(candidates[i, j]), float(scores[i, j])) for i, j in _top_signed(scores, top)]
        used = sorted({train for _, train, _ in picked})
        new_index = {old: new for new, old in enumerate(used)}
        edges = tuple(Edge(test, new_index[train], score) for test, train, score in picked)
        return cls(tuple(test_points), tuple(train_points[i] for i in used), edges)

    def to_dict(self) -> dict[str, Any]:
        """Return the graph as plain JSON-ready data (tagged with a format name and version)."""
        return {
            "format": GRAPH_FORMAT,
            "version": GRAPH_VERSION,
            "test_points": [dataclasses.asdict(point) for point in self.test_points],
            "train_points": [dataclasses.asdict(point) for point in self.train_points],
            "edges": [[edge.test, edge.train, edge.score] for edge in self.edges],
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> InfluenceGraph:
        """Rebuild a graph from :meth:`to_dict` output, refusing other formats and malformed entries."""
        if not isinstance(data, dict) or data.get("format") != GRAPH_FORMAT or data.get("version") != GRAPH_VERSION:
            raise DataError(f"not a {GRAPH_FORMAT} v{GRAPH_VERSION} file; write it with InfluenceGraph.to_json")
        try:
            tests = tuple(TestPoint(**point) for point in data["test_points"])
            trains = tuple(TrainPoint(**point) for point in data["train_points"])
            edges = tuple(Edge(int(test), int(train), float(score)) for test, train, score in data["edges"])
        except (KeyError, TypeError, ValueError) as error:
            raise DataError(f"malformed influence graph data ({error}); regenerate it with to_json") from error
        return cls(tests, trains, edges)

    def to_json(self, path: str | os.PathLike[str]) -> Path:
        """Write the graph as plain JSON, atomically, so a report can be rebuilt without rescoring."""
        return atomic_write_json(path, self.to_dict())

    @classmethod
    def from_json(cls, path: str | os.PathLike[str]) -> InfluenceGraph:
        """Read a graph written by :meth:`to_json`."""
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as error:
            raise DataError(f"cannot read influence graph {path}: {error}") from error
        return cls.from_dict(data)


def _check_scores(
    n_test: int, n_train: int, scores: np.ndarray, candidates: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray]:
    """Validate shapes, indices and finiteness; return float scores and integer candidate indices."""
    scores = np.asarray(scores, dtype=np.float64)
    if candidates is None:
        if scores.shape != (n_test, n_train):
            raise DataError(
                f"dense scores must be [n_test={n_test}, n_train={n_train}], got {scores.shape}; "
                "pass candidates=[n_test, n_cand] indices for pruned scores"
            )
        candidates = np.broadcast_to(np.arange(n_train), scores.shape)
    candidates = np.asarray(candidates)
    if scores.ndim != 2 or scores.shape[0] != n_test or candidates.shape != scores.shape:
        raise DataError(
            f"scores {scores.shape} and candidates {candidates.shape} must both be [n_test={n_test}, n_cand]"
        )
    if not np.issubdtype(candidates.dtype, np.integer) or (
        candidates.size and (candidates.min() < 0 or candidates.max() >= n_train)
    ):
        raise DataError(f"candidates must be integer indices into the {n_train} training points")
    if candidates.shape[1] > 1 and (np.diff(np.sort(candidates, axis=1), axis=1) == 0).any():
        raise DataError("a test point lists the same training candidate twice; deduplicate the candidate indices")
    if not np.isfinite(scores).all():
        raise DataError("scores contain NaN or inf; check the inverse-HVP solve (damping) before building a graph")
    return scores, candidates


def _top_signed(scores: np.ndarray, top: int) -> list[tuple[int, int]]:
    """Return (row, column) positions of each row's ``top`` largest positive and ``top`` most negative scores."""
    picked = []
    for row, values in enumerate(scores):
        order = np.argsort(-values, kind="stable")
        helpful = [j for j in order[:top] if values[j] > 0]
        harmful = [j for j in order[::-1][:top] if values[j] < 0]
        picked.extend((row, int(j)) for j in helpful + harmful)
    return picked
