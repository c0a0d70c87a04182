"""Gradient store: resumable sharded build, rank split = single process, exact retrieval at full dimension, and
one-line errors for another model, another dimension or a corrupted shard."""

from __future__ import annotations

import hashlib
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from fastif import AdapterConfig, TensorData, TorchAdapter
from fastif.candidates import CandidateConfig
from fastif.errors import ConfigError, DataError, FastIFError, StoreError
from fastif.gradient_store import GradientStore, GradientStoreConfig, build_store
from fastif.grads import per_example_grads
from fastif.projection import ProjectionConfig


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(logits, targets, reduction="none")


def problem(seed: int = 0):
    """A float64 MLP (Linear-Tanh-Linear, 3 classes) and 23 training points (shards of 5: the last holds 3)."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    adapter = TorchAdapter(model, cross_entropy, AdapterConfig())
    generator = torch.Generator().manual_seed(1)
    data = TensorData((torch.randn(23, 6, generator=generator, dtype=torch.float64), torch.arange(23) % 3))
    return adapter, data


CONFIG = GradientStoreConfig(ProjectionConfig(kind="gaussian", dim=6, layer_dim=3, seed=1), "float32", shard_size=5)


def _hashes(folder) -> dict[str, tuple[str, int]]:
    """SHA-256 and mtime (ns) of every shard file."""
    return {
        path.name: (hashlib.sha256(path.read_bytes()).hexdigest(), path.stat().st_mtime_ns)
        for path in sorted(folder.glob("grads-*.npy"))
    }


def test_build_and_open_round_trip(tmp_path):
    adapter, data = problem()
    report = build_store(adapter, data, tmp_path / "s", CONFIG, batch_size=2)
    assert (report.num_shards, report.computed, report.reused, report.dim) == (5, [0, 1, 2, 3, 4], [], 9 + 9 + 6)
    store = GradientStore.open(tmp_path / "s", adapter, data)
    assert (store.n, store.dim) == (23, 24)
    direct = store.projector.project_batch(adapter.flat_params(), data.batch(range(23)))
    np.testing.assert_allclose(store.vectors, direct.numpy(), rtol=1e-6)
    assert store.manifest["config"]["gradient_store"]["projection"]["out_dim"] == 24


def test_float16_store_halves_the_bytes(tmp_path):
    adapter, data = problem()
    build_store(adapter, data, tmp_path / "s", GradientStoreConfig(CONFIG.projection, "float16", 5))
    assert np.load(tmp_path / "s" / "grads-00000.npy").dtype == np.float16
    assert (tmp_path / "s" / "grads-00000.npy").stat().st_size == 128 + 5 * 24 * 2


def test_interrupted_build_resumes_without_recomputing_finished_shards(tmp_path):
    adapter, data = problem()
    build_store(adapter, data, tmp_path / "whole", CONFIG)

    def interrupt(done):
        if done.index == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        build_store(adapter, data, tmp_path / "resumed", CONFIG, on_shard=interrupt)
    before = _hashes(tmp_path / "resumed")
    assert sorted(before) == ["grads-00000.npy", "grads-00001.npy", "grads-00002.npy"]
    with pytest.raises(StoreError, match=r"unfinished.*run build_store again"):
        GradientStore.open(tmp_path / "resumed", adapter, data)
    report = build_store(adapter, data, tmp_path / "resumed", CONFIG)
    assert (report.reused, report.computed) == ([0, 1, 2], [3, 4])
    after = _hashes(tmp_path / "resumed")
    assert {name: after[name] for name in before} == before
    assert {name: sha for name, (sha, _) in after.items()} == {
        name: sha for name, (sha, _) in _hashes(tmp_path / "whole").items()
    }


def test_rank_split_equals_a_single_process_build(tmp_path):
    adapter, data = problem()
    build_store(adapter, data, tmp_path / "single", CONFIG)
    first = build_store(adapter, data, tmp_path / "split", CONFIG, rank=0, world_size=2)
    second = build_store(adapter, data, tmp_path / "split", CONFIG, rank=1, world_size=2)
    assert (first.computed, second.computed) == ([0, 2, 4], [1, 3])
    single = GradientStore.open(tmp_path / "single", adapter, data)
    split = GradientStore.open(tmp_path / "split", adapter, data)
    assert np.array_equal(single.vectors, split.vectors)
    with pytest.raises(ConfigError, match="rank 2 is outside"):
        build_store(adapter, data, tmp_path / "split", CONFIG, rank=2, world_size=2)


def test_full_dimension_search_returns_the_brute_force_top_k(tmp_path):
    """With the identity projection the approximate scores are exact: search = brute force, both sides."""
    adapter, data = problem()
    config = GradientStoreConfig(ProjectionConfig(kind="identity", layer_dim=8), "float32", shard_size=7)
    build_store(adapter, data, tmp_path / "s", config)
    store = GradientStore.open(tmp_path / "s", adapter, data)
    grads = per_example_grads(adapter, adapter.flat_params(), data.batch(range(23)))
    s_test = torch.randn(3, adapter.num_params, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    exact = (s_test @ grads.T).numpy()
    found = store.search(s_test, 4)
    np.testing.assert_array_equal(found.helpful, np.argsort(-exact, axis=1)[:, :4])
    np.testing.assert_array_equal(found.harmful, np.argsort(exact, axis=1)[:, :4])
    np.testing.assert_allclose(found.helpful_scores, np.sort(exact, axis=1)[:, ::-1][:, :4], rtol=1e-5)
    np.testing.assert_allclose(store.scores(s_test), exact, rtol=1e-5, atol=1e-7)
    np.testing.assert_array_equal(found.scores, store.scores(s_test))


def test_flat_search_by_matmul_finds_the_points_faiss_finds(tmp_path):
    """The Flat store's one-matmul extremes equal FAISS's exhaustive search (IVF visiting every cell)."""
    adapter, data = problem()
    build_store(adapter, data, tmp_path / "s", CONFIG)
    flat = GradientStore.open(tmp_path / "s", adapter, data)
    ivf = GradientStore.open(tmp_path / "s", adapter, data, index=CandidateConfig("ivf", "ip", nlist=2, nprobe=2))
    s_test = torch.randn(4, adapter.num_params, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    by_matmul, by_faiss = flat.search(s_test, 6), ivf.search(s_test, 6)
    np.testing.assert_array_equal(by_matmul.helpful, by_faiss.helpful)
    np.testing.assert_array_equal(by_matmul.harmful, by_faiss.harmful)
    np.testing.assert_array_equal(by_matmul.helpful_scores, by_faiss.helpful_scores)
    with pytest.raises(DataError, match="1 <= k <= the 23 stored points"):
        flat.search(s_test, 24)


def test_preconditioning_solves_in_the_projected_space(tmp_path):
    adapter, data = problem()
    build_store(adapter, data, tmp_path / "s", CONFIG)
    store = GradientStore.open(tmp_path / "s", adapter, data)
    vector = torch.randn(1, adapter.num_params, dtype=torch.float64)
    phi = store.vectors.astype(np.float64)
    expected = np.linalg.solve(phi.T @ phi / 23 + 0.1 * np.eye(24), store.project(vector)[0].astype(np.float64))
    np.testing.assert_allclose(store.project(vector, precondition=0.1)[0], expected, rtol=1e-4)
    with pytest.raises(ConfigError, match="> 0"):
        store.project(vector, precondition=0.0)


def _one_line(error: FastIFError) -> str:
    message = str(error)
    assert "\n" not in message
    return message


def test_another_model_data_or_dimension_is_refused_and_nothing_is_lost(tmp_path):
    adapter, data = problem()
    build_store(adapter, data, tmp_path / "s", CONFIG)
    files = _hashes(tmp_path / "s")
    other, _ = problem(seed=5)
    with pytest.raises(StoreError, match="different model") as error:
        GradientStore.open(tmp_path / "s", other, data)
    assert "--overwrite" in _one_line(error.value)
    with pytest.raises(StoreError, match="different dataset"):
        build_store(adapter, data.subset(range(20)), tmp_path / "s", CONFIG)
    wider = GradientStoreConfig(ProjectionConfig(kind="gaussian", dim=7, layer_dim=3, seed=1), "float32", 5)
    with pytest.raises(StoreError, match=r"different config.*projection\.dim: 6 -> 7") as error:
        GradientStore.open(tmp_path / "s", adapter, data, wider)
    _one_line(error.value)
    narrower = TorchAdapter(adapter.model, cross_entropy, AdapterConfig(include=("2",)))
    with pytest.raises(StoreError, match="different config"):
        GradientStore.open(tmp_path / "s", narrower, data)
    with pytest.raises(DataError, match="same adapter and parameter selection"):
        GradientStore.open(tmp_path / "s", adapter, data).search(torch.zeros(1, adapter.num_params - 1), 3)
    assert _hashes(tmp_path / "s") == files


def test_a_corrupted_shard_is_named(tmp_path):
    adapter, data = problem()
    build_store(adapter, data, tmp_path / "s", CONFIG)
    path = tmp_path / "s" / "grads-00003.npy"
    raw = bytearray(path.read_bytes())
    raw[-1] ^= 0xFF
    path.write_bytes(bytes(raw))
    with pytest.raises(StoreError, match=r"grads-00003\.npy is corrupt") as error:
        GradientStore.open(tmp_path / "s", adapter, data)
    assert "delete it to recompute" in _one_line(error.value)


KILLED_BUILD = """
import os, signal, sys
sys.path.insert(0, {tests!r})
from test_gradient_store import CONFIG, problem
from fastif.gradient_store import build_store

adapter, data = problem()
state = {{"armed": False}}
loss = adapter.per_example_loss

def dying_loss(flat, batch):  # SIGKILL while shard 3 is being computed: no finally, no atexit, no flush
    if state["armed"]:
        os.kill(os.getpid(), signal.SIGKILL)
    return loss(flat, batch)

def arm(done):
    state["armed"] = state["armed"] or done.index == 2

adapter.per_example_loss = dying_loss
build_store(adapter, data, {folder!r}, CONFIG, on_shard=arm)
"""


def test_a_build_killed_with_sigkill_resumes_to_the_same_store(tmp_path):
    """A real ``kill -9`` in the middle of a shard: the finished shards survive, the lock dies with the process,
    and the next build computes only the missing shards and equals an uninterrupted build byte for byte."""
    adapter, data = problem()
    build_store(adapter, data, tmp_path / "whole", CONFIG)
    script = KILLED_BUILD.format(tests=str(Path(__file__).parent), folder=str(tmp_path / "killed"))
    child = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert child.returncode == -signal.SIGKILL, child.stderr
    assert sorted(_hashes(tmp_path / "killed")) == ["grads-00000.npy", "grads-00001.npy", "grads-00002.npy"]
    report = build_store(adapter, data, tmp_path / "killed", CONFIG)
    assert (report.reused, report.computed) == ([0, 1, 2], [3, 4])
    assert {name: sha for name, (sha, _) in _hashes(tmp_path / "killed").items()} == {
        name: sha for name, (sha, _) in _hashes(tmp_path / "whole").items()
    }
    assert not [path for path in (tmp_path / "killed").rglob("*") if path.name.endswith(".tmp")]
