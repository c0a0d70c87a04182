"""Every SHA-256 identity fastif keys caches and stores by, in one place: tensors and parameters (name, dtype,
shape and bytes, length-prefixed), JSON-able records, files and checkpoint folders.

A fingerprint changes exactly when its input does, so a cached artefact whose key matches can be reused.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .errors import DataError


def dtype_name(dtype: torch.dtype | np.dtype) -> str:
    """Short dtype name ("float32") for sidecars and fingerprints."""
    return str(dtype).removeprefix("torch.")


def _hash_tensor(digest: Any, name: str, tensor: Tensor) -> None:
    """Feed a tensor's name, dtype, shape and raw bytes into ``digest`` (length-prefixed, so unambiguous)."""
    flat = tensor.detach().cpu().contiguous().reshape(-1)
    header = {"name": name, "dtype": dtype_name(flat.dtype), "shape": list(tensor.shape)}
    header["nbytes"] = flat.numel() * flat.element_size()
    digest.update(json.dumps(header, sort_keys=True).encode("utf-8") + b"\0")
    digest.update(flat.view(torch.uint8).numpy())


def fingerprint_parameters(named_tensors: Mapping[str, Tensor]) -> str:
    """SHA-256 over the names, shapes, dtypes and bytes of the selected parameters; identifies a model state."""
    digest = hashlib.sha256(b"fastif-tensors-v1\0")
    for name in sorted(named_tensors):
        tensor = named_tensors[name]
        if not isinstance(tensor, Tensor):
            raise DataError(f"cannot fingerprint {name!r}: expected a tensor, got {type(tensor).__name__}")
        _hash_tensor(digest, name, tensor)
    return digest.hexdigest()


def _flatten(value: Any, path: str, out: dict[str, Tensor]) -> None:
    """Collect the tensors of a nested tensor / dict / list / tuple under dotted paths."""
    if isinstance(value, Tensor):
        out[path] = value
    elif isinstance(value, Mapping):
        for key, item in value.items():
            _flatten(item, f"{path}.{key}" if path else str(key), out)
    elif isinstance(value, list | tuple):
        for index, item in enumerate(value):
            _flatten(item, f"{path}.{index}" if path else str(index), out)
    else:
        raise DataError(f"cannot fingerprint {path or 'value'!r}: expected tensors, got {type(value).__name__}")


def fingerprint_tensors(tensors: Tensor | Mapping[str, Any] | list[Any] | tuple[Any, ...]) -> str:
    """SHA-256 of a tensor or nested dict/list/tuple of tensors (e.g. a dataset's batch); identifies the data."""
    flat: dict[str, Tensor] = {}
    _flatten(tensors, "", flat)
    return fingerprint_parameters(flat)


def fingerprint_records(records: Iterable[Any]) -> str:
    """SHA-256 over JSON-able records (canonical JSON, one per line, in order); identifies a raw dataset."""
    digest = hashlib.sha256(b"fastif-records-v1\0")
    for index, record in enumerate(records):
        try:
            line = json.dumps(record, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
        except (TypeError, ValueError) as err:
            raise DataError(f"record {index} is not JSON: {err}; use plain dicts/lists/str/numbers") from err
        digest.update(line.encode("utf-8") + b"\n")
    return digest.hexdigest()


def file_digest(path: str | Path) -> tuple[str, int]:
    """SHA-256 and size of a file, read in chunks."""
    digest, size = hashlib.sha256(), 0
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
            size += len(chunk)
    return digest.hexdigest(), size


def file_sha256(path: str | Path) -> str:
    """SHA-256 of a file (the first half of :func:`file_digest`)."""
    return file_digest(path)[0]


def folder_fingerprint(folder: str | Path) -> str:
    """SHA-256 over the names and bytes of a folder's top-level files, in name order (e.g. a checkpoint folder)."""
    digest = hashlib.sha256()
    for file in sorted(p for p in Path(folder).iterdir() if p.is_file()):
        digest.update(file.name.encode() + b"\0")
        with open(file, "rb") as handle:
            while block := handle.read(1 << 20):
                digest.update(block)
    return digest.hexdigest()
