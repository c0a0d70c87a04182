"""Tests for the resumable store: round trips, fingerprints, corruption, pickle refusal, resume, locking, disk full."""

from __future__ import annotations

import errno
import json
import multiprocessing
import os
import stat
import tempfile
from collections.abc import Iterator
from multiprocessing.synchronize import Event
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import fastif.files
import fastif.store.store as store_module
from fastif.errors import ConfigError, DataError, StoreError
from fastif.store import (
    LOCK_FILE,
    MANIFEST_FILE,
    Store,
    fingerprint_parameters,
    fingerprint_records,
    fingerprint_tensors,
)

MODEL = "m" * 64
DATA = "d" * 64
CONFIG = {"solver": {"type": "SolverConfig", "damping": 0.01, "iterations": 100}, "candidates": {"k": 10}}


def open_store(folder: Path, **changes: object) -> Store:
    """Open a store with the default fingerprints and config, overridden by ``changes``."""
    kwargs: dict = {"model_fingerprint": MODEL, "data_fingerprint": DATA, "config": CONFIG, **changes}
    return Store.open(folder, **kwargs)


DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64, torch.int32, torch.int8]
DTYPES += [torch.uint8, torch.bool]


@pytest.mark.parametrize("dtype", DTYPES)
def test_round_trip_dtypes(tmp_path: Path, dtype: torch.dtype) -> None:
    tensor = (torch.randn(3, 5) * 10).to(dtype)
    with open_store(tmp_path) as store:
        store.save("single", tensor, meta={"step": 1})
        store.save("many", {"a": tensor, "scalar": torch.tensor(2.5, dtype=torch.float64), "empty": torch.zeros(0, 4)})
        loaded = store.load("single")
        assert loaded.dtype == dtype and torch.equal(loaded, tensor)
        many = store.load("many")
        assert list(many) == ["a", "scalar", "empty"] and torch.equal(many["a"], tensor)
        assert many["scalar"].shape == () and many["empty"].shape == (0, 4)
        assert store.meta("single") == {"step": 1}
        assert store.names() == ["many", "single"]


def test_views_and_shared_memory_round_trip(tmp_path: Path) -> None:
    base = torch.arange(20.0).reshape(4, 5)
    with open_store(tmp_path) as store:
        store.save("views", {"t": base.T, "row": base[1], "rows": base[1:3], "again": base})
        got = store.load("views")
        assert torch.equal(got["t"], base.T) and torch.equal(got["row"], base[1]) and torch.equal(got["again"], base)


def test_manifest_and_sidecar_contents(tmp_path: Path) -> None:
    with open_store(tmp_path, config={"solver": {"shape": (1, 2)}}) as store:
        store.save("x", torch.ones(2, 3))
    manifest = json.loads((tmp_path / MANIFEST_FILE).read_text())
    assert manifest["model_fingerprint"] == MODEL and manifest["data_fingerprint"] == DATA
    assert manifest["config"] == {"solver": {"shape": [1, 2]}} and manifest["format_version"] == 1
    sidecar = json.loads((tmp_path / "x.json").read_text())
    assert sidecar["file"] == "x.safetensors" and sidecar["tensors"] == [
        {"key": "tensor", "shape": [2, 3], "dtype": "float32"}
    ]
    assert sidecar["bytes"] == (tmp_path / "x.safetensors").stat().st_size and len(sidecar["sha256"]) == 64
    with open_store(tmp_path, config={"solver": {"shape": [1, 2]}}) as store:  # tuples and lists compare equal
        assert store.has("x")


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"model_fingerprint": "0" * 64}, "different model"),
        ({"data_fingerprint": "1" * 64}, "different dataset"),
        ({"config": {**CONFIG, "solver": {**CONFIG["solver"], "damping": 0.001}}}, r"config\.solver\.damping"),
        ({"config": {"candidates": {"k": 10}}}, r"config\.solver"),
    ],
)
def test_mismatch_is_refused_and_overwrite_starts_afresh(tmp_path: Path, change: dict, message: str) -> None:
    with open_store(tmp_path) as store:
        store.save("x", torch.ones(2))
    with pytest.raises(StoreError, match=message) as info:
        open_store(tmp_path, **change)
    assert "--overwrite" in str(info.value)
    with open_store(tmp_path, overwrite=True, **change) as store:
        assert not store.has("x") and store.names() == []
        store.save("y", torch.zeros(1))
    with open_store(tmp_path, **change) as store:
        assert store.has("y")


def test_foreign_folder_is_never_cleared(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("precious")
    for overwrite in (False, True):
        with pytest.raises(StoreError, match="not a fastif store"):
            open_store(tmp_path, overwrite=overwrite)
    assert (tmp_path / "notes.txt").read_text() == "precious"
    with pytest.raises(StoreError, match="not a folder"):
        open_store(tmp_path / "notes.txt")


def test_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="model_fingerprint"):
        open_store(tmp_path, model_fingerprint="")
    with pytest.raises(ConfigError, match="JSON"):
        open_store(tmp_path / "a", config={"x": object()})
    with open_store(tmp_path / "b") as store:
        for name in ("manifest", "../x", "a b", "", "-x"):
            with pytest.raises(StoreError, match="invalid store entry name"):
                store.save(name, torch.ones(1))
        with pytest.raises(DataError, match="tensor or a dict"):
            store.save("x", [torch.ones(1)])  # type: ignore[arg-type]
        with pytest.raises(StoreError, match="no entry 'missing'"):
            store.load("missing")
    with pytest.raises(StoreError, match="closed"):
        store.save("late", torch.ones(1))


@pytest.fixture
def corrupt_case(tmp_path: Path) -> Iterator[tuple[Path, Store]]:
    """A store with a finished entry 'x', and the path of its data file."""
    with open_store(tmp_path) as store:
        store.save("x", {"a": torch.randn(64, 8), "b": torch.arange(10)})
        yield tmp_path / "x.safetensors", store


def test_flipped_bytes_are_detected(corrupt_case: tuple[Path, Store]) -> None:
    path, store = corrupt_case
    raw = bytearray(path.read_bytes())
    raw[-100] ^= 0x55
    path.write_bytes(bytes(raw))
    with pytest.raises(StoreError, match=r"x\.safetensors is corrupt.*delete it to recompute"):
        store.load("x")
    with pytest.raises(StoreError, match="corrupt"):
        store.get_or_compute("x", lambda: pytest.fail("must not silently recompute a corrupt entry"))


def test_truncated_file_is_detected(corrupt_case: tuple[Path, Store]) -> None:
    path, store = corrupt_case
    path.write_bytes(path.read_bytes()[:-50])
    with pytest.raises(StoreError, match=r"x\.safetensors is truncated"):
        store.load("x")


def test_pickle_payload_is_refused(tmp_path: Path, corrupt_case: tuple[Path, Store]) -> None:
    path, store = corrupt_case
    torch.save({"a": torch.ones(3)}, path)
    with pytest.raises(StoreError, match="pickle payload"):
        store.load("x")
    # Even with a forged sidecar whose size and checksum match, the file is parsed as safetensors only.
    sidecar = tmp_path / "x.json"
    record = json.loads(sidecar.read_text())
    record["sha256"], record["bytes"] = store_module._file_digest(path)
    sidecar.write_text(json.dumps(record))
    with pytest.raises(StoreError, match=r"not a valid safetensors file.*pickle payload"):
        store.load("x")


def test_sidecar_cannot_point_outside_the_store(tmp_path: Path, corrupt_case: tuple[Path, Store]) -> None:
    _, store = corrupt_case
    sidecar = tmp_path / "x.json"
    record = json.loads(sidecar.read_text())
    sidecar.write_text(json.dumps({**record, "file": "../secret.safetensors"}))
    with pytest.raises(StoreError, match="not a fastif entry record"):
        store.load("x")


def test_get_or_compute_never_recomputes_even_after_reopening(tmp_path: Path) -> None:
    calls: list[int] = []

    def compute() -> torch.Tensor:
        calls.append(1)
        return torch.full((4,), float(len(calls)))

    with open_store(tmp_path) as store:
        first = store.get_or_compute("scores", compute, meta={"k": 3})
        assert torch.equal(store.get_or_compute("scores", compute), first)
    with open_store(tmp_path) as store:
        assert torch.equal(store.get_or_compute("scores", compute), first)
        assert store.meta("scores") == {"k": 3}
    assert len(calls) == 1


def test_data_file_without_metadata_counts_as_missing(tmp_path: Path) -> None:
    with open_store(tmp_path) as store:
        safetensors.torch.save_file({"tensor": torch.zeros(3)}, str(tmp_path / "orphan.safetensors"))
        assert not store.has("orphan") and store.names() == []
        got = store.get_or_compute("orphan", lambda: torch.ones(3))
        assert torch.equal(got, torch.ones(3)) and torch.equal(store.load("orphan"), torch.ones(3))


def test_shards(tmp_path: Path) -> None:
    with open_store(tmp_path) as store:
        assert Store.shard_name("grads", 7) == "grads-00007"
        for i in (0, 1, 3, 12):
            store.save(store.shard_name("grads", i), torch.full((2,), float(i)))
        store.save(store.shard_name("grads-extra", 2), torch.ones(1))
        (tmp_path / "grads-00005.safetensors").write_bytes(b"unfinished")
        assert store.completed_shards("grads") == [0, 1, 3, 12]
        assert store.completed_shards("grads-extra") == [2]
        assert store.completed_shards("other") == []
        with pytest.raises(StoreError, match="shard index"):
            store.shard_name("grads", -1)


def test_rewriting_an_entry_replaces_it(tmp_path: Path) -> None:
    with open_store(tmp_path) as store:
        store.save("x", torch.ones(3))
        store.save_array("x", np.arange(4))
        assert not (tmp_path / "x.safetensors").exists()
        np.testing.assert_array_equal(store.load("x"), np.arange(4))
        store.save("x", {"a": torch.zeros(1)})
        assert not (tmp_path / "x.npy").exists() and list(store.load("x")) == ["a"]


def test_arrays_are_memory_mapped_and_checked(tmp_path: Path) -> None:
    array = np.random.default_rng(0).normal(size=(100, 7)).astype(np.float32)
    with open_store(tmp_path) as store:
        store.save_array("big", array)
        loaded = store.load("big")
        assert isinstance(loaded, np.memmap) and not loaded.flags.writeable
        np.testing.assert_array_equal(loaded, array)
        del loaded
        with pytest.raises(DataError, match="numeric numpy array"):
            store.save_array("objects", np.array([{}], dtype=object))
        path = tmp_path / "big.npy"
        raw = bytearray(path.read_bytes())
        raw[-1] ^= 1
        path.write_bytes(bytes(raw))
        with pytest.raises(StoreError, match=r"big\.npy is corrupt"):
            store.load("big")
        assert store.load("big", verify=False).shape == (100, 7)


FORK = multiprocessing.get_context("fork")  # children inherit the imports, so they start in milliseconds


def hold_lock(folder: Path, locked: Event, release: Event) -> None:
    """Child process: open the store (taking its lock) and keep it until told to release it."""
    store = open_store(folder)
    locked.set()
    release.wait(60)
    store.close()


def write_shards(folder: Path, first: int) -> None:
    """Child process: a worker of the same run saving every other shard without taking the lock."""
    store = Store.attach(folder, model_fingerprint=MODEL, data_fingerprint=DATA, config=CONFIG)
    for i in range(first, 12, 2):
        store.save(store.shard_name("part", i), torch.full((50, 50), float(i)), meta={"worker": first})


def test_lock_refuses_a_second_writer(tmp_path: Path) -> None:
    locked, release = FORK.Event(), FORK.Event()
    holder = FORK.Process(target=hold_lock, args=(tmp_path, locked, release))
    holder.start()
    try:
        assert locked.wait(60)
        with pytest.raises(StoreError, match=rf"another fastif run \(pid {holder.pid}\) is writing to .*--output"):
            open_store(tmp_path)
        with pytest.raises(StoreError, match="another fastif run"):
            open_store(tmp_path, overwrite=True)
        worker = Store.attach(tmp_path, model_fingerprint=MODEL, data_fingerprint=DATA, config=CONFIG)
        worker.save("from-worker", torch.ones(2))
    finally:
        release.set()
        holder.join(60)
    assert holder.exitcode == 0
    with open_store(tmp_path) as store:
        assert store.has("from-worker")
        with pytest.raises(StoreError, match="another fastif run"):
            open_store(tmp_path)  # a second handle in the same process is refused too
    open_store(tmp_path).close()  # released on close


def test_workers_write_shards_concurrently(tmp_path: Path) -> None:
    with open_store(tmp_path) as store:
        workers = [FORK.Process(target=write_shards, args=(tmp_path, first)) for first in (0, 1)]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join(60)
        assert [worker.exitcode for worker in workers] == [0, 0]
        assert store.completed_shards("part") == list(range(12))
        for i in range(12):
            assert torch.equal(store.load(store.shard_name("part", i)), torch.full((50, 50), float(i)))
            assert store.meta(store.shard_name("part", i)) == {"worker": i % 2}
    with pytest.raises(StoreError, match="no fastif store"):
        Store.attach(tmp_path / "nowhere", model_fingerprint=MODEL, data_fingerprint=DATA, config=CONFIG)
    with pytest.raises(StoreError, match="different model"):
        Store.attach(tmp_path, model_fingerprint="0" * 64, data_fingerprint=DATA, config=CONFIG)


def disk_full(*_args: object, **_kwargs: object) -> None:
    raise OSError(errno.ENOSPC, "No space left on device")


def test_disk_full_while_writing_data_keeps_earlier_entries(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with open_store(tmp_path) as store:
        store.save("done", torch.arange(5))

        def half_write(tensors: dict, filename: str, metadata: object = None) -> None:
            Path(filename).write_bytes(b"\0" * 100)
            disk_full()

        monkeypatch.setattr(safetensors.torch, "save_file", half_write)
        with pytest.raises(StoreError, match=r"No space left on device.*finished entries are kept"):
            store.save("next", torch.ones(1000))
        monkeypatch.undo()
        assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
            [LOCK_FILE, MANIFEST_FILE, "done.json", "done.safetensors"]
        )
        assert not store.has("next") and torch.equal(store.load("done"), torch.arange(5))
        assert torch.equal(store.get_or_compute("next", lambda: torch.ones(3)), torch.ones(3))


def test_disk_full_while_writing_metadata_leaves_no_entry(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with open_store(tmp_path) as store:
        store.save("done", torch.arange(5))
        monkeypatch.setattr(store_module, "atomic_write_json", disk_full)
        with pytest.raises(StoreError, match="No space left"):
            store.save("next", torch.ones(10))
        monkeypatch.undo()
        assert not (tmp_path / "next.safetensors").exists() and not store.has("next")
        assert store.names() == ["done"]


def test_stale_temp_files_are_removed_on_open(tmp_path: Path) -> None:
    open_store(tmp_path).close()
    (tmp_path / ".x.safetensors.abc123.tmp").write_bytes(b"partial")
    open_store(tmp_path).close()
    assert sorted(p.name for p in tmp_path.iterdir()) == [LOCK_FILE, MANIFEST_FILE]


def test_fingerprints() -> None:
    params = {"w": torch.arange(6.0).reshape(2, 3), "b": torch.zeros(3)}
    base = fingerprint_parameters(params)
    assert base == fingerprint_parameters(dict(reversed(params.items())))
    assert base != fingerprint_parameters({**params, "w": params["w"].reshape(3, 2)})
    assert base != fingerprint_parameters({**params, "w": params["w"].double()})
    assert base != fingerprint_parameters({**params, "b": torch.tensor([0.0, 0.0, 1e-30])})
    assert base != fingerprint_parameters({"W": params["w"], "b": params["b"]})
    assert fingerprint_tensors(params) == base
    nested = (torch.ones(2), {"ids": torch.arange(3)})
    assert fingerprint_tensors(nested) == fingerprint_parameters({"0": torch.ones(2), "1.ids": torch.arange(3)})
    with pytest.raises(DataError, match="expected tensors"):
        fingerprint_tensors({"a": [1, 2]})
    records = [{"premise": "a", "label": 0}, {"label": 1, "premise": "b"}]
    assert fingerprint_records(records) == fingerprint_records([{"label": 0, "premise": "a"}, records[1]])
    assert fingerprint_records(records) != fingerprint_records(records[::-1])
    with pytest.raises(DataError, match="record 1"):
        fingerprint_records([{}, {"x": {1, 2}}])


TENSOR_DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64, torch.int16, torch.bool]


@st.composite
def tensor_dicts(draw: st.DrawFn) -> dict[str, torch.Tensor]:
    """Random dicts of small tensors of mixed dtypes and shapes (including scalars and empty tensors)."""
    keys = draw(st.lists(st.text(min_size=1, max_size=8), min_size=0, max_size=4, unique=True))
    out = {}
    for key in keys:
        shape = draw(st.lists(st.integers(0, 4), max_size=3))
        seed = draw(st.integers(0, 2**31 - 1))
        values = torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * 100
        out[key] = values.to(draw(st.sampled_from(TENSOR_DTYPES)))
    return out


@settings(max_examples=40, deadline=None)
@given(tensors=tensor_dicts())
def test_random_tensor_dicts_round_trip(tensors: dict[str, torch.Tensor]) -> None:
    with tempfile.TemporaryDirectory() as folder, open_store(Path(folder)) as store:
        store.save("entry", tensors)
        loaded = store.load("entry")
        assert list(loaded) == list(tensors)
        for key, tensor in tensors.items():
            assert loaded[key].dtype == tensor.dtype and loaded[key].shape == tensor.shape
            assert torch.equal(loaded[key], tensor)


def test_atomic_writes_get_the_permissions_open_would_give(tmp_path: Path) -> None:
    umask = os.umask(0o027)
    os.umask(umask)
    written = fastif.files.atomic_write_text(tmp_path / "note.txt", "hello")
    expected = fastif.files.FILE_MODE
    assert expected == 0o666 & ~umask and stat.S_IMODE(written.stat().st_mode) == expected  # not mkstemp's 0600
    assert written.read_text() == "hello" and [p.name for p in tmp_path.iterdir()] == ["note.txt"]
