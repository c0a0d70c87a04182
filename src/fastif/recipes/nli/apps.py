"""The NLI recipe's drivers for the applications: which MiniLM model, data and defaults each one runs on.

- simulatability on the cached 3-class MiniLM MNLI model (:func:`run_nli_simulatability`, :data:`MINILM_TOP`);
- the influence graph of HANS heuristics + MNLI test points on the 2-class model (:class:`NLIGraphConfig`,
  :func:`build_nli_run`);
- correct / augment on HANS (2-class) or ANLI (3-class) (:class:`ExperimentConfig`, :func:`run_nli_experiment`).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
from torch import nn

from ...applications.common import lissa_solver, pick_points
from ...applications.finetune.config import (
    FINETUNE_LISSA,
    Experiment,
    FinetuneConfig,
    SplitConfig,
    load_finetune_config,
)
from ...applications.finetune.run import ModelFactory, Progress, run_experiment
from ...applications.influence_graph import compute_run
from ...applications.simulatability import SimulatabilityConfig, run_simulatability
from ...config import check_numeric_fields, config_to_dict
from ...data import Dataset
from ...data.text import TextPairData, TextRecord
from ...data.views import Subset
from ...errors import ConfigError
from ...fingerprint import fingerprint_parameters
from ...influence import Influence
from ...model.adapter import AdapterConfig, HFClassifierAdapter
from ...model.hf import L2_EXCLUDE
from ...report.from_run import InfluenceRun
from ...scores import ScoreConfig
from ...solvers import LiSSAConfig
from ...store.artifacts import index_cache_folder
from ...telemetry import machine_info
from .data import ANLI_ROUNDS, HANS_HEURISTICS, load_embedded, nli_label_scheme
from .model import NLI_DAMPING, NLITrainConfig, train_nli_classifier
from .splits import TaskSplit, embedded_records, hans_pool, task_split

MINILM_TOP = ("bert.encoder.layer.5", "bert.pooler", "classifier")
"""MiniLM-L6's last encoder layer, pooler and head: 1.9M parameters (the recipe trains layers 4-5, 3.7M)."""

SCREENSHOT_FILE = "explorer_screenshot.png"


# ---------------------------------------------------------------------------------------------- simulatability


def knn_cache_folder(model: nn.Module, train: TextPairData) -> Path:
    """The cache-root folder of the kNN index of ``model``'s features over ``train``, shared by the experiments."""
    identity = {"kind": "knn", "model": fingerprint_parameters(dict(model.state_dict())), "data": train.fingerprint()}
    return index_cache_folder(identity)


def nli_simulatability_config(config: SimulatabilityConfig) -> SimulatabilityConfig:
    """``config`` with MiniLM's top (:data:`MINILM_TOP`) as the parameters when it names none."""
    return config if config.params else replace(config, params=MINILM_TOP)


def run_nli_simulatability(config: SimulatabilityConfig, log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """The experiment on the cached 3-class MiniLM MNLI model, its MNLI train split and the MNLI test split."""
    log = log or (lambda _message: None)
    start = time.perf_counter()
    trained = train_nli_classifier(NLITrainConfig())
    origin = "cached" if trained.from_cache else "trained"
    log(f"task model: {trained.path} ({origin}, {time.perf_counter() - start:.0f}s)")
    names, _ = nli_label_scheme(trained.config.num_labels)
    records = load_embedded("mnli_train", trained.config.num_labels)[: trained.config.train_size]
    train = TextPairData(records, trained.tokenizer, trained.config.max_length, names)
    test = TextPairData(load_embedded("mnli_test", trained.config.num_labels), trained.tokenizer, 128, names)
    index = knn_cache_folder(trained.model, train)
    result = run_simulatability(trained.model, train, test, nli_simulatability_config(config), log, index)
    result["task_model"] = {"path": str(trained.path), "metrics": trained.metrics, "labels": list(names)}
    return result


# ---------------------------------------------------------------------------------------------- influence graph


@dataclass(frozen=True)
class NLIGraphConfig:
    """Sizes of the HANS + MNLI influence graph (defaults: ~10-15 min on 2 shared CPU cores).

    ``scan`` examples per group (seeded order) are predicted to find ``per_group`` test points (``select="wrong"``:
    mispredicted ones, as in FastIF's figure). Influence is over ``params`` with LiSSA. Damping 3.0 (absolute):
    MiniLM's last layer + pooler + head has a markedly indefinite Hessian, and at 3.0 every LiSSA chain of the
    committed run settled (docs/applications.md).
    """

    per_group: int = 10
    scan: int = 60
    select: Literal["wrong", "any"] = "wrong"
    candidates: int = 100
    top: int = 5
    params: tuple[str, ...] = MINILM_TOP
    l2: float = 1e-3
    l2_exclude: tuple[str, ...] = L2_EXCLUDE
    damping: float = 3.0
    lissa_depth: int = 60
    lissa_batch_size: int = 2
    lissa_scale_samples: int = 4
    lissa_power_iterations: int = 10
    batch_size: int = 32
    seed: int = 0

    def __post_init__(self) -> None:
        """Refuse sizes that cannot run."""
        check_numeric_fields(self)
        if not (1 <= self.per_group <= self.scan and self.candidates >= 1 and self.top >= 1 and self.damping >= 0):
            raise ConfigError(
                f"NLIGraphConfig: need 1 <= per_group ({self.per_group}) <= scan ({self.scan}), candidates >= 1, "
                f"top >= 1 and damping >= 0"
            )
        if self.select not in ("wrong", "any"):
            raise ConfigError(f"NLIGraphConfig.select must be 'wrong' or 'any', got {self.select!r}")

    @classmethod
    def quick(cls, **overrides: Any) -> NLIGraphConfig:
        """A small version for a smoke run."""
        return cls(**{**dict(per_group=3, scan=30, candidates=30, top=3, lissa_depth=10), **overrides})


def nli_groups(trained: Any, config: NLIGraphConfig, rng: np.random.Generator) -> dict[str, Dataset]:
    """The test groups: each HANS heuristic of ``hans_eval`` and the MNLI test split (2-class labels)."""
    names, _ = nli_label_scheme(2)
    hans = load_embedded("hans_eval", 2)
    sources = {h: [r for r in hans if r.extra.get("heuristic") == h] for h in HANS_HEURISTICS}
    sources["mnli"] = load_embedded("mnli_test", 2)
    groups = {}
    wrong_only = config.select == "wrong"
    for group, records in sources.items():
        data = TextPairData(records, trained.tokenizer, trained.config.max_length, names)
        picked = pick_points(trained.model, data, config.per_group, config.scan, wrong_only, config.batch_size, rng)
        groups[group] = Subset(data, picked)
    return groups


def build_nli_run(config: NLIGraphConfig, log: Callable[[str], None] | None = None) -> InfluenceRun:
    """Score the HANS + MNLI test groups against their kNN candidates on the cached 2-class MNLI model."""
    log = log or (lambda _message: None)
    start_machine, start = machine_info(), time.perf_counter()
    trained = train_nli_classifier(NLITrainConfig(num_labels=2))
    names, _ = nli_label_scheme(2)
    records = load_embedded("mnli_train", 2)[: trained.config.train_size]
    train = TextPairData(records, trained.tokenizer, trained.config.max_length, names)
    log(f"2-class model {trained.path.name} (validation accuracy {trained.metrics['validation_accuracy']:.3f})")
    groups = nli_groups(trained, config, np.random.default_rng(config.seed))
    log(f"picked {config.per_group} {config.select} test points per group ({time.perf_counter() - start:.0f}s)")
    adapter = HFClassifierAdapter(
        trained.model, AdapterConfig(include=config.params, l2=config.l2, l2_exclude=config.l2_exclude)
    )
    solver = lissa_solver(
        config.damping,
        config.lissa_depth,
        config.lissa_batch_size,
        config.seed,
        config.lissa_scale_samples,
        config.lissa_power_iterations,
    )
    influence = Influence(adapter, train, solver, ScoreConfig(batch_size=config.batch_size), config.batch_size)
    meta = {"config": config_to_dict(config), "model": {"path": str(trained.path), "metrics": trained.metrics}}
    run = compute_run(influence, groups, config.candidates, knn_cache_folder(trained.model, train), meta)
    run.meta.update(
        num_params=adapter.num_params,
        seconds=round(time.perf_counter() - start, 1),
        machine={"start": start_machine, "end": machine_info()},
    )
    log(f"scored {len(run.test_points)} test points x {config.candidates} candidates ({run.meta['seconds']}s)")
    return run


# ---------------------------------------------------------------------------------------------- correct / augment

Task = Literal["hans", "anli"]
TASK_GROUPS: dict[str, tuple[str, ...]] = {"hans": HANS_HEURISTICS, "anli": ANLI_ROUNDS}
TASK_LABELS: dict[str, int] = {"hans": 2, "anli": 3}


@dataclass(frozen=True)
class ExperimentConfig(FinetuneConfig):
    """FastIF's correct / augment experiment on NLI: ``task`` HANS (2-class model; groups are its heuristics) or
    ANLI (3-class model; groups are its rounds). The model's training data is the bundled MNLI train split; the
    pool is MNLI train (correct), HANS train (augment, HANS) or the ANLI pool part (augment, ANLI). The LiSSA
    damping is the pipeline's for MiniLM's pooler + classifier (:data:`NLI_DAMPING`, above minus the Hessian's
    smallest eigenvalue); a diverging chain doubles it (see ``influence_top`` in fastif.applications.finetune.run)."""

    groups: tuple[str, ...] = HANS_HEURISTICS
    task: Task = "hans"
    lissa: LiSSAConfig = field(default_factory=lambda: replace(FINETUNE_LISSA, damping=NLI_DAMPING))

    def problems(self) -> list[str]:
        """The loop's checks, plus: a known task, groups of that task, and a pool for ANLI augmentation."""
        if self.task not in TASK_GROUPS:
            return [f"task must be one of {tuple(TASK_GROUPS)}, got {self.task!r}"]
        problems = super().problems()
        if any(group not in TASK_GROUPS[self.task] for group in self.groups):
            problems.append(f"groups for {self.task} must be a non-empty subset of {TASK_GROUPS[self.task]}")
        if self.task == "anli" and self.split.pool_fraction <= 0 and self.experiment == "augment":
            problems.append("ANLI augmentation needs split.pool_fraction > 0 (the pool is carved from the dev sets)")
        return problems

    @property
    def num_labels(self) -> int:
        """2 for HANS (entailment vs non-entailment), 3 for ANLI."""
        return TASK_LABELS[self.task]


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
    return load_finetune_config(ExperimentConfig, path)


def trained_nli_model(num_labels: int) -> tuple[nn.Module, Any, dict[str, Any]]:
    """The embedded MNLI classifier (2-class for HANS, 3-class for ANLI), trained once and cached."""
    trained = train_nli_classifier(NLITrainConfig(num_labels=num_labels))
    info = {"path": str(trained.path), "train_config": config_to_dict(trained.config), "metrics": trained.metrics}
    return trained.model, trained.tokenizer, info


class NLIFinetuneTask:
    """HANS / ANLI records for the fine-tuning loop, with MNLI train as the model's training data."""

    def num_labels(self, config: ExperimentConfig) -> int:
        """2 for HANS, 3 for ANLI."""
        return config.num_labels

    def label_names(self, config: ExperimentConfig) -> tuple[str, ...]:
        """The NLI label names of the task's scheme."""
        return nli_label_scheme(config.num_labels)[0]

    def split(self, config: ExperimentConfig) -> TaskSplit:
        """The seeded, stratified anchor / test (/ pool) parts of the task's groups."""
        return task_split(config.task, config.split, config.groups)

    def training_records(self, config: ExperimentConfig) -> Sequence[TextRecord]:
        """The bundled MNLI train split, labelled for the task's scheme."""
        return embedded_records("mnli_train", config.num_labels)

    def pool_records(self, config: ExperimentConfig, split: TaskSplit) -> list[TextRecord]:
        """MNLI train (correct), HANS train (augment, HANS) or the ANLI pool part (augment, ANLI)."""
        if config.experiment == "correct":
            records = list(embedded_records("mnli_train", config.num_labels))
            return records[: config.pool_size] if config.pool_size else records
        if config.task == "hans":
            return hans_pool(config.pool_size, config.split.seed)
        return split.pool[: config.pool_size] if config.pool_size else split.pool


NLI_TASK = NLIFinetuneTask()


PUBLISHED_GAINS: dict[tuple[str, str], float] = {("correct", "hans"): 2.5, ("augment", "hans"): 2.8,
                                                   ("augment", "anli"): 1.7}  # fmt: skip
"""FastIF's published accuracy gains (points) of the helpful mode, per (experiment, task)."""


def run_nli_experiment(
    config: ExperimentConfig,
    factory: ModelFactory | None = None,
    progress: Progress | None = None,
    cache_dir: Any = None,
) -> dict[str, Any]:
    """Run the correct / augment experiment on its NLI task; ``factory`` defaults to the embedded MNLI classifier."""
    results = run_experiment(config, factory or trained_nli_model, NLI_TASK, progress, cache_dir)
    gain = PUBLISHED_GAINS.get((config.experiment, config.task))
    if gain is not None:
        results["published"] = {"source": "FastIF (Guo et al., EMNLP 2021)", "gain_points": gain}
    return results
