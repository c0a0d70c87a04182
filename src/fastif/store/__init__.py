"""Store stage: the on-disk store of named tensors with a fingerprinted manifest (:mod:`.store`), and the cached
artefacts built on it (:mod:`.artifacts`). ``fastif.store`` keeps the names it had as a module (the fingerprints
now live in :mod:`fastif.fingerprint`)."""

from __future__ import annotations

from ..fingerprint import fingerprint_parameters, fingerprint_records, fingerprint_tensors
from .store import LOCK_FILE, MANIFEST_FILE, Store

__all__ = [
    "LOCK_FILE",
    "MANIFEST_FILE",
    "Store",
    "fingerprint_parameters",
    "fingerprint_records",
    "fingerprint_tensors",
]
