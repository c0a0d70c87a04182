"""Every numeric option of every typed config is checked at construction (issue 14): generated from the dataclass
fields, so a new solver, config or field is covered without a new test."""

from __future__ import annotations

import dataclasses
import math
import types
import typing

import pytest

from fastif import AdapterConfig
from fastif.applications.finetune.config import FinetuneConfig, SplitConfig
from fastif.applications.simulatability import SimulatabilityConfig
from fastif.candidates import CandidateConfig
from fastif.cli.options import _name_the_flag
from fastif.errors import ConfigError
from fastif.gradient_store import GradientStoreConfig
from fastif.pipeline import PipelineConfig
from fastif.pipeline.config import CandidatesConfig, DataConfig, ParameterConfig, ScoringConfig, SolverStageConfig
from fastif.projection import ProjectionConfig
from fastif.recipes.nli.apps import ExperimentConfig, NLIGraphConfig
from fastif.recipes.tabular import TabularConfig
from fastif.runner import RunnerConfig
from fastif.scores import ScoreConfig
from fastif.solvers import REGISTRY, LiSSAConfig

PREFIXES: dict[type, str] = {solver.config_class: "solver." for solver in REGISTRY.values()}
PREFIXES |= {
    AdapterConfig: "parameters.",
    ScoreConfig: "scoring.",
    RunnerConfig: "runner.",
    CandidateConfig: "candidates.faiss.",
    GradientStoreConfig: "candidates.gradients.",
    ProjectionConfig: "candidates.gradients.projection.",
    DataConfig: "data.",
    ParameterConfig: "parameters.",
    CandidatesConfig: "candidates.",
    SolverStageConfig: "solver.",
    ScoringConfig: "scoring.",
    PipelineConfig: "",
}
"""Each config class and where its keys sit in the pipeline's config (what its errors name)."""


def _kinds(annotation: typing.Any) -> set[type]:
    """The number types a field's annotation admits (``int``, ``float``), through unions."""
    origin = typing.get_origin(annotation)
    if origin is typing.Union or origin is types.UnionType:
        return set().union(*(_kinds(option) for option in typing.get_args(annotation)))
    return {annotation} & {int, float}


NUMERIC_FIELDS = [
    (cls, field.name, kinds)
    for cls in PREFIXES
    for field in dataclasses.fields(cls)
    if (kinds := _kinds(typing.get_type_hints(cls)[field.name]))
]


def test_every_registered_solver_has_numeric_fields_under_test():
    covered = {cls for cls, _, _ in NUMERIC_FIELDS}
    assert {solver.config_class for solver in REGISTRY.values() if dataclasses.fields(solver.config_class)} <= covered


@pytest.mark.parametrize(
    ("cls", "name", "kinds"), NUMERIC_FIELDS, ids=[f"{cls.__name__}.{name}" for cls, name, _ in NUMERIC_FIELDS]
)
def test_a_bad_number_is_refused_at_construction_naming_its_key(cls, name, kinds):
    key = PREFIXES[cls] + name
    bad: list[typing.Any] = [math.nan, math.inf, -math.inf, -1, True, "ten"]
    if float not in kinds:
        bad.append(2.5)  # an integer option given a fraction
    for value in bad:
        with pytest.raises(ConfigError) as error:
            cls(**{name: value})
        assert error.value.key == key, (value, str(error.value))
        assert str(error.value).startswith(f"{key} must be "), (value, str(error.value))


def test_a_solver_option_gets_its_command_line_flag_named_too():
    with pytest.raises(ConfigError) as error:
        LiSSAConfig(batch_size=0)
    named = _name_the_flag(error.value)
    assert str(named) == "--lissa-batch (solver.batch_size) must be a positive integer (or unset), got 0"


APPLICATION_CONFIGS = [
    SplitConfig,
    FinetuneConfig,
    ExperimentConfig,
    NLIGraphConfig,
    SimulatabilityConfig,
    TabularConfig,
]
APPLICATION_FIELDS = [
    (cls, field.name, kinds)
    for cls in APPLICATION_CONFIGS
    for field in dataclasses.fields(cls)
    if (kinds := _kinds(typing.get_type_hints(cls)[field.name]))
]


@pytest.mark.parametrize(
    ("cls", "name", "kinds"), APPLICATION_FIELDS, ids=[f"{c.__name__}.{n}" for c, n, _ in APPLICATION_FIELDS]
)
def test_an_application_config_refuses_a_non_finite_or_mistyped_number(cls, name, kinds):
    """The applications' and recipes' configs check types and finiteness of every number; ranges are their own."""
    bad: list[typing.Any] = [math.nan, math.inf, True, "ten"] + ([] if float in kinds else [2.5])
    for value in bad:
        with pytest.raises(ConfigError, match=rf"^{name} must be "):
            cls(**{name: value})
