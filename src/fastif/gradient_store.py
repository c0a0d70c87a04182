"""Gradient store: every training point's projected loss gradient on disk, searched by projected influence.

:func:`build_store` makes one resumable pass over a training dataset. Examples ``[i·S, (i+1)·S)`` form shard
``i`` (S = ``shard_size``); each shard holds the projected per-example gradients (:class:`~fastif.projection.
Projector`) as a float16 or float32 ``.npy`` entry of a :class:`fastif.store.Store`, whose manifest fingerprints
the whole model state, the data (length and content digest), the parameter selection, the projection and the
dtype, and whose per-shard sidecars hold each file's SHA-256. Shards are written atomically, so an interrupted
build resumes without recomputing finished shards. Rank ``r`` of ``w`` writes shards ``r, r + w, r + 2w, ...``
(rank 0 creates the store, the others attach to it), so the union equals a single-process build shard for shard.

:meth:`GradientStore.open` checks that every shard is present and intact, records the shard list in an ``index``
entry, and answers queries: s_test [k, P] (from any solver) is projected the same way, optionally preconditioned
in the projected space, and a FAISS inner-product index (:class:`fastif.candidates.CandidateIndex`: flat, IVF or
HNSW) returns the K largest approximate scores (helpful) and, searching with the negated query, the K most
negative (harmful). The caller reranks those candidates exactly; :func:`fastif.recall.estimate_recall` then says
how much of the exact top-k they hold.

Bytes per training example on disk: ``projector.dim × 2`` (float16) or ``× 4`` (float32), plus each shard's
128-byte ``.npy`` header and sidecar.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor

from .candidates import CandidateConfig, CandidateIndex
from .config import check_number, config_to_dict
from .data import Dataset, TensorData, iter_batches, length_order
from .errors import ConfigError, DataError, StoreError
from .model.adapter import ModelAdapter
from .projection import ProjectionConfig, Projector
from .store import MANIFEST_FILE, Store, fingerprint_parameters, fingerprint_tensors

StoreDtype = Literal["float16", "float32"]

SHARD_PREFIX = "grads"
INDEX_ENTRY = "index"
FORMAT_VERSION = 1
ATTACH_TIMEOUT_S = 600.0  # how long ranks other than 0 wait for rank 0 to create the store


@dataclass(frozen=True)
class GradientStoreConfig:
    """What a gradient store holds: the projection, the on-disk dtype and the shard size (all fingerprinted)."""

    projection: ProjectionConfig = field(default_factory=ProjectionConfig)
    dtype: StoreDtype = "float16"
    shard_size: int = 1024  # examples per shard file

    def __post_init__(self) -> None:
        """Refuse an unknown dtype or a non-positive shard size at construction time."""
        if self.dtype not in typing.get_args(StoreDtype):
            raise ConfigError(
                f"GradientStoreConfig.dtype must be one of {typing.get_args(StoreDtype)}, got {self.dtype!r}"
            )
        check_number("candidates.gradients.shard_size", self.shard_size, integer=True, minimum=1)


@dataclass(frozen=True)
class ShardDone:
    """Progress after a shard is written (passed to ``on_shard``): which shard, and this rank's totals so far."""

    index: int
    rows: int
    done: int  # shards of this rank finished, counting ones found from an earlier run
    total: int  # shards of this rank
    seconds: float  # since this build started


@dataclass(frozen=True)
class BuildReport:
    """What a :func:`build_store` call did: the shards it computed, the ones it found finished, and its time."""

    folder: Path
    num_shards: int
    computed: list[int]
    reused: list[int]
    dim: int
    seconds: float


@dataclass(frozen=True)
class Retrieval:
    """Candidates per query row: the K largest approximate scores (helpful) and the K most negative (harmful)."""

    helpful: np.ndarray  # [k, K] int64 training indices, largest approximate score first
    helpful_scores: np.ndarray  # [k, K] float32 approximate scores
    harmful: np.ndarray  # [k, K] int64, most negative approximate score first
    harmful_scores: np.ndarray  # [k, K] float32 approximate scores (negative for harmful points)
    scores: np.ndarray  # [k, N] float32 approximate scores of every stored point


def data_fingerprint(data: Dataset) -> str:
    """SHA-256 of the dataset's length and content digest: ``data.fingerprint()`` if it has one, the tensors of a
    :class:`~fastif.data.TensorData`, else nothing (then only the length is checked)."""
    method = getattr(data, "fingerprint", None)
    if callable(method):
        content = str(method())
    elif isinstance(data, TensorData):
        content = fingerprint_tensors(data.tensors)
    else:
        content = None
    return hashlib.sha256(json.dumps({"length": len(data), "content": content}).encode("utf-8")).hexdigest()


def model_fingerprint(adapter: ModelAdapter) -> str:
    """SHA-256 of the model's whole state (frozen parameters and buffers too: they shape every gradient)."""
    return fingerprint_parameters(dict(adapter.model.state_dict()))


def _store_config(adapter: ModelAdapter, n: int, projector: Projector, config: GradientStoreConfig) -> dict[str, Any]:
    """The manifest's config: format, N, parameter selection, projection layout, dtype and shard size."""
    space = adapter.space
    return {
        "gradient_store": {
            "format_version": FORMAT_VERSION,
            "n": n,
            "selection": [[name, list(shape)] for name, shape in zip(space.names, space.shapes, strict=True)],
            "projection": projector.describe(),
            "settings": config_to_dict(config),
        }
    }


def _check_rank(rank: int, world_size: int) -> None:
    """Refuse a rank outside 0..world_size-1."""
    for name, value in (("rank", rank), ("world_size", world_size)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ConfigError(f"{name} must be a non-negative integer, got {value!r}")
    if not 0 <= rank < world_size:
        raise ConfigError(f"rank {rank} is outside 0..{world_size - 1}; pass rank < world_size (torchrun's RANK)")


def _open_store(
    folder: Path,
    fingerprints: tuple[str, str],
    config: dict[str, Any],
    rank: int,
    overwrite: bool,
    barrier: Callable[[], None] | None,
) -> Store:
    """Rank 0 creates or resumes (and locks) the store, then meets the others at ``barrier``; they attach after."""
    model, data = fingerprints
    if rank == 0:
        try:
            return Store.open(
                folder, model_fingerprint=model, data_fingerprint=data, config=config, overwrite=overwrite
            )
        finally:  # also on a refusal, so the other ranks go on to attach and report the same error
            if barrier is not None:
                barrier()
    if barrier is not None:
        barrier()
    deadline = time.monotonic() + ATTACH_TIMEOUT_S
    while not (folder / MANIFEST_FILE).is_file():
        if time.monotonic() > deadline:
            raise StoreError(f"rank {rank} found no gradient store in {folder}; start rank 0 of the build too")
        time.sleep(0.2)
    return Store.attach(folder, model_fingerprint=model, data_fingerprint=data, config=config)


def build_store(
    adapter: ModelAdapter,
    data: Dataset,
    folder: str | os.PathLike[str],
    config: GradientStoreConfig | None = None,
    *,
    rank: int = 0,
    world_size: int = 1,
    batch_size: int = 32,
    chunk_size: int = 32,
    fingerprint: str | None = None,
    overwrite: bool = False,
    on_shard: Callable[[ShardDone], None] | None = None,
    barrier: Callable[[], None] | None = None,
) -> BuildReport:
    """Write this rank's shards of projected per-example gradients of ``data`` at the adapter's current parameters.

    Resumes: finished shards are kept, never recomputed. ``fingerprint`` overrides :func:`data_fingerprint` (for a
    dataset that cannot digest itself). ``on_shard`` is called after each shard (progress bars, ETAs). Concurrent
    ranks pass ``barrier`` (``torch.distributed.barrier``): rank 0 opens the store, clearing stale temporary files,
    before any other rank writes.
    """
    config = config or GradientStoreConfig()
    _check_rank(rank, world_size)
    if len(data) == 0:
        raise DataError("the training dataset is empty; a gradient store needs at least one example")
    folder = Path(folder)
    projector = Projector(adapter, config.projection)
    fingerprints = (model_fingerprint(adapter), fingerprint or data_fingerprint(data))
    manifest_config = _store_config(adapter, len(data), projector, config)
    num_shards = -(-len(data) // config.shard_size)
    mine = list(range(rank, num_shards, world_size))
    started, computed, reused = time.monotonic(), [], []
    store = _open_store(folder, fingerprints, manifest_config, rank, overwrite, barrier)
    try:
        flat = adapter.flat_params()
        for done, index in enumerate(mine, start=1):
            name = Store.shard_name(SHARD_PREFIX, index)
            start, stop = index * config.shard_size, min((index + 1) * config.shard_size, len(data))
            if store.has(name):
                reused.append(index)
            else:
                rows = _shard_rows(projector, flat, data, range(start, stop), batch_size, chunk_size)
                store.save_array(name, _to_storage(rows, config.dtype, name), {"start": start, "stop": stop})
                computed.append(index)
            if on_shard is not None:
                on_shard(ShardDone(index, stop - start, done, len(mine), time.monotonic() - started))
    finally:
        store.close()
    return BuildReport(folder, num_shards, computed, reused, projector.dim, time.monotonic() - started)


def _shard_rows(
    projector: Projector, flat: Tensor, data: Dataset, positions: range, batch_size: int, chunk_size: int
) -> Tensor:
    """Projected gradients [len(positions), dim] of one shard, computed shortest example first, in data order."""
    order = length_order(data, positions)
    rows = [
        projector.project_batch(flat, batch, chunk_size).detach().cpu()
        for _, batch in iter_batches(data, batch_size, [positions[i] for i in order])
    ]
    out = torch.empty(len(positions), projector.dim, dtype=rows[0].dtype)
    out[order] = torch.cat(rows)
    return out


def _to_storage(rows: Tensor, dtype: StoreDtype, name: str) -> np.ndarray:
    """The shard as a numpy array of the store's dtype; DataError if it overflows (float16) or is not finite."""
    array = rows.to(getattr(torch, dtype)).numpy()
    if not np.isfinite(array).all():
        fix = "use dtype='float32'" if dtype == "float16" else "check the model's losses for NaN/Inf"
        raise DataError(f"shard {name!r} has non-finite projected gradients (overflow?); {fix}")
    return array


class GradientStore:
    """A finished gradient store, loaded for queries: N projected gradients of dimension ``dim``."""

    def __init__(self, store: Store, projector: Projector, vectors: np.ndarray, index: CandidateConfig) -> None:
        self.folder = store.folder
        self.manifest = store.manifest
        self.projector = projector
        self.vectors = vectors
        self.norms = np.sqrt(np.einsum("ij,ij->i", vectors, vectors, dtype=np.float64))
        self.index_config = index
        self._index: CandidateIndex | None = None
        self._gram: np.ndarray | None = None

    @property
    def n(self) -> int:
        """Number of stored training points."""
        return int(self.vectors.shape[0])

    @property
    def dim(self) -> int:
        """Projected dimension."""
        return int(self.vectors.shape[1])

    @classmethod
    def open(
        cls,
        folder: str | os.PathLike[str],
        adapter: ModelAdapter,
        data: Dataset,
        config: GradientStoreConfig | None = None,
        *,
        fingerprint: str | None = None,
        index: CandidateConfig | None = None,
    ) -> GradientStore:
        """Load a finished store for this adapter and data, refusing one from another model, data, selection or
        config (``config=None`` accepts the stored one) and any missing or corrupt shard."""
        folder = Path(folder)
        index = index or CandidateConfig(metric="ip")
        if index.metric != "ip":
            raise ConfigError(f"a gradient store is searched by inner product; use metric='ip', not {index.metric!r}")
        config = config or _stored_settings(folder)
        projector = Projector(adapter, config.projection)
        fingerprints = (model_fingerprint(adapter), fingerprint or data_fingerprint(data))
        manifest_config = _store_config(adapter, len(data), projector, config)
        store = Store.attach(
            folder, model_fingerprint=fingerprints[0], data_fingerprint=fingerprints[1], config=manifest_config
        )
        num_shards = -(-len(data) // config.shard_size)
        missing = sorted(set(range(num_shards)) - set(store.completed_shards(SHARD_PREFIX)))
        if missing:
            raise StoreError(
                f"{folder} is unfinished: {len(missing)} of {num_shards} shards are missing (first {missing[:5]}); "
                "run build_store again (every rank) to finish it"
            )
        names = [Store.shard_name(SHARD_PREFIX, i) for i in range(num_shards)]
        shards = [store.load(name) for name in names]
        _write_index(folder, fingerprints, manifest_config, store, names)
        return cls(store, projector, np.concatenate([np.asarray(s, dtype=np.float32) for s in shards]), index)

    def project(self, vectors: Tensor, precondition: float | None = None) -> np.ndarray:
        """Project flat vectors [k, P] (s_test) into the store's space [k, dim]; with ``precondition = λ`` apply
        (ΦᵀΦ/N + λI)⁻¹ there (TRAK/LoGra: then pass raw test gradients, not s_test)."""
        adapter = self.projector.adapter
        with torch.no_grad():
            projected = self.projector.project_flat(vectors.to(adapter.device, adapter.dtype)).cpu().double().numpy()
        if precondition is not None:
            if not precondition > 0:
                raise ConfigError(f"precondition (the damping λ) must be > 0, got {precondition!r}")
            gram = self._mean_gram()
            projected = np.linalg.solve(gram + precondition * np.eye(self.dim), projected.T).T
        return np.ascontiguousarray(projected, dtype=np.float32)

    def _mean_gram(self) -> np.ndarray:
        """ΦᵀΦ / N over the stored projected gradients (float64, computed once)."""
        if self._gram is None:
            phi = self.vectors.astype(np.float64)
            self._gram = phi.T @ phi / self.n
        return self._gram

    def scores(self, vectors: Tensor, precondition: float | None = None) -> np.ndarray:
        """Approximate scores [k, N] = ⟨P s_test, P ∇L_j⟩ of every stored point."""
        return self.project(vectors, precondition) @ self.vectors.T

    def search(self, vectors: Tensor, k: int, precondition: float | None = None) -> Retrieval:
        """The ``k`` stored points with the largest and the ``k`` with the most negative approximate scores, and the
        approximate scores of every point (the recall estimate needs them). s_test is projected once and scored by
        one matmul; a Flat index takes its extremes from that matmul (the same points as FAISS's exact search),
        IVF / HNSW search FAISS."""
        if not 0 < k <= self.n:
            raise DataError(f"k={k} candidates per side need 1 <= k <= the {self.n} stored points")
        queries = self.project(vectors, precondition)
        scores = queries @ self.vectors.T
        if self.index_config.index == "flat":
            helpful, harmful = _largest(scores, k), _largest(-scores, k)
        else:
            if self._index is None:
                self._index = CandidateIndex.build(self.vectors, self.index_config)
            helpful, harmful = self._index.search(queries, k)[1], self._index.search(-queries, k)[1]
        rows = np.arange(scores.shape[0])[:, None]
        return Retrieval(helpful, scores[rows, helpful], harmful, scores[rows, harmful], scores)


def _largest(scores: np.ndarray, k: int) -> np.ndarray:
    """Column indices [q, k] of each row's k largest values, largest first (argpartition, then sort the k)."""
    part = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    order = np.argsort(-np.take_along_axis(scores, part, axis=1), axis=1, kind="stable")
    return np.take_along_axis(part, order, axis=1).astype(np.int64)


def _stored_settings(folder: Path) -> GradientStoreConfig:
    """The GradientStoreConfig recorded in a store's manifest."""
    from .config import config_from_dict

    path = folder / MANIFEST_FILE
    try:
        settings = json.loads(path.read_text(encoding="utf-8"))["config"]["gradient_store"]["settings"]
    except FileNotFoundError as err:
        raise StoreError(f"no gradient store in {folder}; build it first with build_store") from err
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise StoreError(f"{path} is not a gradient store's manifest ({err}); rebuild with overwrite=True") from err
    return config_from_dict(GradientStoreConfig, settings)


def _digest(folder: Path, name: str) -> dict[str, Any]:
    """Name, size and SHA-256 of a shard's data file, from its sidecar (``<name>.json``, see fastif.store)."""
    sidecar = json.loads((folder / f"{name}.json").read_text(encoding="utf-8"))
    return {"name": name, "sha256": sidecar["sha256"], "bytes": sidecar["bytes"]}


def _write_index(
    folder: Path, fingerprints: tuple[str, str], config: dict[str, Any], store: Store, names: list[str]
) -> None:
    """Record the finished shard list with sizes and SHA-256 (from the sidecars) as the ``index`` entry, once."""
    records = [_digest(folder, name) for name in names]
    if store.has(INDEX_ENTRY):
        if store.meta(INDEX_ENTRY).get("shards") != records:
            raise StoreError(f"{folder} has shards that differ from its index; rebuild it with overwrite=True")
        return
    model, data = fingerprints
    with Store.open(folder, model_fingerprint=model, data_fingerprint=data, config=config) as writer:
        writer.save(INDEX_ENTRY, torch.tensor([len(names)]), {"shards": records})
