"""Tests for kNN candidate selection: exactness of flat search, recall of ivf/hnsw, persistence, validation."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from fastif.candidates import (
    CONFIG_FILE,
    INDEX_FILE,
    MANIFEST_FILE,
    CandidateConfig,
    CandidateIndex,
    features_fingerprint,
)
from fastif.config import config_from_dict, config_to_dict
from fastif.errors import ConfigError, DataError, StoreError


def clustered(n: int, d: int, clusters: int, seed: int) -> np.ndarray:
    """Gaussian blobs around random centres, the shape of real sentence features."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(clusters, d)) * 4
    return (centres[rng.integers(clusters, size=n)] + rng.normal(size=(n, d))).astype(np.float32)


def brute_force(x: np.ndarray, q: np.ndarray, k: int, metric: str) -> tuple[np.ndarray, np.ndarray]:
    """Exact kNN in float64 numpy: squared L2 ascending, or similarity descending."""
    x64, q64 = x.astype(np.float64), q.astype(np.float64)
    if metric == "l2":
        score = ((q64[:, None, :] - x64[None, :, :]) ** 2).sum(-1)
        order = np.argsort(score, axis=1, kind="stable")[:, :k]
    else:
        if metric == "cosine":
            x64 = x64 / np.linalg.norm(x64, axis=1, keepdims=True)
            q64 = q64 / np.linalg.norm(q64, axis=1, keepdims=True)
        score = q64 @ x64.T
        order = np.argsort(-score, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(score, order, axis=1), order


@pytest.fixture(scope="module")
def data() -> tuple[np.ndarray, np.ndarray]:
    """Training features [1500, 16] and queries [40, 16] drawn from the same clusters."""
    x = clustered(1540, 16, 12, seed=0)
    return x[:1500], x[1500:]


@pytest.mark.parametrize("metric", ["l2", "ip", "cosine"])
def test_flat_matches_brute_force(data: tuple[np.ndarray, np.ndarray], metric: str) -> None:
    x, q = data
    index = CandidateIndex.build(x, CandidateConfig(metric=metric))
    distances, indices = index.search(q, 25)
    want_scores, want_indices = brute_force(x, q, 25, metric)
    assert indices.dtype == np.int64 and indices.shape == (40, 25)
    np.testing.assert_array_equal(indices, want_indices)
    np.testing.assert_allclose(distances, want_scores, rtol=1e-4, atol=1e-3)


def test_torch_input_and_vector_query(data: tuple[np.ndarray, np.ndarray]) -> None:
    x, q = data
    index = CandidateIndex.build(torch.from_numpy(x).double())
    _, from_numpy = index.search(q[:1], 5)
    _, from_vector = index.search(torch.from_numpy(q[0]), 5)
    np.testing.assert_array_equal(from_numpy, from_vector)


@pytest.mark.parametrize(
    "config",
    [
        CandidateConfig(index="ivf", nlist=24, nprobe=6),
        CandidateConfig(index="hnsw", hnsw_m=16, ef_search=64, ef_construction=40),
        CandidateConfig(index="hnsw", metric="cosine"),
    ],
)
def test_approximate_recall(data: tuple[np.ndarray, np.ndarray], config: CandidateConfig) -> None:
    x, q = data
    k = 20
    exact = CandidateIndex.build(x, CandidateConfig(metric=config.metric)).search(q, k)[1]
    approx = CandidateIndex.build(x, config).search(q, k)[1]
    recall = np.mean([len(set(a) & set(e)) / k for a, e in zip(approx, exact, strict=True)])
    assert recall >= 0.9


def test_search_results_sorted_nearest_first(data: tuple[np.ndarray, np.ndarray]) -> None:
    x, q = data
    l2, _ = CandidateIndex.build(x, CandidateConfig(index="hnsw")).search(q, 10)
    assert (np.diff(l2, axis=1) >= 0).all()
    ip, _ = CandidateIndex.build(x, CandidateConfig(metric="ip")).search(q, 10)
    assert (np.diff(ip, axis=1) <= 0).all()


def test_search_mean_equals_searching_the_mean(data: tuple[np.ndarray, np.ndarray]) -> None:
    x, q = data
    index = CandidateIndex.build(x)
    anchors = q[:7]
    mean = anchors.astype(np.float64).mean(axis=0).astype(np.float32)
    got = index.search_mean(torch.from_numpy(anchors), 30)
    assert got.shape == (30,)
    np.testing.assert_array_equal(got, index.search(mean[None], 30)[1][0])
    np.testing.assert_array_equal(got, brute_force(x, mean[None], 30, "l2")[1][0])


@pytest.mark.parametrize(
    "config",
    [CandidateConfig(), CandidateConfig(index="ivf", nlist=16, nprobe=3), CandidateConfig(index="hnsw", ef_search=20)],
)
def test_save_load_round_trip(tmp_path, data: tuple[np.ndarray, np.ndarray], config: CandidateConfig) -> None:
    x, q = data
    index = CandidateIndex.build(x, config)
    index.save(tmp_path / "idx")
    assert sorted(p.name for p in (tmp_path / "idx").iterdir()) == sorted([INDEX_FILE, CONFIG_FILE, MANIFEST_FILE])
    loaded = CandidateIndex.load(tmp_path / "idx")
    assert loaded.config == config and (loaded.n, loaded.d) == (1500, 16)
    for a, b in zip(index.search(q, 15), loaded.search(q, 15), strict=True):
        np.testing.assert_array_equal(a, b)
    manifest = json.loads((tmp_path / "idx" / MANIFEST_FILE).read_text())
    assert manifest["n"] == 1500 and manifest["d"] == 16
    assert manifest["features_sha256"] == features_fingerprint(x)
    loaded.check_features(x)


def test_check_features_detects_other_features(tmp_path, data: tuple[np.ndarray, np.ndarray]) -> None:
    x, _ = data
    CandidateIndex.build(x).save(tmp_path)
    loaded = CandidateIndex.load(tmp_path)
    changed = x.copy()
    changed[3, 4] += 1
    with pytest.raises(StoreError, match="different features"):
        loaded.check_features(changed)
    with pytest.raises(StoreError, match="1500x16"):
        loaded.check_features(x[:10])


def test_load_detects_corrupt_or_missing_index(tmp_path, data: tuple[np.ndarray, np.ndarray]) -> None:
    x, _ = data
    CandidateIndex.build(x[:100]).save(tmp_path)
    path = tmp_path / INDEX_FILE
    raw = bytearray(path.read_bytes())
    raw[200] ^= 0xFF
    path.write_bytes(bytes(raw))
    with pytest.raises(StoreError, match="corrupt"):
        CandidateIndex.load(tmp_path)
    path.unlink()
    with pytest.raises(StoreError, match=r"index\.faiss is missing"):
        CandidateIndex.load(tmp_path)


def test_k_out_of_range(data: tuple[np.ndarray, np.ndarray]) -> None:
    x, q = data
    index = CandidateIndex.build(x[:50])
    with pytest.raises(DataError, match=r"N=50.*k <= 50"):
        index.search(q, 51)
    with pytest.raises(DataError, match="N=50"):
        index.search_mean(q, 100)
    for k in (0, -3):
        with pytest.raises(ConfigError, match="positive integer"):
            index.search(q, k)
    assert index.search(q, 50)[1].shape == (40, 50)


def test_bad_features_are_refused(data: tuple[np.ndarray, np.ndarray]) -> None:
    x, q = data
    bad = x.copy()
    bad[7, 2] = np.nan
    with pytest.raises(DataError, match=r"non-finite.*row 7"):
        CandidateIndex.build(bad)
    with pytest.raises(DataError, match="empty"):
        CandidateIndex.build(np.zeros((0, 16), dtype=np.float32))
    with pytest.raises(DataError, match="2-D"):
        CandidateIndex.build(x[0])
    zero = x.copy()
    zero[5] = 0
    with pytest.raises(DataError, match="all-zero"):
        CandidateIndex.build(zero, CandidateConfig(metric="cosine"))
    index = CandidateIndex.build(x)
    with pytest.raises(DataError, match="dimension 8 but the index was built on 16"):
        index.search(q[:, :8], 3)
    with pytest.raises(DataError, match="non-finite"):
        index.search(np.full((1, 16), np.inf), 3)


def test_config_validation(data: tuple[np.ndarray, np.ndarray]) -> None:
    x, _ = data
    with pytest.raises(ConfigError, match=r"nlist=200 exceeds the 100 training points"):
        CandidateIndex.build(x[:100], CandidateConfig(index="ivf", nlist=200))
    with pytest.raises(ConfigError, match="nprobe"):
        CandidateConfig(index="ivf", nlist=4, nprobe=8)
    with pytest.raises(ConfigError, match="metric"):
        CandidateConfig(metric="euclid")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="hnsw_m"):
        CandidateConfig(hnsw_m=0)
    config = CandidateConfig(index="hnsw", metric="ip", ef_search=99)
    assert config_from_dict(CandidateConfig, config_to_dict(config)) == config
    with pytest.raises(ConfigError, match="unknown"):
        config_from_dict(CandidateConfig, {"nprob": 3})


def test_a_manifest_that_lost_a_key_is_refused_naming_the_file(tmp_path, data: tuple[np.ndarray, np.ndarray]) -> None:
    CandidateIndex.build(data[0][:50]).save(tmp_path)
    manifest = tmp_path / "candidate_manifest.json"
    manifest.write_text(manifest.read_text().replace('"features_sha256"', '"features_sha257"'))  # one flipped bit
    with pytest.raises(StoreError, match=r"candidate_manifest\.json lacks \['features_sha256'\]"):
        CandidateIndex.load(tmp_path)
