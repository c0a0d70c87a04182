"""The small shared pieces the layout introduced: recipe lookup, JSON and folder helpers, the cache root, the
fingerprints' home, and the explorer's browser lookup."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from fastif.errors import ConfigError, DataError, StoreError
from fastif.files import atomic_dir, cache_dir, cache_root, jsonable, read_json
from fastif.fingerprint import file_digest, folder_fingerprint
from fastif.pipeline import find_recipe
from fastif.report.screenshot import BROWSER_ENV, find_browser


def test_recipes_are_found_by_entry_point_or_module_attribute() -> None:
    nli = find_recipe("nli")
    assert nli is find_recipe("fastif.recipes.nli:RECIPE") and nli.name == "nli" and nli.damping > 0
    with pytest.raises(ConfigError, match=r"no recipe 'nope'.*pip install"):
        find_recipe("nope")
    with pytest.raises(ConfigError, match="module:attribute"):
        find_recipe("fastif.recipes.nli:MISSING")


def test_jsonable_turns_tensors_arrays_and_non_finite_floats_into_plain_json() -> None:
    value = {"t": torch.tensor([1.0, float("nan")]), "a": np.arange(2), "s": np.float32(2.5), "x": (math.inf, 1)}
    assert jsonable(value) == {"t": [1.0, None], "a": [0, 1], "s": 2.5, "x": [None, 1]}
    json.dumps(jsonable(value), allow_nan=False)


def test_read_json_names_the_file_and_the_fix(tmp_path: Path) -> None:
    (tmp_path / "ok.json").write_text('{"a": 1}')
    assert read_json(tmp_path / "ok.json") == {"a": 1}
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(StoreError, match=r"bad.json.*; delete it"):
        read_json(tmp_path / "bad.json", StoreError, "delete it")
    with pytest.raises(DataError, match=r"missing\.json"):
        read_json(tmp_path / "missing.json")


def test_atomic_dir_leaves_no_half_written_folder(tmp_path: Path) -> None:
    target = tmp_path / "model"
    atomic_dir(target, lambda tmp: (tmp / "weights").write_text("w"))
    assert (target / "weights").read_text() == "w"

    def fail(tmp: Path) -> None:
        (tmp / "part").write_text("p")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        atomic_dir(tmp_path / "other", fail)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["model"]
    with pytest.raises(OSError):  # a non-empty folder is never replaced
        atomic_dir(target, lambda tmp: (tmp / "weights").write_text("new"))
    assert (target / "weights").read_text() == "w" and sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_one_cache_root_with_a_folder_per_artefact(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FASTIF_CACHE", str(tmp_path / "cache"))
    assert cache_root() == tmp_path / "cache" and cache_dir("experiments") == tmp_path / "cache" / "experiments"
    monkeypatch.delenv("FASTIF_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "xdg" / "fastif" / "models"


def test_folder_fingerprint_follows_file_names_and_bytes(tmp_path: Path) -> None:
    (tmp_path / "a").write_bytes(b"1")
    first = folder_fingerprint(tmp_path)
    assert file_digest(tmp_path / "a")[1] == 1
    (tmp_path / "a").write_bytes(b"2")
    second = folder_fingerprint(tmp_path)
    (tmp_path / "a").rename(tmp_path / "b")
    assert len({first, second, folder_fingerprint(tmp_path)}) == 3


def test_the_browser_comes_from_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    browser = tmp_path / "chromium"
    browser.write_text("#!/bin/sh\n")
    monkeypatch.setenv(BROWSER_ENV, str(browser))
    assert find_browser() == browser
    monkeypatch.setenv(BROWSER_ENV, str(tmp_path / "absent"))
    assert find_browser() is None


def test_indices_outside_a_data_set_are_refused_in_one_line():
    from fastif.data.base import checked_indices
    from fastif.errors import DataError

    assert checked_indices([0, 2.0, 4], 5, "documents") == [0, 2, 4]
    for bad in ([5], [-1], [0, 9]):
        with pytest.raises(DataError, match=r"^indices out of range for a data set of 5 documents$"):
            checked_indices(bad, 5, "documents")
