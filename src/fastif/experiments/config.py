"""Typed configs of the two FastIF applications: error correction (``correct``) and fine-tuning on unseen data
(``augment``), on HANS (2-class model) or ANLI (3-class model).

One frozen :class:`ExperimentConfig` says everything a run depends on; it is saved as JSON beside the results and
can be read back from a file (``--config``), refusing unknown keys. :func:`default_config` gives the measured
defaults (each experiment fits in 30 minutes on 2 CPU cores) and :func:`quick_config` a seconds-long smoke setting.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from ..config import config_from_dict
from ..errors import ConfigError
from ..solvers import LiSSAConfig

Experiment = Literal["correct", "augment"]
Task = Literal["hans", "anli"]

MODES: tuple[str, ...] = ("helpful", "harmful", "random", "anchors")
"""What one SGD step trains on: the top helpful / harmful candidates, random candidates, or the anchors."""

HANS_HEURISTICS: tuple[str, ...] = ("lexical_overlap", "subsequence", "constituent")
ANLI_ROUNDS: tuple[str, ...] = ("r1", "r2", "r3")
TASK_GROUPS: dict[str, tuple[str, ...]] = {"hans": HANS_HEURISTICS, "anli": ANLI_ROUNDS}
TASK_LABELS: dict[str, int] = {"hans": 2, "anli": 3}


@dataclass(frozen=True)
class SplitConfig:
    """How the evaluation data are split (see :mod:`fastif.experiments.splits` for the rule).

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
        if not (0 < self.anchor_fraction < 1 and 0 <= self.pool_fraction < 1):
            raise ConfigError("SplitConfig: need 0 < anchor_fraction < 1 and 0 <= pool_fraction < 1")
        if self.anchor_fraction + self.pool_fraction >= 1:
            raise ConfigError("SplitConfig: anchor_fraction + pool_fraction must stay below 1 to leave a test part")
        if self.anchor_pool < 0 or self.eval_size < 0:
            raise ConfigError("SplitConfig: anchor_pool and eval_size must be >= 0 (0 = the whole part)")


@dataclass(frozen=True)
class ExperimentConfig:
    """One FastIF fine-tuning experiment: data, loop sizes, the influence settings and the SGD step.

    For every group (HANS heuristic or ANLI round), mode and seed the model starts from the original and takes
    ``steps`` steps; a step draws ``anchors`` anchors of the group, scores the ``candidates`` pool points nearest
    to the anchors' mean feature by influence on the anchors' mean loss, and takes one plain SGD step (``lr``,
    no momentum) on the mean cross-entropy of the ``selected`` chosen points. Influence and SGD act on the same
    parameters: the top ``trainable_layers`` encoder layers, the pooler and the classifier. The Hessian is the
    model's training objective (MNLI train, ``hessian_size`` points, L2 ``l2`` on weights) inverted by ``lissa``
    (``scale=None``: picked once on the original model). ``pool_size`` > 0 caps the augmentation pool (a seeded,
    stratified sample).
    """

    experiment: Experiment = "correct"
    task: Task = "hans"
    seeds: tuple[int, ...] = (0, 1, 2, 3, 4)
    modes: tuple[str, ...] = MODES
    groups: tuple[str, ...] = HANS_HEURISTICS
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
    lissa: LiSSAConfig = field(
        default_factory=lambda: LiSSAConfig(damping=0.3, depth=300, repeats=1, batch_size=32, tail_average=0.5)
    )
    split: SplitConfig = field(default_factory=SplitConfig)

    def __post_init__(self) -> None:
        problems = _problems(self)
        if problems:
            raise ConfigError(f"ExperimentConfig: {'; '.join(problems)}")

    @property
    def num_labels(self) -> int:
        """2 for HANS (entailment vs non-entailment), 3 for ANLI."""
        return TASK_LABELS[self.task]


def _problems(config: ExperimentConfig) -> list[str]:
    """Every invalid setting of ``config``, each with the allowed range."""
    problems = []
    if config.experiment not in ("correct", "augment"):
        problems.append(f"experiment must be 'correct' or 'augment', got {config.experiment!r}")
    if config.task not in TASK_GROUPS:
        problems.append(f"task must be one of {tuple(TASK_GROUPS)}, got {config.task!r}")
        return problems
    unknown_modes = [mode for mode in config.modes if mode not in MODES]
    if unknown_modes or not config.modes:
        problems.append(f"modes must be a non-empty subset of {MODES}, got {config.modes}")
    bad_groups = [group for group in config.groups if group not in TASK_GROUPS[config.task]]
    if bad_groups or not config.groups:
        problems.append(f"groups for {config.task} must be a non-empty subset of {TASK_GROUPS[config.task]}")
    if not config.seeds or len(set(config.seeds)) != len(config.seeds):
        problems.append(f"seeds must be distinct and at least one, got {config.seeds}")
    counts = ("steps", "anchors", "selected", "candidates", "hessian_size")
    problems += [f"{name} must be >= 1, got {getattr(config, name)}" for name in counts if getattr(config, name) < 1]
    if config.selected > config.candidates:
        problems.append(f"selected ({config.selected}) cannot exceed candidates ({config.candidates})")
    if config.lr <= 0 or config.l2 < 0 or config.pool_size < 0 or config.max_length < 8 or config.trainable_layers < 0:
        problems.append("need lr > 0, l2 >= 0, pool_size >= 0 (0 = all), max_length >= 8, trainable_layers >= 0")
    if config.task == "anli" and config.split.pool_fraction <= 0 and config.experiment == "augment":
        problems.append("ANLI augmentation needs split.pool_fraction > 0 (the pool is carved from the dev sets)")
    return problems


def default_config(experiment: Experiment, task: Task = "hans") -> ExperimentConfig:
    """The committed defaults for ``experiment`` on ``task`` (sized for 30 minutes on 2 CPU cores)."""
    if task == "anli":
        split = SplitConfig(anchor_fraction=0.2, pool_fraction=0.5, anchor_pool=0, eval_size=0)
        return ExperimentConfig(experiment=experiment, task=task, groups=ANLI_ROUNDS, candidates=500, split=split)
    return ExperimentConfig(experiment=experiment, task=task)


def quick_config(experiment: Experiment, task: Task = "hans") -> ExperimentConfig:
    """A seconds-long setting for smoke tests: one seed, two groups, two steps, tiny pools and LiSSA."""
    base = default_config(experiment, task)
    return replace(
        base,
        seeds=(0,),
        groups=base.groups[:2],
        steps=2,
        anchors=4,
        selected=3,
        candidates=16,
        hessian_size=48,
        pool_size=64,
        lissa=replace(base.lissa, depth=4, batch_size=4, power_iterations=3, scale_samples=2),
        split=replace(base.split, anchor_pool=12, eval_size=12),
    )


def load_experiment_config(path: str | Path) -> ExperimentConfig:
    """Read an :class:`ExperimentConfig` from a JSON file (as saved beside results), refusing unknown keys."""
    try:
        data: Any = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise ConfigError(f"cannot read the experiment config {path} ({error}); give a JSON file") from None
    return config_from_dict(ExperimentConfig, data)
