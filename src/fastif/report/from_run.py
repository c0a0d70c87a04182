"""Influence graphs of finished runs: read a stored run (or a graph, or a pipeline report), take its statistics,
and report it.

A *run* is the full candidate score matrix of many test points (each with a group, e.g. a HANS heuristic) against
their kNN training candidates, with the texts and labels the explorer shows. :mod:`fastif.applications.
influence_graph` computes it and saves it as ``influence_run.json`` in a run folder; :func:`report_run` turns any
run folder (or a folder holding a ``graph.json``) into the static PNG/SVG, the HTML explorer and
``graph_stats.json``. Statistics are taken twice: over **all** candidate edges (FastIF's helpful/harmful shares and
cross-group correlations) and over the displayed top edges (whose sign shares are balanced by construction, since
each test point keeps its ``top`` helpful and ``top`` harmful edges).
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import os
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
from scipy import stats as scipy_stats

from ..errors import DataError
from ..files import atomic_write_json, check_writable, jsonable, read_json
from . import write_report
from .graph import Edge, InfluenceGraph, TestPoint, TrainPoint
from .stats import MIN_SHARED, graph_statistics

RUN_FORMAT = "fastif.influence_run"
RUN_VERSION = 1
RUN_FILE = "influence_run.json"
GRAPH_FILE = "graph.json"
PIPELINE_FILE = "influence.json"
STATS_FILE = "graph_stats.json"


@dataclass(frozen=True)
class InfluenceRun:
    """Test points, the training points among their candidates, and each test point's candidate scores.

    ``candidates[i]`` indexes ``train_points`` (the union of every test point's candidates) and ``scores[i, j]``
    is the influence of ``train_points[candidates[i, j]]`` on ``test_points[i]`` (positive = helpful).
    """

    test_points: tuple[TestPoint, ...]
    train_points: tuple[TrainPoint, ...]
    candidates: np.ndarray
    scores: np.ndarray
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        """Refuse mismatched shapes now, so a bad run fails when built rather than when reported."""
        candidates, scores = np.asarray(self.candidates), np.asarray(self.scores, dtype=np.float64)
        if candidates.shape != scores.shape or candidates.ndim != 2 or len(candidates) != len(self.test_points):
            raise DataError(
                f"candidates {candidates.shape} and scores {scores.shape} must both be [n_test, k] with n_test = "
                f"{len(self.test_points)}; rebuild the run"
            )
        if candidates.size and (candidates.min() < 0 or candidates.max() >= len(self.train_points)):
            raise DataError(f"candidate indices must lie in [0, {len(self.train_points)}); rebuild the run")
        object.__setattr__(self, "candidates", candidates.astype(np.int64))
        object.__setattr__(self, "scores", scores)

    def graph(self, top: int | None = None) -> InfluenceGraph:
        """The influence graph keeping each test point's ``top`` helpful and harmful edges (None: every edge)."""
        keep = self.candidates.shape[1] if top is None else top
        return InfluenceGraph.from_scores(self.test_points, self.train_points, self.scores, self.candidates, keep)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready data, tagged with a format name and version."""
        return {
            "format": RUN_FORMAT,
            "version": RUN_VERSION,
            "meta": self.meta,
            "test_points": [dataclasses.asdict(point) for point in self.test_points],
            "train_points": [dataclasses.asdict(point) for point in self.train_points],
            "candidates": self.candidates.tolist(),
            "scores": self.scores.tolist(),
        }

    @classmethod
    def from_dict(cls, data: Any) -> InfluenceRun:
        """Rebuild a run from :meth:`to_dict` output, refusing other formats and malformed entries."""
        if not isinstance(data, dict) or data.get("format") != RUN_FORMAT or data.get("version") != RUN_VERSION:
            raise DataError(f"not a {RUN_FORMAT} v{RUN_VERSION} file; write it with InfluenceRun.to_json")
        try:
            tests = tuple(TestPoint(**point) for point in data["test_points"])
            trains = tuple(TrainPoint(**point) for point in data["train_points"])
            candidates = np.asarray(data["candidates"], dtype=np.int64).reshape(len(tests), -1)
            scores = np.asarray(data["scores"], dtype=np.float64).reshape(len(tests), -1)
        except (KeyError, TypeError, ValueError) as error:
            raise DataError(f"malformed influence run data ({error}); regenerate it") from error
        return cls(tests, trains, candidates, scores, dict(data.get("meta") or {}))

    def to_json(self, path: str | os.PathLike[str]) -> Path:
        """Write the run as plain JSON, atomically."""
        return atomic_write_json(path, jsonable(self.to_dict()))

    @classmethod
    def from_json(cls, path: str | os.PathLike[str]) -> InfluenceRun:
        """Read a run written by :meth:`to_json`."""
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as error:
            raise DataError(f"cannot read influence run {path}: {error}") from error
        return cls.from_dict(data)


def write_run(run: InfluenceRun, run_dir: str | os.PathLike[str]) -> Path:
    """Save a run as ``RUN_DIR/influence_run.json``."""
    return run.to_json(Path(run_dir) / RUN_FILE)


# ---------------------------------------------------------------------------------------------- statistics


def run_statistics(run: InfluenceRun, top: int) -> dict[str, Any]:
    """Sign shares and cross-group correlations over all candidate edges and over the displayed top edges."""
    full = run.graph()
    return {
        "all_candidate_edges": {**graph_statistics(full), "rank_correlations": rank_correlations(full)},
        "displayed_edges": {"top_per_sign": top, **graph_statistics(run.graph(top))},
        "mean_score_by_group": mean_score_by_group(run),
    }


def rank_correlations(graph: InfluenceGraph) -> list[dict[str, Any]]:
    """Spearman correlations of per-training-point summed influence between groups (robust to heavy tails)."""
    sums: dict[str, dict[int, float]] = {group: {} for group in graph.groups}
    for edge in graph.edges:
        group = sums[graph.test_points[edge.test].group]
        group[edge.train] = group.get(edge.train, 0.0) + edge.score
    results = []
    for a, b in itertools.combinations(graph.groups, 2):
        shared = sorted(sums[a].keys() & sums[b].keys())
        value = math.nan
        if len(shared) >= MIN_SHARED:
            x, y = [sums[a][i] for i in shared], [sums[b][i] for i in shared]
            if np.std(x) > 0 and np.std(y) > 0:
                value = float(scipy_stats.spearmanr(x, y).statistic)
        results.append({"groups": [a, b], "n_shared": len(shared), "spearman": value})
    return results


def mean_score_by_group(run: InfluenceRun) -> dict[str, dict[str, Any]]:
    """Per group: mean and median candidate score, the share of mispredicted test points and their gold labels."""
    result = {}
    for group in dict.fromkeys(point.group for point in run.test_points):
        rows = [i for i, point in enumerate(run.test_points) if point.group == group]
        values = run.scores[rows]
        points = [run.test_points[i] for i in rows]
        result[group] = {
            "mean": float(values.mean()),
            "median": float(np.median(values)),
            "share_wrongly_predicted": float(np.mean([point.gold != point.predicted for point in points])),
            "gold_labels": dict(Counter(point.gold for point in points)),
        }
    return result


# ---------------------------------------------------------------------------------------------- reporting


def load_graph_source(run_dir: str | os.PathLike[str]) -> InfluenceRun | InfluenceGraph:
    """What ``run_dir`` holds, in this order: a run (``influence_run.json``), a graph (``graph.json``), or the
    pipeline's report (``influence.json``: each explained test point's top helpful and harmful rows)."""
    folder = Path(run_dir)
    if not folder.is_dir():
        raise DataError(f"run folder {folder} does not exist; pass the folder a finished run wrote")
    if (folder / RUN_FILE).is_file():
        return InfluenceRun.from_json(folder / RUN_FILE)
    if (folder / GRAPH_FILE).is_file():
        return InfluenceGraph.from_json(folder / GRAPH_FILE)
    if (folder / PIPELINE_FILE).is_file():
        return graph_from_pipeline_report(read_json(folder / PIPELINE_FILE))
    raise DataError(
        f"{folder} holds none of {RUN_FILE}, {GRAPH_FILE} or {PIPELINE_FILE}; point at the output folder of "
        "'fastif influence' (or 'fastif demo') or of an influence-graph experiment"
    )


def _pair_text(row: Mapping[str, Any]) -> str:
    """``premise ||| hypothesis`` (or just the premise) of a pipeline row."""
    hypothesis = row.get("hypothesis")
    return str(row.get("premise")) if hypothesis is None else f"{row.get('premise')} ||| {hypothesis}"


def _pipeline_test_point(number: int, item: Mapping[str, Any]) -> TestPoint:
    """The test point (or anchor group, joined) of one explained item of a pipeline report."""
    tests = item["group"] if "group" in item else [item["test"]]
    gold, predicted = ("; ".join(str(test.get(key)) for test in tests) for key in ("label", "predicted"))
    source = str(tests[0].get("source", "test")) if "test" in item else "anchor group"
    return TestPoint(f"query:{number}", source, " || ".join(_pair_text(t) for t in tests), gold, predicted)


def graph_from_pipeline_report(report: Any) -> InfluenceGraph:
    """An influence graph from the pipeline's ``influence.json``: each explained point and its top rows.

    Test points are grouped by their source; when there is only one source they are grouped by whether the
    model predicted them correctly (so the figure still has arcs to compare).
    """
    try:
        items = report["explained"]
        tests = [_pipeline_test_point(number, item) for number, item in enumerate(items)]
        rows = [
            (number, row) for number, item in enumerate(items) for kind in ("helpful", "harmful") for row in item[kind]
        ]
        trains = {int(row["train_index"]): row for _, row in rows}
    except (KeyError, TypeError, ValueError) as error:
        raise DataError(f"malformed pipeline report ({error}); regenerate it with 'fastif influence'") from error
    if len({point.group for point in tests}) == 1:
        tests = [replace(t, group="correct" if t.gold == t.predicted else "wrong") for t in tests]
    order = sorted(trains)
    position = {index: i for i, index in enumerate(order)}
    train_points = tuple(TrainPoint(f"train:{i}", _pair_text(trains[i]), str(trains[i].get("label"))) for i in order)
    edges = {(number, position[int(row["train_index"])]): float(row["score"]) for number, row in rows}
    return InfluenceGraph(
        tuple(tests), train_points, tuple(Edge(t, j, score) for (t, j), score in edges.items() if score != 0)
    )


def report_run(
    run_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str] | None = None,
    top: int = 5,
    title: str = "FastIF influence explorer",
) -> dict[str, Path]:
    """Write the PNG/SVG figure, the HTML explorer and ``graph_stats.json`` for a finished run folder.

    Output goes to ``out_dir`` (default ``RUN_DIR/report``). For a run, the graph keeps each test point's ``top``
    helpful and ``top`` harmful edges and the statistics cover all candidate edges as well.
    """
    source = load_graph_source(run_dir)
    out = check_writable(Path(out_dir) if out_dir is not None else Path(run_dir) / "report")
    graph = source.graph(top) if isinstance(source, InfluenceRun) else source
    paths = write_report(graph, out, title)
    if isinstance(source, InfluenceRun):
        stats = {**graph_statistics(graph), **run_statistics(source, top), "meta": source.meta}
        paths["stats"] = atomic_write_json(out / STATS_FILE, jsonable(stats))
    return paths


def summary_lines(stats: Mapping[str, Any]) -> list[str]:
    """Human-readable lines: helpful share per group and the correlations, over all candidate edges if present."""
    scope = stats.get("all_candidate_edges", stats)
    lines = [f"{scope['n_test']} test points, {scope['n_train']} training points, {scope['n_edges']} edges"]
    for group, shares in scope["groups"].items():
        share = shares["helpful_share"]
        lines.append(f"  {group:<16} helpful edges {'n/a' if share is None else f'{100 * share:.0f}%'}")
    for item in scope["correlations"]:
        value = item["pearson"]
        shown = "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:+.2f}"
        lines.append(f"  pearson {item['groups'][0]} ~ {item['groups'][1]}: {shown} (n_shared={item['n_shared']})")
    return lines
