"""Candidate selection: a FAISS kNN index over training features (FastIF's first speed-up).

Only the ``k`` training points nearest to a test point in feature space (or to the mean feature of a group of
anchor points) are scored, so the expensive influence computation runs on ``k ≪ N`` candidates. ``"flat"`` is
exact (FastIF's ``IndexFlatL2``); ``"ivf"`` and ``"hnsw"`` are approximate and faster on large ``N``.

Distances follow FAISS: *squared* L2 distances for ``metric="l2"`` (smaller = nearer) and similarities for
``"ip"`` / ``"cosine"`` (larger = nearer); results are always sorted nearest first. ``"cosine"`` normalises the
features and queries to unit length and uses inner products.

A saved index is a folder holding ``index.faiss`` (``faiss.write_index``, never pickle), the config JSON and a
manifest with ``N``, ``d``, the SHA-256 of the float32 features and of the index file, so a caller can check
(:meth:`CandidateIndex.check_features`) that a reloaded index belongs to its features.
"""

from __future__ import annotations

import hashlib
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import faiss
import numpy as np
import torch

from . import progress
from .config import check_number, config_from_dict, save_config
from .errors import ConfigError, DataError, StoreError
from .files import atomic_write, atomic_write_json, read_json
from .fingerprint import file_sha256

IndexType = Literal["flat", "ivf", "hnsw"]
Metric = Literal["l2", "ip", "cosine"]

FORMAT_VERSION = 1
INDEX_FILE = "index.faiss"
CONFIG_FILE = "candidate_config.json"
MANIFEST_FILE = "candidate_manifest.json"
MANIFEST_KEYS = ("format_version", "n", "d", "features_sha256", "index_sha256")
"""What a candidate manifest must hold; a damaged one that lacks any is refused, naming the file."""


@dataclass(frozen=True)
class CandidateConfig:
    """How to build the kNN index over training features; every FAISS knob lives here so runs are reproducible."""

    index: IndexType = "flat"  # "flat" = exact search; "ivf" / "hnsw" = approximate
    metric: Metric = "l2"  # "l2" as FastIF's IndexFlatL2; "ip" = inner product; "cosine" = normalised ip
    nlist: int = 100  # ivf: number of k-means cells (must be <= N)
    nprobe: int = 8  # ivf: cells visited per query (higher = better recall, slower)
    hnsw_m: int = 32  # hnsw: neighbours per graph node (FAISS's M)
    ef_search: int = 64  # hnsw: search beam width (FAISS's efSearch)
    ef_construction: int = 64  # hnsw: build beam width (FAISS's efConstruction)
    seed: int = 1234  # ivf: k-means seed, so the same features give the same index

    def __post_init__(self) -> None:
        """Refuse unknown index types or metrics and non-positive sizes at construction time."""
        for name, allowed in (("index", typing.get_args(IndexType)), ("metric", typing.get_args(Metric))):
            if getattr(self, name) not in allowed:
                raise ConfigError(f"CandidateConfig.{name} must be one of {allowed}, got {getattr(self, name)!r}")
        for field in ("nlist", "nprobe", "hnsw_m", "ef_search", "ef_construction"):
            check_number(f"candidates.faiss.{field}", getattr(self, field), integer=True, minimum=1)
        check_number("candidates.faiss.seed", self.seed, integer=True, minimum=0, below=2**32)
        if self.nprobe > self.nlist:
            raise ConfigError(
                f"CandidateConfig.nprobe={self.nprobe} exceeds nlist={self.nlist}; "
                f"set nprobe <= nlist (nprobe={self.nlist} visits every cell)"
            )


def _as_matrix(values: np.ndarray | torch.Tensor, what: str, allow_vector: bool = False) -> np.ndarray:
    """Return ``values`` as a finite, C-contiguous float32 matrix [n, d], or raise DataError saying what is wrong."""
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu().float().numpy()
    array = np.asarray(values)
    if allow_vector and array.ndim == 1:
        array = array[None, :]
    if array.ndim != 2:
        raise DataError(f"{what} must be a 2-D array [n, d], got shape {tuple(array.shape)}")
    if array.shape[0] == 0 or array.shape[1] == 0:
        raise DataError(f"{what} is empty (shape {tuple(array.shape)}); give at least one row of features")
    if array.dtype.kind not in "biuf":
        raise DataError(f"{what} must be numeric, got dtype {array.dtype}")
    array = np.ascontiguousarray(array, dtype=np.float32)
    finite = np.isfinite(array).all(axis=1)
    if not finite.all():
        bad = np.flatnonzero(~finite)
        raise DataError(
            f"{what} has non-finite values (NaN/inf, possibly float32 overflow) in {bad.size} row(s), "
            f"first at row {int(bad[0])}; fix or drop those examples"
        )
    return array


def _normalise(array: np.ndarray, what: str) -> np.ndarray:
    """Scale rows to unit L2 norm for cosine similarity; zero rows have no direction and are refused."""
    norms = np.linalg.norm(array, axis=1, keepdims=True)
    zero = np.flatnonzero(norms[:, 0] == 0)
    if zero.size:
        raise DataError(
            f"{what} has {zero.size} all-zero row(s), first at row {int(zero[0])}; "
            "cosine similarity needs non-zero vectors (use metric='l2' or drop them)"
        )
    return np.ascontiguousarray(array / norms, dtype=np.float32)


def features_fingerprint(features: np.ndarray | torch.Tensor) -> str:
    """SHA-256 of the features as C-contiguous float32 bytes; tells whether an index was built on these features."""
    return hashlib.sha256(_as_matrix(features, "features").tobytes()).hexdigest()


def _new_index(config: CandidateConfig, d: int) -> faiss.Index:
    """An empty FAISS index of the configured type and metric for ``d``-dimensional vectors."""
    metric = faiss.METRIC_L2 if config.metric == "l2" else faiss.METRIC_INNER_PRODUCT
    flat = faiss.IndexFlatL2 if config.metric == "l2" else faiss.IndexFlatIP
    if config.index == "flat":
        return flat(d)
    if config.index == "ivf":
        index = faiss.IndexIVFFlat(flat(d), d, config.nlist, metric)
        index.cp.seed = config.seed
        return index
    index = faiss.IndexHNSWFlat(d, config.hnsw_m, metric)
    index.hnsw.efConstruction = config.ef_construction
    return index


def _apply_search_params(index: faiss.Index, config: CandidateConfig) -> None:
    """Set the search-time knobs (nprobe / efSearch) from the config, after building or loading."""
    if config.index == "ivf":
        index.nprobe = config.nprobe
    elif config.index == "hnsw":
        index.hnsw.efSearch = config.ef_search


class CandidateIndex:
    """A kNN index over N training feature vectors, returning the nearest training indices for test features."""

    def __init__(self, index: faiss.Index, config: CandidateConfig, fingerprint: str) -> None:
        self.index = index
        self.config = config
        self.fingerprint = fingerprint
        _apply_search_params(index, config)

    @property
    def n(self) -> int:
        """Number of indexed training points (N)."""
        return int(self.index.ntotal)

    @property
    def d(self) -> int:
        """Feature dimension (d)."""
        return int(self.index.d)

    @classmethod
    def build(cls, features: np.ndarray | torch.Tensor, config: CandidateConfig | None = None) -> CandidateIndex:
        """Index the training ``features`` [N, d]; row i of ``features`` is training point i."""
        config = config or CandidateConfig()
        array = _as_matrix(features, "features")
        fingerprint = hashlib.sha256(array.tobytes()).hexdigest()
        if config.metric == "cosine":
            array = _normalise(array, "features")
        n, d = array.shape
        if config.index == "ivf" and config.nlist > n:
            raise ConfigError(
                f"CandidateConfig.nlist={config.nlist} exceeds the {n} training points; "
                f"use nlist <= {n} (about sqrt(N) = {max(1, round(n**0.5))} is typical) or index='flat'"
            )
        index = _new_index(config, d)
        if config.index == "ivf":
            index.train(array)
        index.add(array)
        return cls(index, config, fingerprint)

    def _queries(self, queries: np.ndarray | torch.Tensor, what: str) -> np.ndarray:
        """Validate query features against the index's dimension."""
        array = _as_matrix(queries, what, allow_vector=True)
        if array.shape[1] != self.d:
            raise DataError(
                f"{what} have dimension {array.shape[1]} but the index was built on {self.d}-dimensional features; "
                "compute queries with the same model and layer as the training features"
            )
        return array

    def _check_k(self, k: int) -> None:
        """Refuse k outside 1..N with a message that says N and a usable k."""
        if not isinstance(k, int | np.integer) or isinstance(k, bool) or k <= 0:
            raise ConfigError(f"k must be a positive integer, got {k!r}; e.g. k={min(100, self.n)}")
        if k > self.n:
            raise DataError(
                f"k={k} exceeds the number of indexed training points N={self.n}; use k <= {self.n} "
                f"(k={self.n} ranks every training point)"
            )

    def search(self, queries: np.ndarray | torch.Tensor, k: int) -> tuple[np.ndarray, np.ndarray]:
        """``(distances [q, k] float32, indices [q, k] int64)`` of each query's k nearest points, nearest first."""
        array = self._queries(queries, "queries")
        self._check_k(k)
        if self.config.metric == "cosine":
            array = _normalise(array, "queries")
        distances, indices = self.index.search(array, int(k))
        if (indices < 0).any():
            knob = "nprobe" if self.config.index == "ivf" else "ef_search"
            raise ConfigError(
                f"the {self.config.index} index found fewer than k={k} neighbours for some queries; "
                f"raise CandidateConfig.{knob} (now {getattr(self.config, knob)}), lower k, or use index='flat'"
            )
        return distances, indices.astype(np.int64, copy=False)

    def search_mean(self, anchor_features: np.ndarray | torch.Tensor, k: int) -> np.ndarray:
        """Indices [k] nearest to the mean of the raw anchor features [a, d], as FastIF queries for a group."""
        anchors = self._queries(anchor_features, "anchor features")
        mean = anchors.astype(np.float64).mean(axis=0, keepdims=True).astype(np.float32)
        return self.search(mean, k)[1][0]

    def check_features(self, features: np.ndarray | torch.Tensor) -> None:
        """Raise StoreError unless ``features`` are exactly the ones this index was built on (shape and bytes)."""
        array = _as_matrix(features, "features")
        if array.shape != (self.n, self.d):
            raise StoreError(
                f"the candidate index holds {self.n}x{self.d} features but these are "
                f"{array.shape[0]}x{array.shape[1]}; rebuild the index for this dataset and model"
            )
        if hashlib.sha256(array.tobytes()).hexdigest() != self.fingerprint:
            raise StoreError(
                "the candidate index was built on different features (fingerprint mismatch); "
                "rebuild it for this dataset and model"
            )

    def save(self, folder: str | Path) -> Path:
        """Write the index, its config and a manifest into ``folder`` atomically (index first, manifest last)."""
        folder = Path(folder)
        index_hash: list[str] = []

        def write_index(tmp: str) -> None:
            faiss.write_index(self.index, tmp)
            index_hash.append(file_sha256(tmp))

        atomic_write(folder / INDEX_FILE, write_index)
        save_config(self.config, folder / CONFIG_FILE)
        manifest = {
            "format_version": FORMAT_VERSION,
            "n": self.n,
            "d": self.d,
            "features_sha256": self.fingerprint,
            "index_sha256": index_hash[0],
            "faiss_version": faiss.__version__,
        }
        atomic_write_json(folder / MANIFEST_FILE, manifest)
        return folder

    @classmethod
    def load(cls, folder: str | Path) -> CandidateIndex:
        """Read an index saved by :meth:`save`, verifying the index file's checksum, N and d."""
        folder = Path(folder)
        for name in (INDEX_FILE, CONFIG_FILE, MANIFEST_FILE):
            if not (folder / name).is_file():
                raise StoreError(f"no candidate index in {folder}: {name} is missing; rebuild and save the index")
        manifest = _read_json(folder / MANIFEST_FILE)
        missing = [key for key in MANIFEST_KEYS if key not in manifest]
        if missing:
            raise StoreError(f"{folder / MANIFEST_FILE} lacks {missing} (damaged?); delete {folder} and rebuild")
        if manifest.get("format_version") != FORMAT_VERSION:
            raise StoreError(
                f"{folder / MANIFEST_FILE} has format version {manifest.get('format_version')!r}, "
                f"this fastif reads {FORMAT_VERSION}; rebuild the index"
            )
        config = config_from_dict(CandidateConfig, _read_json(folder / CONFIG_FILE))
        if file_sha256(folder / INDEX_FILE) != manifest.get("index_sha256"):
            raise StoreError(f"{folder / INDEX_FILE} is corrupt (checksum mismatch); delete {folder} and rebuild")
        try:
            index = faiss.read_index(str(folder / INDEX_FILE))
        except RuntimeError as err:
            raise StoreError(f"cannot read {folder / INDEX_FILE}: {err}; delete {folder} and rebuild") from err
        if (index.ntotal, index.d) != (manifest.get("n"), manifest.get("d")):
            raise StoreError(f"{folder / INDEX_FILE} does not match its manifest; delete {folder} and rebuild")
        return cls(index, config, str(manifest["features_sha256"]))


def _read_json(path: Path) -> dict[str, Any]:
    """Parse a JSON object file, raising StoreError if it is unreadable."""
    data = read_json(path, StoreError, "delete it and rebuild")
    if not isinstance(data, dict):
        raise StoreError(f"{path} does not hold a JSON object; delete it and rebuild")
    return data


def compute_features(adapter: Any, data: Any, batch_size: int = 64) -> torch.Tensor:
    """Feature vectors [N, d] of every example of ``data`` from ``adapter.features`` (eval mode, no gradients), in
    dataset order; computed shortest example first when the dataset knows its lengths (less padding)."""
    from .data import iter_batches, length_order

    order = length_order(data, range(len(data)))
    parts = []
    with progress.task("features", len(data), "ex") as advance:
        for chunk, batch in iter_batches(data, batch_size, order):
            parts.append(adapter.features(adapter.to_device(batch)).detach().cpu())
            advance(len(chunk))
    rows = torch.cat(parts).float()
    features = torch.empty_like(rows)
    features[order] = rows
    return features
