"""Cached artefacts: results that are costly to recompute and depend only on a model and a data set, kept on disk
between runs. Today: the kNN index over a training set's features."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from ..candidates import MANIFEST_FILE, CandidateIndex, compute_features
from ..data import Dataset


def index_cache_folder(model_path: str | os.PathLike[str], n_train: int) -> Path:
    """Where the kNN index of a cached trained model over its first ``n_train`` training points is kept."""
    path = Path(model_path)
    return path.parent.parent / "indexes" / f"{path.name}_n{n_train}"


def cached_candidate_index(
    adapter: Any, data: Dataset, folder: str | os.PathLike[str] | None, batch_size: int = 64
) -> CandidateIndex:
    """The kNN index saved in ``folder`` when it holds one for ``len(data)`` points, else built and saved there.

    Key ``folder`` by model and training set (e.g. the trained model's fingerprint): the features depend on both.
    ``folder=None`` builds without caching.
    """
    if folder is not None and (Path(folder) / MANIFEST_FILE).is_file():
        index = CandidateIndex.load(folder)
        if index.n == len(data):
            return index
    index = CandidateIndex.build(compute_features(adapter, data, batch_size))
    if folder is not None:
        index.save(folder)
    return index
