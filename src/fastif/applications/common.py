"""What the applications share: picking correctly and wrongly predicted test points, FastIF's kNN -> s_test ->
candidate-score step, the LiSSA solver they configure, and the JSON-ready part of a solve's diagnostics."""

from __future__ import annotations

from typing import Any

import numpy as np
from torch import Tensor, nn

from ..data import Dataset
from ..data.views import Subset
from ..errors import DataError
from ..model.predict import dataset_labels, predict
from ..solvers import LiSSA, LiSSAConfig


def select_test_points(
    model: nn.Module, test: Dataset, counts: dict[str, int], pool: int, batch_size: int, rng: np.random.Generator
) -> list[dict[str, Any]]:
    """The first ``counts["correct"]`` correctly and ``counts["wrong"]`` wrongly predicted points of a seeded order
    of ``pool`` test points, each as ``{"index", "gold", "predicted", "correct"}``."""
    order = rng.permutation(len(test))[: min(pool, len(test))].tolist()
    predicted = predict(model, test, order, batch_size).argmax(-1)
    gold = dataset_labels(Subset(test, order))
    chosen: dict[str, list[dict[str, Any]]] = {"correct": [], "wrong": []}
    for index, p, g in zip(order, predicted.tolist(), gold.tolist(), strict=True):
        kind = "correct" if p == g else "wrong"
        if len(chosen[kind]) < counts[kind]:
            chosen[kind].append({"index": index, "gold": g, "predicted": p, "correct": kind == "correct"})
    for kind, points in chosen.items():
        if len(points) < counts[kind]:
            raise DataError(
                f"only {len(points)} {kind}ly predicted test points among the {len(order)} scanned; "
                f"raise test_pool (now {pool}) or lower n_{kind}"
            )
    return chosen["correct"] + chosen["wrong"]


def pick_points(
    model: nn.Module, data: Dataset, count: int, scan: int, wrong_only: bool, batch_size: int, rng: np.random.Generator
) -> list[int]:
    """``count`` indices from the first ``scan`` of a seeded order: mispredicted ones when ``wrong_only``."""
    order = rng.permutation(len(data))[: min(scan, len(data))].tolist()
    if not wrong_only:
        return order[:count]
    predicted = predict(model, data, order, batch_size).argmax(-1)
    gold = dataset_labels(Subset(data, order))
    wrong = [i for i, p, g in zip(order, predicted.tolist(), gold.tolist(), strict=True) if p != g]
    if len(wrong) < count:
        raise DataError(
            f"only {len(wrong)} mispredicted points among {len(order)} scanned; raise scan or use select='any'"
        )
    return wrong[:count]


def lissa_solver(
    damping: float, depth: int, batch_size: int, seed: int, scale_samples: int, power_iterations: int
) -> LiSSA:
    """LiSSA with an automatic contraction-safe scale, absolute damping and the last 30% of each chain averaged."""
    config = LiSSAConfig(
        damping=damping,
        depth=depth,
        batch_size=batch_size,
        seed=seed,
        scale_samples=scale_samples,
        power_iterations=power_iterations,
        tail_average=0.3,
    )
    return LiSSA(config)


def solve_summary(info: dict[str, Any]) -> dict[str, Any]:
    """The JSON-ready part of a solver's diagnostics (drops per-step norm traces)."""
    return {key: value for key, value in info.items() if not isinstance(value, Tensor)}
