"""FastIF end to end on a text classifier of any recipe: typed stage configs, the recipe protocol, the
:class:`Pipeline`, and its outputs.

>>> config = load_pipeline_config("fastif.toml")        # or PipelineConfig() for the embedded NLI recipe's demo
>>> report, files = run_pipeline(config)                # influence.json, influence.csv, pipeline_config.json
"""

from __future__ import annotations

from .config import (
    CandidatesConfig,
    DataConfig,
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
from .core import Pipeline, build_adapter, resolve_device, run_pipeline, selected_parameters, solver_config
from .output import format_report, format_timings, print_report, write_results
from .recipe import RECIPE_GROUP, LoadedModel, Recipe, find_recipe

__all__ = [
    "RECIPE_GROUP",
    "CandidatesConfig",
    "DataConfig",
    "LoadedModel",
    "ModelConfig",
    "OutputConfig",
    "ParameterConfig",
    "Pipeline",
    "PipelineConfig",
    "Recipe",
    "ScoringConfig",
    "SolverStageConfig",
    "build_adapter",
    "config_from_mapping",
    "find_recipe",
    "format_report",
    "format_timings",
    "load_pipeline_config",
    "print_report",
    "resolve_device",
    "run_pipeline",
    "selected_parameters",
    "solver_config",
    "with_overrides",
    "write_results",
]
