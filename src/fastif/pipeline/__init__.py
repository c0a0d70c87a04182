"""FastIF end to end on a text classifier: typed stage configs, the :class:`Pipeline`, and its outputs.

>>> config = load_pipeline_config("fastif.toml")        # or PipelineConfig() for the embedded NLI demo
>>> report, files = run_pipeline(config)                # influence.json, influence.csv, pipeline_config.json
"""

from __future__ import annotations

from .config import (
    DataConfig,
    KNNConfig,
    ModelConfig,
    OutputConfig,
    ParameterConfig,
    PipelineConfig,
    ScoringConfig,
    SolverStageConfig,
    config_from_mapping,
    load_pipeline_config,
    with_overrides,
)
from .core import Pipeline, run_pipeline, solver_config
from .inputs import LoadedModel, load_model, selected_parameters
from .output import format_report, format_timings, print_report, write_results

__all__ = [
    "DataConfig",
    "KNNConfig",
    "LoadedModel",
    "ModelConfig",
    "OutputConfig",
    "ParameterConfig",
    "Pipeline",
    "PipelineConfig",
    "ScoringConfig",
    "SolverStageConfig",
    "config_from_mapping",
    "format_report",
    "format_timings",
    "load_model",
    "load_pipeline_config",
    "print_report",
    "run_pipeline",
    "selected_parameters",
    "solver_config",
    "with_overrides",
    "write_results",
]
