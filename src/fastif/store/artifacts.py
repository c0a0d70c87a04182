"""Cached artefacts: results that are costly to recompute and depend only on a model and a data set, kept on disk
between runs: the kNN index over a training set's features, and the frozen path's activations."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..candidates import MANIFEST_FILE, CandidateIndex
from ..data import Dataset
from ..files import cache_dir
from ..model.frozen import ActivationData, Encoded, Split
from .store import Store


def index_cache_folder(identity: Mapping[str, Any], root: str | os.PathLike[str] | None = None) -> Path:
    """The folder under ``root`` (default: the cache root's ``indexes``) for artefacts that depend only on
    ``identity`` (JSON-able fingerprints of model and data, and settings), so every command that needs them finds
    the same folder."""
    text = json.dumps(identity, sort_keys=True, default=str)
    return (cache_dir("indexes") if root is None else Path(root)) / hashlib.sha256(text.encode()).hexdigest()[:24]


def cached_candidate_index(
    features: Callable[[], Tensor], n: int, folder: str | os.PathLike[str] | None
) -> CandidateIndex:
    """The kNN index saved in ``folder`` when it holds one for ``n`` points, else built from ``features()`` (e.g.
    ``Influence.train_features``, from the frozen path's one pass) and saved there.

    Key ``folder`` by model and training set (e.g. the trained model's fingerprint): the features depend on both.
    ``folder=None`` builds without caching.
    """
    if folder is not None and (Path(folder) / MANIFEST_FILE).is_file():
        index = CandidateIndex.load(folder)
        if index.n == n:
            return index
    index = CandidateIndex.build(features())
    if folder is not None:
        index.save(folder)
    return index


def _entry_name(split: Split) -> str:
    return f"frozen-{split.layers}-{split.first}{'-first-token' if split.first_token_only else ''}".replace(".", "_")


def has_encoding(store: Store, split: Split) -> bool:
    """Whether ``store`` holds a finished encoding at ``split``."""
    name = _entry_name(split)
    return store.has(f"{name}-states") and store.has(f"{name}-index")


def cached_encoding(store: Store, split: Split, data: Dataset, compute: Callable[[], Encoded]) -> Encoded:
    """The encoding of ``data`` at ``split`` from ``store`` (a Store keyed by this model and data), or ``compute()``
    saved there: activations as a mapped ``.npy`` entry, sizes and features as tensors, named after the split."""
    name = _entry_name(split)
    if has_encoding(store, split):
        index = store.load(f"{name}-index")
        sizes = index["sizes"].tolist()
        offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(int).tolist()
        states = store.load(f"{name}-states")
        activations = ActivationData(data, states, offsets, sizes, split.first_token_only)
        return Encoded(activations, index["features"], bool(store.meta(f"{name}-index")["layer_returns_tuple"]))
    encoded = compute()
    states = encoded.data.states
    store.save_array(f"{name}-states", states if isinstance(states, np.ndarray) else states.numpy())
    index = {"sizes": torch.tensor(encoded.data.sizes), "features": encoded.features}
    store.save(f"{name}-index", index, {"layer_returns_tuple": encoded.layer_returns_tuple, "n": len(data)})
    return encoded
