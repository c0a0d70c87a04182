"""Resumable on-disk store: one folder per run holding named tensors that survive crashes and are never recomputed.

Layout of a store folder::

    manifest.json        format version, model_fingerprint, data_fingerprint, stage configs (written at creation)
    .lock                flock-ed by the coordinating process for as long as the run holds the store open
    <name>.safetensors   one entry: a tensor or a dict of tensors (or <name>.npy for a big array, read as a memmap)
    <name>.json          the entry's sidecar: data file name, shapes, dtypes, size, SHA-256 and caller metadata

Design: an entry is committed by two atomic renames, the data file first and its sidecar second, so a data file
without a sidecar is an unfinished entry and is recomputed. Entries never share a file, so worker processes of the
same run can save *different* entries (e.g. shards) at the same time without a shared-manifest race, and the
top-level manifest only changes when a store is created or overwritten. The coordinating process opens the store
with :meth:`Store.open`, which takes an exclusive non-blocking ``flock`` on ``.lock`` so a second run on the same
folder fails at once; worker processes use :meth:`Store.attach`, which checks the fingerprints but takes no lock.
Each entry must have a single writer.

Loading checks the size and SHA-256 recorded in the sidecar and parses safetensors / ``.npy`` only, never pickle:
a corrupt, truncated or pickled file raises :class:`~fastif.errors.StoreError` naming the file.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import shutil
import weakref
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import IO, Any

import numpy as np
import safetensors.torch
from safetensors import SafetensorError
from torch import Tensor

from ..errors import ConfigError, DataError, StoreError
from ..files import atomic_write, atomic_write_json
from ..fingerprint import dtype_name as _dtype_name
from ..fingerprint import file_digest as _file_digest

FORMAT = "fastif-store"
FORMAT_VERSION = 1
MANIFEST_FILE = "manifest.json"
LOCK_FILE = ".lock"
TENSOR_SUFFIX = ".safetensors"
ARRAY_SUFFIX = ".npy"
SINGLE_KEY = "tensor"  # the safetensors key of an entry saved from a single tensor

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,199}")
_RESERVED = {Path(MANIFEST_FILE).stem}

Stored = Tensor | dict[str, Tensor] | np.ndarray
Computed = Tensor | Mapping[str, Tensor] | np.ndarray


def _check_name(name: str) -> None:
    """Refuse entry names that are not plain file stems or that collide with the manifest."""
    if not isinstance(name, str) or not _NAME.fullmatch(name) or name in _RESERVED:
        raise StoreError(
            f"invalid store entry name {name!r}: use letters, digits, '_' and '-' (not starting with "
            f"'_' or '-', at most 200 characters, not {sorted(_RESERVED)})"
        )


def _specs(tensors: Mapping[str, Tensor | np.ndarray]) -> list[dict[str, Any]]:
    """Key, shape and dtype of each tensor, in order, as recorded in an entry's sidecar."""
    return [{"key": key, "shape": list(t.shape), "dtype": _dtype_name(t.dtype)} for key, t in tensors.items()]


def _canonical(value: Any, what: str, error: type[Exception]) -> Any:
    """``value`` after a JSON round trip (tuples become lists), so stored and given configs compare equal."""
    try:
        return json.loads(json.dumps(value, sort_keys=True, allow_nan=False))
    except (TypeError, ValueError) as err:
        raise error(f"{what} must be JSON-serialisable (no NaN): {err}") from err


def _diff(old: Any, new: Any, path: str = "config") -> list[str]:
    """Paths where two JSON values differ, as ``path: old -> new`` lines."""
    if isinstance(old, dict) and isinstance(new, dict):
        keys = sorted(set(old) | set(new))
        return [line for key in keys for line in _diff(old.get(key), new.get(key), f"{path}.{key}")]
    return [] if old == new else [f"{path}: {old!r} -> {new!r}"]


def _looks_pickled(head: bytes) -> bool:
    """Whether bytes start like a torch.save zip archive or a pickle stream (protocol 2-5)."""
    return head.startswith(b"PK\x03\x04") or (head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"))


_HELD_LOCKS: weakref.WeakSet[IO[str]] = weakref.WeakSet()  # the lock handles of this process's open stores


def _drop_inherited_locks() -> None:
    """In a forked child, close its copies of the parent's lock handles: else the lock outlives the parent's close."""
    for handle in list(_HELD_LOCKS):
        handle.close()
    _HELD_LOCKS.clear()


os.register_at_fork(after_in_child=_drop_inherited_locks)


def _take_lock(folder: Path) -> IO[str]:
    """Hold an exclusive non-blocking flock on ``folder/.lock``; StoreError if another process holds it."""
    handle = open(folder / LOCK_FILE, "a+", encoding="utf-8")  # noqa: SIM115 - held open for the store's lifetime
    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as err:
        handle.seek(0)
        holder = handle.read().strip()
        handle.close()
        who = f" (pid {holder})" if holder.isdigit() else ""
        raise StoreError(
            f"another fastif run{who} is writing to {folder}; wait for it or use another --output"
        ) from err
    handle.seek(0)
    handle.truncate()
    handle.write(f"{os.getpid()}\n")
    handle.flush()
    _HELD_LOCKS.add(handle)
    return handle


class Store:
    """A run's folder of named, checksummed tensors; open it with :meth:`open` (coordinator) or :meth:`attach`."""

    def __init__(self, folder: Path, manifest: dict[str, Any], lock: IO[str] | None) -> None:
        self.folder = folder
        self.manifest = manifest
        self._lock = lock
        self._closed = False

    @classmethod
    def open(
        cls,
        folder: str | os.PathLike[str],
        *,
        model_fingerprint: str,
        data_fingerprint: str,
        config: Mapping[str, Any],
        overwrite: bool = False,
    ) -> Store:
        """Create or resume the store in ``folder`` and lock it; refuse one made for another model, data or config."""
        folder = Path(folder)
        expected = _expected_manifest(model_fingerprint, data_fingerprint, config)
        if folder.exists() and not folder.is_dir():
            raise StoreError(f"{folder} exists and is not a folder; choose another --output")
        folder.mkdir(parents=True, exist_ok=True)
        new_lock = not (folder / LOCK_FILE).exists()
        lock = _take_lock(folder)
        try:
            existing = _read_manifest(folder)
            if existing is None:
                _refuse_foreign_folder(folder)
            elif overwrite:
                _clear(folder)
            else:
                _check_manifest(folder, existing, expected)
            _remove_stale_temp_files(folder)
            if existing is None or overwrite:
                atomic_write_json(folder / MANIFEST_FILE, expected)
        except BaseException:
            if new_lock:  # a refused folder keeps no trace of the attempt
                (folder / LOCK_FILE).unlink(missing_ok=True)
            lock.close()
            raise
        return cls(folder, expected, lock)

    @classmethod
    def attach(
        cls, folder: str | os.PathLike[str], *, model_fingerprint: str, data_fingerprint: str, config: Mapping[str, Any]
    ) -> Store:
        """Open an existing store from a worker process of the run that holds its lock; checks fingerprints only."""
        folder = Path(folder)
        existing = _read_manifest(folder)
        if existing is None:
            raise StoreError(f"no fastif store in {folder}; the coordinating process must create it with Store.open")
        expected = _expected_manifest(model_fingerprint, data_fingerprint, config)
        _check_manifest(folder, existing, expected)
        return cls(folder, expected, None)

    def close(self) -> None:
        """Release the lock; the store refuses further writes."""
        self._closed = True
        if self._lock is not None:
            self._lock.close()
            self._lock = None

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _paths(self, name: str) -> tuple[Path, Path]:
        """The sidecar path and the stem for the data file of entry ``name`` (validated)."""
        _check_name(name)
        return self.folder / f"{name}.json", self.folder / name

    def has(self, name: str) -> bool:
        """Whether entry ``name`` is finished: its sidecar and its data file both exist."""
        sidecar, _ = self._paths(name)
        if not sidecar.is_file():
            return False
        return (self.folder / self._record(name)["file"]).is_file()

    def names(self) -> list[str]:
        """Names of all finished entries, sorted."""
        found = (path.stem for path in self.folder.glob("*.json") if path.name != MANIFEST_FILE)
        return sorted(name for name in found if _NAME.fullmatch(name) and self.has(name))

    def meta(self, name: str) -> dict[str, Any]:
        """The caller metadata saved with entry ``name``."""
        return dict(self._record(name)["meta"])

    def _record(self, name: str) -> dict[str, Any]:
        """Parse the sidecar of entry ``name``; StoreError if it is missing or unreadable."""
        sidecar, _ = self._paths(name)
        try:
            record = json.loads(sidecar.read_text(encoding="utf-8"))
        except FileNotFoundError as err:
            raise StoreError(f"no entry {name!r} in {self.folder}; compute and save it first") from err
        except (OSError, ValueError) as err:
            raise StoreError(f"{sidecar} is unreadable ({err}); delete it to recompute {name!r}") from err
        files = {"tensor": name + TENSOR_SUFFIX, "dict": name + TENSOR_SUFFIX, "array": name + ARRAY_SUFFIX}
        valid = isinstance(record, dict) and {"file", "kind", "tensors", "sha256", "bytes", "meta"} <= set(record)
        if not valid or files.get(record["kind"]) != record["file"]:  # the file never points outside the store
            raise StoreError(f"{sidecar} is not a fastif entry record; delete it to recompute {name!r}")
        return record

    def save(self, name: str, value: Tensor | Mapping[str, Tensor], meta: Mapping[str, Any] | None = None) -> None:
        """Save a tensor or a dict of tensors as safetensors entry ``name`` (atomically; replaces an old entry)."""
        tensors, kind = _tensor_dict(name, value)
        specs = _specs(tensors)
        self._commit(name, TENSOR_SUFFIX, kind, specs, meta, lambda tmp: safetensors.torch.save_file(tensors, tmp))

    def save_array(self, name: str, array: np.ndarray, meta: Mapping[str, Any] | None = None) -> None:
        """Save a big numeric numpy array as ``.npy`` entry ``name``; :meth:`load` maps it instead of reading it."""
        if not isinstance(array, np.ndarray) or array.dtype.kind not in "biufc":
            raise DataError(f"entry {name!r}: save_array takes a numeric numpy array, got {type(array).__name__}")
        specs = _specs({SINGLE_KEY: array})

        def write(tmp: str) -> None:
            with open(tmp, "wb") as handle:
                np.save(handle, array, allow_pickle=False)

        self._commit(name, ARRAY_SUFFIX, "array", specs, meta, write)

    def _commit(
        self,
        name: str,
        suffix: str,
        kind: str,
        specs: list[dict[str, Any]],
        meta: Mapping[str, Any] | None,
        write: Callable[[str], None],
    ) -> None:
        """Drop any old entry, write the data file atomically, then its sidecar; a failure leaves no half entry."""
        if self._closed:
            raise StoreError(f"the store in {self.folder} is closed; open it again to write")
        sidecar, stem = self._paths(name)
        meta = _canonical(dict(meta or {}), f"metadata of entry {name!r}", DataError)
        data = stem.with_name(stem.name + suffix)
        digest: dict[str, Any] = {}

        def write_and_hash(tmp: str) -> None:
            write(tmp)
            digest["sha256"], digest["bytes"] = _file_digest(tmp)

        self._forget(name)
        try:
            atomic_write(data, write_and_hash)
            record = {"name": name, "file": data.name, "kind": kind, "tensors": specs, "meta": meta, **digest}
            atomic_write_json(sidecar, record)
        except BaseException as err:  # a full disk, or an interrupt: no data file may stay without its sidecar
            if not sidecar.exists():
                data.unlink(missing_ok=True)
            if not isinstance(err, OSError | SafetensorError):
                raise
            reason = getattr(err, "strerror", None) or err
            raise StoreError(
                f"could not write entry {name!r} to {self.folder}: {reason}; free disk space or fix permissions "
                "and rerun (finished entries are kept)"
            ) from err

    def _forget(self, name: str) -> None:
        """Remove entry ``name``: the sidecar first (so it is unfinished at once), then its data files."""
        sidecar, stem = self._paths(name)
        sidecar.unlink(missing_ok=True)
        for suffix in (TENSOR_SUFFIX, ARRAY_SUFFIX):
            stem.with_name(stem.name + suffix).unlink(missing_ok=True)

    def load(self, name: str, *, verify: bool = True) -> Stored:
        """Load entry ``name`` after checking its size and SHA-256 (``verify=False`` skips the hash of a big array)."""
        record = self._record(name)
        path = self.folder / record["file"]
        if not path.is_file():
            raise StoreError(f"{path} is missing; entry {name!r} is unfinished and must be recomputed")
        if record["kind"] == "array":
            return _load_array(path, record, verify)
        raw = path.read_bytes()
        _verify(path, record, len(raw), hashlib.sha256(raw).hexdigest(), raw[:8])
        try:
            tensors = safetensors.torch.load(raw)
        except SafetensorError as err:
            raise _bad_file(path, f"is not a valid safetensors file ({err})", raw[:8]) from err
        keys = [spec.get("key") for spec in record["tensors"]]
        if set(keys) != set(tensors) or _specs({key: tensors[key] for key in keys}) != record["tensors"]:
            raise _bad_file(path, "does not match its sidecar's keys, shapes and dtypes", raw[:8])
        if record["kind"] == "tensor":
            return tensors[SINGLE_KEY]
        return {key: tensors[key] for key in keys}

    def get_or_compute(self, name: str, fn: Callable[[], Computed], meta: Mapping[str, Any] | None = None) -> Stored:
        """Return finished entry ``name``, or compute it with ``fn()``, save it and return it; never recomputes."""
        if self.has(name):
            return self.load(name)
        value = fn()
        if isinstance(value, np.ndarray):
            self.save_array(name, value, meta)
        else:
            self.save(name, value, meta)
        return value if isinstance(value, Tensor | np.ndarray) else dict(value)

    @staticmethod
    def shard_name(prefix: str, index: int) -> str:
        """Entry name of shard ``index`` of a sharded result (``prefix-00042``)."""
        if isinstance(index, bool) or not isinstance(index, int) or index < 0:
            raise StoreError(f"shard index must be a non-negative integer, got {index!r}")
        name = f"{prefix}-{index:05d}"
        _check_name(name)
        return name

    def completed_shards(self, prefix: str) -> list[int]:
        """Sorted indices of the finished shards of ``prefix``; the rest still have to be computed."""
        self.shard_name(prefix, 0)  # validates the prefix, so it holds no glob metacharacters
        pattern = re.compile(re.escape(prefix) + r"-(\d+)")
        found = (pattern.fullmatch(path.stem) for path in self.folder.glob(f"{prefix}-*.json"))
        return sorted(int(match.group(1)) for match in found if match and self.has(match.group(0)))


def _tensor_dict(name: str, value: Tensor | Mapping[str, Tensor]) -> tuple[dict[str, Tensor], str]:
    """CPU, contiguous, non-aliased tensors to save, and the entry kind ("tensor" or "dict")."""
    if isinstance(value, Tensor):
        items, kind = {SINGLE_KEY: value}, "tensor"
    elif isinstance(value, Mapping):
        items, kind = dict(value), "dict"
    else:
        raise DataError(f"entry {name!r}: save takes a tensor or a dict of tensors, got {type(value).__name__}")
    out: dict[str, Tensor] = {}
    seen: set[int] = set()
    for key, tensor in items.items():
        if not isinstance(key, str) or not isinstance(tensor, Tensor):
            raise DataError(f"entry {name!r}: needs str keys and tensor values, got {key!r}: {type(tensor).__name__}")
        tensor = tensor.detach().cpu().contiguous()
        storage = tensor.untyped_storage().data_ptr()
        if storage in seen and tensor.numel():
            tensor = tensor.clone()  # safetensors refuses tensors that share memory
        seen.add(tensor.untyped_storage().data_ptr())
        out[key] = tensor
    return out, kind


def _bad_file(path: Path, problem: str, head: bytes) -> StoreError:
    """A StoreError for an unusable data file that says how to recover, and whether it looks like pickle."""
    if _looks_pickled(head):
        problem += "; it holds a pickle payload (a torch.save file?), which fastif never loads"
    return StoreError(f"{path} {problem}; delete it to recompute that entry, or rerun with --overwrite")


def _verify(path: Path, record: Mapping[str, Any], size: int, sha256: str | None, head: bytes) -> None:
    """Compare a data file's size and hash with its sidecar; StoreError naming the file if they differ."""
    if size != record["bytes"]:
        kind = "truncated" if size < record["bytes"] else "larger than recorded"
        raise _bad_file(path, f"is {kind} ({size} of {record['bytes']} bytes)", head)
    if sha256 is not None and sha256 != record["sha256"]:
        raise _bad_file(path, "is corrupt (SHA-256 mismatch)", head)


def _load_array(path: Path, record: Mapping[str, Any], verify: bool) -> np.ndarray:
    """Memory-map a ``.npy`` entry after checking its size (and hash), refusing object (pickled) arrays."""
    with open(path, "rb") as handle:
        head = handle.read(8)
    sha256 = _file_digest(path)[0] if verify else None
    _verify(path, record, path.stat().st_size, sha256, head)
    try:
        array = np.load(path, mmap_mode="r", allow_pickle=False)
    except ValueError as err:
        raise _bad_file(path, f"is not a plain .npy array ({err})", head) from err
    if _specs({SINGLE_KEY: array}) != record["tensors"]:
        raise _bad_file(path, "does not match its sidecar's shape and dtype", head)
    return array


def _expected_manifest(model_fingerprint: str, data_fingerprint: str, config: Mapping[str, Any]) -> dict[str, Any]:
    """The manifest a store for this model, data and config must have."""
    for label, value in (("model_fingerprint", model_fingerprint), ("data_fingerprint", data_fingerprint)):
        if not isinstance(value, str) or not value:
            raise ConfigError(f"{label} must be a non-empty string (see fastif.store.fingerprint_*), got {value!r}")
    if not isinstance(config, Mapping):
        raise ConfigError(f"store config must be a dict of stage configs, got {type(config).__name__}")
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "model_fingerprint": model_fingerprint,
        "data_fingerprint": data_fingerprint,
        "config": _canonical(dict(config), "store config", ConfigError),
    }


def _read_manifest(folder: Path) -> dict[str, Any] | None:
    """The folder's manifest, or None if it has none; StoreError if it is unreadable or not fastif's."""
    path = folder / MANIFEST_FILE
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise StoreError(f"{path} is unreadable ({err}); rerun with --overwrite to start afresh") from err
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise StoreError(f"{folder} holds a {MANIFEST_FILE} that is not a fastif store's; choose another --output")
    return manifest


def _check_manifest(folder: Path, existing: Mapping[str, Any], expected: Mapping[str, Any]) -> None:
    """Refuse to resume a store written by another format, model, dataset or config, naming what differs."""
    fix = "rerun with --overwrite to discard it, or choose another --output"
    if existing.get("format_version") != expected["format_version"]:
        raise StoreError(
            f"{folder} was written in store format {existing.get('format_version')!r}, this fastif uses "
            f"{expected['format_version']}; {fix}"
        )
    for key, what in (("model_fingerprint", "model"), ("data_fingerprint", "dataset")):
        if existing.get(key) != expected[key]:
            raise StoreError(
                f"{folder} belongs to a different {what} ({key} {str(existing.get(key))[:12]}... != "
                f"{expected[key][:12]}...); {fix}"
            )
    changes = _diff(existing.get("config"), expected["config"])
    if changes:
        shown = "; ".join(changes[:5]) + (f"; and {len(changes) - 5} more" if len(changes) > 5 else "")
        raise StoreError(f"{folder} was made with a different config ({shown}); {fix}")


def _refuse_foreign_folder(folder: Path) -> None:
    """Refuse to turn a non-empty folder without a fastif manifest into a store (never delete user files)."""
    others = sorted(path.name for path in folder.iterdir() if path.name != LOCK_FILE and not _is_temp(path))
    if others:
        raise StoreError(
            f"{folder} is not empty and is not a fastif store (it holds {', '.join(others[:3])}"
            f"{', ...' if len(others) > 3 else ''}); choose another --output or empty it yourself"
        )


def _is_temp(path: Path) -> bool:
    """Whether ``path`` is a temporary file left by an interrupted :func:`fastif.files.atomic_write`."""
    return path.name.startswith(".") and path.name.endswith(".tmp")


def _remove_stale_temp_files(folder: Path) -> None:
    """Delete temp files from interrupted writes; safe because the caller holds the lock before workers start."""
    for path in folder.iterdir():
        if _is_temp(path) and path.is_file():
            path.unlink(missing_ok=True)


def _clear(folder: Path) -> None:
    """Delete every entry of a store, keeping the lock file and (until it is replaced) the manifest."""
    for path in folder.iterdir():
        if path.name in (LOCK_FILE, MANIFEST_FILE):
            continue
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()
