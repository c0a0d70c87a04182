"""FastIF application 1, simulatability: does one top helpful / harmful training example, applied as one SGD step,
move a simulator towards the task model's prediction? :mod:`.config`, :mod:`.run`, :mod:`.summary`."""

from __future__ import annotations

from .config import CORRECTNESS, KINDS, LABEL_MODES, SimulatabilityConfig
from .run import (
    explanation_curves,
    explanation_sets,
    influence_top_k,
    line_losses,
    random_explanations,
    run_simulatability,
    train_simulator,
)
from .summary import format_headline, plot_simulatability, summarise, write_simulatability

__all__ = [
    "CORRECTNESS",
    "KINDS",
    "LABEL_MODES",
    "SimulatabilityConfig",
    "explanation_curves",
    "explanation_sets",
    "format_headline",
    "influence_top_k",
    "line_losses",
    "plot_simulatability",
    "random_explanations",
    "run_simulatability",
    "summarise",
    "train_simulator",
    "write_simulatability",
]
