"""A real small example end to end: L2-regularised logistic regression on a scikit-learn dataset, explained.

Trains the model to convergence (L-BFGS), then lists each test point's most helpful and most harmful training
points. Offline: scikit-learn ships the data.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from ..config import check_number, check_numeric_fields
from ..data import TensorData
from ..errors import ConfigError
from ..influence import Influence
from ..model.adapter import AdapterConfig, TorchAdapter
from ..solvers import SOLVERS

TabularName = Literal["breast_cancer", "digits", "wine", "iris"]


@dataclass(frozen=True)
class TabularConfig:
    """Which scikit-learn dataset, how much L2, which solver, and how many points to show."""

    dataset: TabularName = "breast_cancer"
    l2: float = 1e-2
    solver: str = "cg"
    test_size: int = 100
    explain: int = 3
    k: int = 5
    seed: int = 0

    def __post_init__(self) -> None:
        """Refuse non-finite or wrongly typed numbers and sizes that select nothing."""
        check_numeric_fields(self)
        check_number("l2", self.l2, minimum=0)
        for name in ("test_size", "explain", "k"):
            check_number(name, getattr(self, name), integer=True, minimum=1)
        check_number("seed", self.seed, integer=True, minimum=0, below=2**32)


def load_tabular(name: str) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Standardised features, integer labels and class names of a bundled scikit-learn dataset."""
    from sklearn import datasets

    loaders = {
        "breast_cancer": datasets.load_breast_cancer,
        "digits": datasets.load_digits,
        "wine": datasets.load_wine,
        "iris": datasets.load_iris,
    }
    if name not in loaders:
        raise ConfigError(f"unknown tabular dataset {name!r}; choose one of {sorted(loaders)}")
    bunch = loaders[name]()
    features = bunch.data.astype(np.float64)
    features = (features - features.mean(0)) / np.where(features.std(0) > 0, features.std(0), 1.0)
    return features, bunch.target.astype(np.int64), [str(c) for c in bunch.target_names]


def train_logistic(x: torch.Tensor, y: torch.Tensor, classes: int, l2: float) -> nn.Linear:
    """Multinomial logistic regression minimising mean cross-entropy + (l2/2)‖W‖², to a tight tolerance."""
    model = nn.Linear(x.shape[1], classes).double()
    optimizer = torch.optim.LBFGS(
        model.parameters(),
        lr=1.0,
        max_iter=500,
        tolerance_grad=1e-10,
        tolerance_change=1e-14,
        history_size=50,
        line_search_fn="strong_wolfe",
    )

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y) + 0.5 * l2 * sum((p**2).sum() for p in model.parameters())
        loss.backward()
        return loss

    optimizer.step(closure)
    return model


def run_tabular(config: TabularConfig) -> dict[str, Any]:
    """Train, compute influence of every training point on a few test points, and return a JSON-ready report."""
    if config.solver not in SOLVERS:
        raise ConfigError(f"unknown solver {config.solver!r}; choose one of {sorted(SOLVERS)}")
    features, labels, names = load_tabular(config.dataset)
    order = np.random.default_rng(config.seed).permutation(len(labels))
    test_index, train_index = order[: config.test_size], order[config.test_size :]
    x, y = torch.as_tensor(features), torch.as_tensor(labels)
    model = train_logistic(x[train_index], y[train_index], len(names), config.l2)
    adapter = TorchAdapter(model, nn.CrossEntropyLoss(reduction="none"), AdapterConfig(l2=config.l2))
    train = TensorData((x[train_index], y[train_index]))
    shown = test_index[: config.explain]
    influence = Influence(adapter, train, SOLVERS[config.solver]())
    top = influence.top_k(TensorData((x[shown], y[shown])), k=config.k)
    with torch.no_grad():
        predictions = model(x[shown]).argmax(1)
    return {
        "dataset": config.dataset,
        "n_train": len(train_index),
        "num_params": adapter.num_params,
        "explained": [
            {
                "test_index": int(t),
                "label": names[int(y[t])],
                "predicted": names[int(predictions[row])],
                "helpful": _rows(top.helpful_indices[row], top.helpful_scores[row], train_index, labels, names),
                "harmful": _rows(top.harmful_indices[row], top.harmful_scores[row], train_index, labels, names),
            }
            for row, t in enumerate(shown)
        ],
    }


def _rows(indices, scores, train_index, labels, names) -> list[dict[str, Any]]:
    return [
        {"train_index": int(train_index[i]), "label": names[int(labels[train_index[i]])], "score": float(s)}
        for i, s in zip(indices.tolist(), scores.tolist(), strict=True)
    ]


def format_tabular(report: dict[str, Any]) -> str:
    """A readable text table of a :func:`run_tabular` report."""
    lines = [
        f"{report['dataset']}: {report['n_train']} training points, {report['num_params']} parameters",
        "score = grad L(test)^T H^-1 grad L(train); positive = helpful (removing it would raise the test loss)",
    ]
    for item in report["explained"]:
        lines.append(f"\ntest #{item['test_index']}  label={item['label']}  predicted={item['predicted']}")
        for kind in ("helpful", "harmful"):
            cells = ", ".join(f"#{r['train_index']} ({r['label']}) {r['score']:+.3g}" for r in item[kind])
            lines.append(f"  most {kind}: {cells}")
    return "\n".join(lines)
