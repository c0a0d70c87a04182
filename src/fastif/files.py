"""Atomic file writes (write to a temporary file in the same folder, fsync, then rename over the target), and the
up-front check that an output folder can be written."""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .errors import DataError, OutputError


def _umask() -> int:
    """The process's umask (read once at import: os.umask can only be read by setting it)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


FILE_MODE = 0o666 & ~_umask()
"""Permissions of written files: what ``open()`` would give (mkstemp's temporary files are 0600)."""


def atomic_write(path: str | os.PathLike[str], write: Callable[[str], None]) -> Path:
    """Call ``write(tmp_path)`` and move the result to ``path`` atomically; the target is never half-written."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.chmod(tmp, FILE_MODE)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return target


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically."""
    return atomic_write(path, lambda tmp: Path(tmp).write_bytes(data))


def atomic_write_text(path: str | os.PathLike[str], text: str) -> Path:
    """Write UTF-8 ``text`` to ``path`` atomically."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike[str], obj: Any) -> Path:
    """Write ``obj`` as indented JSON to ``path`` atomically."""
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def atomic_dir(path: str | os.PathLike[str], write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp_folder)`` in a temporary sibling of ``path``, then rename it to ``path``, so ``path`` is never
    half-written. An empty folder at ``path`` is replaced; a non-empty one makes the rename fail (``OSError``)."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        write(tmp)
        if target.is_dir() and not any(target.iterdir()):
            target.rmdir()
        os.rename(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def read_json(path: str | os.PathLike[str], error: type[Exception] = DataError, fix: str = "") -> Any:
    """Parse a JSON file; an unreadable or malformed file raises ``error`` naming it (and ``fix`` when given)."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise error(f"cannot read {path}: {err}" + (f"; {fix}" if fix else "")) from err


def jsonable(value: Any) -> Any:
    """``value`` as standard JSON data: tensors and arrays become (nested) lists, tuples lists, NaN/inf None."""
    if isinstance(value, torch.Tensor | np.ndarray):
        return jsonable(value.tolist())
    if isinstance(value, np.generic):
        return jsonable(value.item())
    if isinstance(value, dict):
        return {key: jsonable(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(item) for item in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def check_writable(folder: str | os.PathLike[str], what: str = "--output", fix: str = "") -> Path:
    """Refuse a ``folder`` that cannot be created or written, so a long run cannot fail at its first write.

    Creates nothing: it opens a nameless temporary file in the nearest existing ancestor. ``what`` names the option
    (or folder) in the OutputError, ``fix`` replaces the default advice "choose another ``what``".
    """
    target = Path(folder)
    existing = next(path for path in (target, *target.parents) if os.path.lexists(path))
    fix = fix or f"choose another {what}"
    if not existing.is_dir():
        raise OutputError(f"cannot create the {what} folder {target}: {existing} is not a folder; {fix}")
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as err:
        raise OutputError(
            f"cannot write to the {what} folder {target}: {existing} is not writable ({err.strerror}); {fix} "
            f"or make {existing} writable"
        ) from err
    return target


def cache_root() -> Path:
    """The one cache root: ``$FASTIF_CACHE``, else ``$XDG_CACHE_HOME/fastif``, else ``~/.cache/fastif``."""
    root = os.environ.get("FASTIF_CACHE")
    if root:
        return Path(root).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser() / "fastif"


def cache_dir(kind: str = "models") -> Path:
    """The cache subfolder of one kind of artefact (``models``, ``experiments``, ...) under :func:`cache_root`."""
    return cache_root() / kind


def check_fresh(folder: str | os.PathLike[str], finished: str, overwrite: bool, what: str = "--output") -> Path:
    """Refuse a ``folder`` holding a finished run (its ``finished`` file) unless ``overwrite``, so running a command
    again never silently replaces its results."""
    done = Path(folder) / finished
    if done.exists() and not overwrite:
        raise OutputError(
            f"{folder} holds a finished run ({done}); pass --overwrite (output.overwrite = true) to replace it, "
            f"or choose another {what}"
        )
    return Path(folder)
