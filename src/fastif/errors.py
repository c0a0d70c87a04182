"""User-facing errors: each names the problem and the fix; the CLI prints them in one line and exits 2."""

from __future__ import annotations


class FastIFError(Exception):
    """Base class for errors caused by user input or configuration, not by a bug in fastif."""


class ConfigError(FastIFError, ValueError):
    """A configuration value or file is invalid (unknown key, wrong type, out of range).

    ``key`` is the dotted config key at fault, when there is one, so the CLI can name its command-line flag too.
    """

    def __init__(self, message: str, key: str | None = None) -> None:
        super().__init__(message)
        self.key = key


class DataError(FastIFError, ValueError):
    """Input data is missing, malformed, empty or inconsistent with the model."""


class ModelError(FastIFError, ValueError):
    """The model, its loss or its parameter selection cannot be used as asked."""


class SolverError(FastIFError, RuntimeError):
    """An inverse-HVP solver cannot run or did not converge (e.g. LiSSA diverged)."""


class StoreError(FastIFError, RuntimeError):
    """An on-disk store is corrupt, locked, or belongs to another model or dataset."""


class OutputError(FastIFError, RuntimeError):
    """An output or cache folder cannot be created or written (checked before any long computation)."""
