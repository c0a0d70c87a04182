"""Typed config of the fine-tuning application: error correction (``correct``) and fine-tuning on unseen data
(``augment``) by one SGD step at a time on the most influential points.

:class:`FinetuneConfig` holds what the loop needs; a recipe subclasses it to add its tasks and groups (the NLI
recipe's ``ExperimentConfig`` adds HANS / ANLI). Configs are saved as JSON beside the results and read back from a
file, refusing unknown keys.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

from ...config import check_numeric_fields, config_from_dict
from ...errors import ConfigError
from ...solvers import LiSSAConfig

Experiment = Literal["correct", "augment"]
C = TypeVar("C")

MODES: tuple[str, ...] = ("helpful", "harmful", "random", "anchors")
"""What one SGD step trains on: the top helpful / harmful candidates, random candidates, or the anchors."""


@dataclass(frozen=True)
class SplitConfig:
    """How the evaluation data are split (see :mod:`fastif.recipes.nli.splits` for the NLI rule).

    HANS: in every subcase, the examples ordered by SHA-256 of ``hans:<seed>:<id>``; the first
    ``anchor_fraction`` are the anchor (validation) part, the rest the test part. ANLI: in every (round, label)
    stratum, ordered by SHA-256 of ``anli:<seed>:<id>``, the first ``pool_fraction`` form the augmentation pool,
    the next ``anchor_fraction`` the anchor part, the rest the test part. ``anchor_pool`` anchors per group and
    ``eval_size`` test points per group (both stratified the same way; 0 = the whole part) are the fixed samples
    the loop actually draws from and evaluates on.
    """

    seed: int = 0
    anchor_fraction: float = 0.5
    pool_fraction: float = 0.0
    anchor_pool: int = 1000
    eval_size: int = 0

    def __post_init__(self) -> None:
        check_numeric_fields(self)
        if not (0 < self.anchor_fraction < 1 and 0 <= self.pool_fraction < 1):
            raise ConfigError("SplitConfig: need 0 < anchor_fraction < 1 and 0 <= pool_fraction < 1")
        if self.anchor_fraction + self.pool_fraction >= 1:
            raise ConfigError("SplitConfig: anchor_fraction + pool_fraction must stay below 1 to leave a test part")
        if self.anchor_pool < 0 or self.eval_size < 0:
            raise ConfigError("SplitConfig: anchor_pool and eval_size must be >= 0 (0 = the whole part)")


FINETUNE_LISSA = LiSSAConfig(damping=0.3, depth=300, repeats=1, batch_size=32, tail_average=0.5)
"""The loop's s_test: fixed depth 300 at batch 32, the last half averaged; a recipe sets its own damping."""


@dataclass(frozen=True)
class FinetuneConfig:
    """One fine-tuning experiment: loop sizes, the influence settings and the SGD step.

    For every group, mode and seed the model starts from the original and takes ``steps`` steps; a step draws
    ``anchors`` anchors of the group, scores the ``candidates`` pool points nearest to the anchors' mean feature
    by influence on the anchors' mean loss, and takes one plain SGD step (``lr``, no momentum) on the mean
    cross-entropy of the ``selected`` chosen points. Influence and SGD act on the same parameters: the top
    ``trainable_layers`` encoder layers, the pooler and the classifier. The Hessian is the model's training
    objective (``hessian_size`` of its training points, L2 ``l2`` on weights) inverted by ``lissa``
    (``scale=None``: picked once on the original model). ``pool_size`` > 0 caps the augmentation pool.
    """

    experiment: Experiment = "correct"
    seeds: tuple[int, ...] = (0, 1, 2, 3, 4)
    modes: tuple[str, ...] = MODES
    groups: tuple[str, ...] = ()
    steps: int = 10
    anchors: int = 10
    selected: int = 10
    candidates: int = 1000
    lr: float = 1e-4
    trainable_layers: int = 0
    l2: float = 1e-3
    hessian_size: int = 8000
    pool_size: int = 0
    max_length: int = 128
    lissa: LiSSAConfig = field(default_factory=lambda: FINETUNE_LISSA)
    split: SplitConfig = field(default_factory=SplitConfig)

    def __post_init__(self) -> None:
        check_numeric_fields(self)
        problems = self.problems()
        if problems:
            raise ConfigError(f"{type(self).__name__}: {'; '.join(problems)}")

    def problems(self) -> list[str]:
        """Every invalid setting, each with the allowed range (subclasses add their own)."""
        problems = []
        if self.experiment not in ("correct", "augment"):
            problems.append(f"experiment must be 'correct' or 'augment', got {self.experiment!r}")
        unknown_modes = [mode for mode in self.modes if mode not in MODES]
        if unknown_modes or not self.modes:
            problems.append(f"modes must be a non-empty subset of {MODES}, got {self.modes}")
        if not self.groups or len(set(self.groups)) != len(self.groups):
            problems.append(f"groups must be distinct and at least one, got {self.groups}")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            problems.append(f"seeds must be distinct and at least one, got {self.seeds}")
        counts = ("steps", "anchors", "selected", "candidates", "hessian_size")
        problems += [f"{name} must be >= 1, got {getattr(self, name)}" for name in counts if getattr(self, name) < 1]
        if self.selected > self.candidates:
            problems.append(f"selected ({self.selected}) cannot exceed candidates ({self.candidates})")
        if self.lr <= 0 or self.l2 < 0 or self.pool_size < 0 or self.max_length < 8 or self.trainable_layers < 0:
            problems.append("need lr > 0, l2 >= 0, pool_size >= 0 (0 = all), max_length >= 8, trainable_layers >= 0")
        return problems


def load_finetune_config(cls: type[C], path: str | Path) -> C:
    """Read a config of class ``cls`` from a JSON file (as saved beside results), refusing unknown keys."""
    try:
        data: Any = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise ConfigError(f"cannot read the experiment config {path} ({error}); give a JSON file") from None
    return config_from_dict(cls, data)
