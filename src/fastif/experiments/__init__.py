"""FastIF's applications 3 and 4: correcting model errors (MNLI -> HANS) and fine-tuning on unseen data (HANS,
ANLI) by one SGD step at a time on the most influential points. See docs/experiments.md.

Names are imported lazily, so that registering the CLI commands (:func:`add_experiment_commands`) stays cheap.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "add_experiment_commands": "cli",
    "MODES": "config",
    "ExperimentConfig": "config",
    "SplitConfig": "config",
    "default_config": "config",
    "load_experiment_config": "config",
    "quick_config": "config",
    "ModelFactory": "finetune",
    "run_experiment": "finetune",
    "trained_nli_model": "finetune",
    "HiddenStateData": "head",
    "TopLayers": "head",
    "encode_hidden": "head",
    "markdown_table": "report",
    "summarise": "report",
    "write_results": "report",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    """Import ``name`` from its submodule on first use."""
    if name not in _EXPORTS:
        raise AttributeError(f"module 'fastif.experiments' has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
