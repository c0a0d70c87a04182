"""The influence-graph application: score groups of test points (e.g. HANS heuristics) against their kNN training
candidates with :class:`~fastif.influence.Influence` and collect them into an
:class:`~fastif.report.from_run.InfluenceRun`, which :mod:`fastif.report` draws."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import numpy as np

from ...data import Dataset
from ...data.views import example_text
from ...errors import DataError
from ...files import jsonable
from ...influence import Influence
from ...model.predict import dataset_labels, predict
from ...report.from_run import InfluenceRun
from ...report.graph import TestPoint, TrainPoint
from ...store.artifacts import cached_candidate_index
from ..common import solve_summary


def label_name(data: Dataset, label: int) -> str:
    """The name of class ``label`` from the dataset's ``label_names`` when it has them, else the number."""
    names = getattr(data, "label_names", None)
    return names[label] if names is not None and 0 <= label < len(names) else str(label)


def group_test_points(influence: Influence, group: str, data: Dataset) -> list[TestPoint]:
    """Test points of one group with texts, gold labels and the model's predicted labels."""
    gold = dataset_labels(data).tolist()
    predicted = predict(influence.adapter.model, data).argmax(-1).tolist()
    return [
        TestPoint(f"{group}:{i}", group, example_text(data, i), label_name(data, g), label_name(data, p))
        for i, (g, p) in enumerate(zip(gold, predicted, strict=True))
    ]


def compute_run(
    influence: Influence,
    groups: Mapping[str, Dataset],
    k: int,
    index_cache: str | os.PathLike[str] | None = None,
    meta: Mapping[str, Any] | None = None,
) -> InfluenceRun:
    """Score every group's test points against their ``k`` kNN candidates and collect them into one run.

    ``influence.train`` must carry the texts and labels shown for training points (e.g. a TextPairData).
    """
    if not groups:
        raise DataError("give at least one group of test points")
    influence.build_index(cached_candidate_index(lambda: influence.train_features, len(influence.train), index_cache))
    tests: list[TestPoint] = []
    candidates, scores, solves = [], [], {}
    for group, data in groups.items():
        tests += group_test_points(influence, group, data)
        scored = influence.candidate_scores(data, k)
        candidates.append(scored.indices.numpy().astype(np.int64))
        scores.append(scored.scores.detach().double().cpu().numpy())
        solves[group] = solve_summary(scored.solve.info)
    info = {**dict(meta or {}), "solves": jsonable(solves)}
    return _collect(influence.train, tests, np.concatenate(candidates), np.concatenate(scores), info)


def _collect(
    train: Dataset, tests: list[TestPoint], candidates: np.ndarray, scores: np.ndarray, meta: dict[str, Any]
) -> InfluenceRun:
    """Keep only the training points that some test point has as a candidate, re-indexing the candidates."""
    used = np.unique(candidates)
    labels = dataset_labels(train)
    trains = tuple(
        TrainPoint(f"train:{int(i)}", example_text(train, int(i)), label_name(train, int(labels[i]))) for i in used
    )
    return InfluenceRun(tuple(tests), trains, np.searchsorted(used, candidates), scores, meta)
