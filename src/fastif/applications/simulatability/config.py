"""Config of the simulatability application (see :mod:`fastif.applications.simulatability`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor

from ...config import check_numeric_fields
from ...errors import ConfigError
from ...model.hf import L2_EXCLUDE

KINDS: tuple[str, ...] = ("helpful", "harmful", "random")
LABEL_MODES: tuple[str, ...] = ("gold", "predicted")
CORRECTNESS: tuple[str, ...] = ("correct", "wrong")
RESULTS_FILE = "simulatability.json"
FIGURE_FILE = "simulatability.png"
CONFIG_FILE = "simulatability_config.json"


@dataclass(frozen=True)
class SimulatabilityConfig:
    """Sizes and settings of the simulatability experiment (defaults: ~15 min on 2 shared CPU cores).

    ``params`` is one parameter subset used three times: influence is taken over it, the simulator's brief
    fine-tune trains it, and each explanation's SGD step updates it (empty: the recipe's choice, e.g. the NLI
    driver's ``MINILM_TOP``; :func:`run_simulatability` needs it set). The step follows the bare per-example loss
    gradient (no L2 term). ``damping`` is absolute (LiSSA inverts ``H + damping·I``, scale chosen automatically).
    """

    n_correct: int = 8
    n_wrong: int = 8
    test_pool: int = 300
    candidates: int = 160
    n_explain: int = 5
    lr_min_log10: float = -5.0
    lr_max_log10: float = -2.5
    n_lr: int = 11
    params: tuple[str, ...] = ()
    l2: float = 1e-3
    l2_exclude: tuple[str, ...] = L2_EXCLUDE
    solver: Literal["lissa", "identity"] = "lissa"
    damping: float = 3.0
    lissa_depth: int = 60
    lissa_batch_size: int = 2
    lissa_scale_samples: int = 4
    lissa_power_iterations: int = 10
    simulator_train_size: int = 256
    simulator_epochs: int = 1
    simulator_lr: float = 5e-5
    simulator_batch_size: int = 32
    batch_size: int = 32
    lr_chunk: int = 32
    seed: int = 0

    def __post_init__(self) -> None:
        """Refuse sizes and settings that cannot run, naming each bad option."""
        check_numeric_fields(self)
        checks = {
            "n_correct": self.n_correct >= 0,
            "n_wrong": self.n_wrong >= 0,
            "test_pool": self.test_pool >= self.n_correct + self.n_wrong > 0,
            "candidates": self.candidates >= self.n_explain,
            "n_explain": self.n_explain >= 1,
            "lr_max_log10": self.lr_max_log10 > self.lr_min_log10,
            "n_lr": self.n_lr >= 2,
            "l2": self.l2 >= 0,
            "solver": self.solver in ("lissa", "identity"),
            "damping": self.damping >= 0,
            "lissa_depth": self.lissa_depth >= 1,
            "lissa_batch_size": self.lissa_batch_size >= 1,
            "lissa_scale_samples": self.lissa_scale_samples >= 1,
            "lissa_power_iterations": self.lissa_power_iterations >= 1,
            "simulator_train_size": self.simulator_train_size >= 0,
            "simulator_epochs": self.simulator_epochs >= 0,
            "simulator_lr": self.simulator_lr > 0,
            "simulator_batch_size": self.simulator_batch_size >= 1,
            "batch_size": self.batch_size >= 1,
            "lr_chunk": self.lr_chunk >= 1,
        }
        bad = {key: getattr(self, key) for key, ok in checks.items() if not ok}
        if bad:
            raise ConfigError(
                f"SimulatabilityConfig: invalid {bad}; need n_correct + n_wrong >= 1 and <= test_pool, "
                "candidates >= n_explain >= 1, lr_max_log10 > lr_min_log10, n_lr >= 2, "
                "solver 'lissa' or 'identity', non-negative l2/damping/sizes and positive rates and batch sizes"
            )

    @classmethod
    def quick(cls, **overrides: Any) -> SimulatabilityConfig:
        """A small version for a smoke run (about 2-3 min on 2 CPU cores with the MiniLM model)."""
        sizes = dict(n_correct=3, n_wrong=3, test_pool=80, candidates=100, n_explain=3, n_lr=6)
        sizes.update(lissa_depth=20, lissa_scale_samples=2, simulator_train_size=128)
        return cls(**{**sizes, **overrides})

    @property
    def learning_rates(self) -> Tensor:
        """The log-spaced learning-rate grid of the single SGD step."""
        return torch.logspace(self.lr_min_log10, self.lr_max_log10, self.n_lr, dtype=torch.float64)
