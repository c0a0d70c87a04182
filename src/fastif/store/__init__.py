"""Store stage: the on-disk store of named tensors with a fingerprinted manifest (:mod:`.store`), and the cached
artefacts built on it (:mod:`.artifacts`). ``fastif.store`` keeps the names of :mod:`.store`."""

from __future__ import annotations

from .store import (
    LOCK_FILE,
    MANIFEST_FILE,
    Store,
    fingerprint_parameters,
    fingerprint_records,
    fingerprint_tensors,
)

__all__ = [
    "LOCK_FILE",
    "MANIFEST_FILE",
    "Store",
    "fingerprint_parameters",
    "fingerprint_records",
    "fingerprint_tensors",
]
