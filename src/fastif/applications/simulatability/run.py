"""FastIF application 1: simulatability (Hase & Bansal's framework, as FastIF ran it).

A *simulator* (a copy of the task model, briefly fine-tuned to predict the task model's predicted labels) receives
one explanation: a single training example, applied as ONE SGD step on the simulator's top layers. A good
explanation of a prediction moves the simulator towards it, so the simulator's cross-entropy on the test point
**against the task model's prediction** drops. Explanations are the top helpful and top harmful training points
from FastIF (kNN candidates; influence against the test point's gold label) and random training points (stratified
by class); each is labelled once with its gold label and once with the task model's predicted label, and the step's
learning rate sweeps a log grid. Test points are half correctly and half wrongly predicted.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import vmap

from ...config import config_to_dict
from ...data import Dataset, index_chunks
from ...data.views import Relabelled, Subset, example_text
from ...errors import ConfigError
from ...grads import dataset_grads
from ...influence import Influence, TopK
from ...model.adapter import AdapterConfig, HFClassifierAdapter, ParameterSelection
from ...model.predict import dataset_labels, model_inputs, predict
from ...scores import ScoreConfig
from ...solvers import Identity, Solver
from ...store.artifacts import cached_candidate_index
from ...telemetry import StageClock, machine_info
from ..common import lissa_solver, select_test_points, solve_summary
from .config import LABEL_MODES, SimulatabilityConfig
from .summary import summarise


def _solver(config: SimulatabilityConfig) -> Solver:
    """LiSSA (automatic contraction-safe scale, absolute damping) or Identity (gradient similarity)."""
    if config.solver == "identity":
        return Identity()
    return lissa_solver(
        config.damping,
        config.lissa_depth,
        config.lissa_batch_size,
        config.seed,
        config.lissa_scale_samples,
        config.lissa_power_iterations,
    )


def influence_top_k(
    model: nn.Module, train: Dataset, test: Dataset, config: SimulatabilityConfig, index_cache: Path | None = None
) -> tuple[TopK, dict[str, Any]]:
    """FastIF with kNN: each test point's ``n_explain`` most helpful and harmful of its ``candidates`` nearest.

    ``index_cache`` is a folder where the kNN index over the training features is kept between runs.
    """
    adapter = HFClassifierAdapter(
        model, AdapterConfig(include=config.params, l2=config.l2, l2_exclude=config.l2_exclude)
    )
    influence = Influence(adapter, train, _solver(config), ScoreConfig(batch_size=config.batch_size), config.batch_size)
    start = time.perf_counter()
    influence.build_index(cached_candidate_index(lambda: influence.train_features, len(train), index_cache))
    index_seconds = round(time.perf_counter() - start, 2)
    scored = influence.candidate_scores(test, config.candidates)
    info = {"num_params": adapter.num_params, "index_seconds": index_seconds}
    return scored.top_k(config.n_explain), {**info, "solve": solve_summary(scored.solve.info)}


def random_explanations(labels: Tensor, n: int, rng: np.random.Generator) -> list[int]:
    """``n`` random training indices spread over the classes as evenly as possible (FastIF: random per class)."""
    classes = sorted(set(labels.tolist()))
    counts = [n // len(classes) + (i < n % len(classes)) for i in range(len(classes))]
    picked: list[int] = []
    for label, count in zip(classes, counts, strict=True):
        pool = torch.nonzero(labels == label).flatten().numpy()
        picked += rng.choice(pool, size=min(count, len(pool)), replace=False).tolist()
    return picked


def explanation_sets(
    top: TopK, labels: Tensor, n_tests: int, n: int, rng: np.random.Generator
) -> list[list[tuple[str, int, float | None]]]:
    """Per test point: ``(kind, training index, influence score or None)`` for helpful, harmful and random points."""
    sets = []
    for i in range(n_tests):
        helpful = _scored("helpful", top.helpful_indices[i], top.helpful_scores[i])
        harmful = _scored("harmful", top.harmful_indices[i], top.harmful_scores[i])
        random = [("random", j, None) for j in random_explanations(labels, n, rng)]
        sets.append(helpful + harmful + random)
    return sets


def _scored(kind: str, indices: Tensor, scores: Tensor) -> list[tuple[str, int, float | None]]:
    """``(kind, index, score)`` triples of one test point's selected training points."""
    return [(kind, int(j), float(s)) for j, s in zip(indices.tolist(), scores.tolist(), strict=True)]


def trainable_names(model: nn.Module, params: Sequence[str]) -> list[str]:
    """Names of the parameters the ``params`` patterns select (module prefixes, names or globs)."""
    return ParameterSelection(tuple(params)).select([name for name, _ in model.named_parameters()])


def train_simulator(
    model: nn.Module, train: Dataset, config: SimulatabilityConfig, rng: np.random.Generator
) -> tuple[nn.Module, dict[str, Any]]:
    """A copy of ``model`` fine-tuned (Adam, ``params`` only) to predict ``model``'s labels on training points."""
    simulator = copy.deepcopy(model).eval()
    names = set(trainable_names(simulator, config.params))
    for name, parameter in simulator.named_parameters():
        parameter.requires_grad_(name in names)
    size = min(config.simulator_train_size, len(train))
    info: dict[str, Any] = {"train_size": size, "epochs": config.simulator_epochs, "lr": config.simulator_lr}
    if size == 0 or config.simulator_epochs == 0:
        return simulator, {**info, "steps": 0}
    indices = rng.permutation(len(train))[:size].tolist()
    targets = predict(model, train, indices, config.batch_size).argmax(-1)
    data = Relabelled(Subset(train, indices), targets)
    info["loss_before"] = _mean_loss(simulator, data, config.batch_size)
    info["steps"] = _fit(simulator, data, config, rng)
    info["loss_after"] = _mean_loss(simulator, data, config.batch_size)
    return simulator.eval(), info


def _fit(model: nn.Module, data: Dataset, config: SimulatabilityConfig, rng: np.random.Generator) -> int:
    """Minimise the mean cross-entropy on ``data`` with Adam over the trainable parameters; return the steps."""
    parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(parameters, lr=config.simulator_lr)
    model.train()
    steps = 0
    for _ in range(config.simulator_epochs):
        for chunk in index_chunks(rng.permutation(len(data)).tolist(), config.simulator_batch_size):
            batch = data.batch(chunk)
            F.cross_entropy(model(**model_inputs(batch)).logits, batch["labels"]).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            steps += 1
    model.eval()
    return steps


@torch.no_grad()
def _mean_loss(model: nn.Module, data: Dataset, batch_size: int) -> float:
    """Mean cross-entropy of ``model`` on ``data`` (eval mode)."""
    logits = predict(model, data, None, batch_size)
    return float(F.cross_entropy(logits, dataset_labels(data)))


def line_losses(adapter: HFClassifierAdapter, flat: Tensor, batch: Any, direction: Tensor, lrs: Tensor, chunk: int):
    """Loss [n_lr] of the single example ``batch`` at ``flat - lr·direction`` for every lr (vmapped over lr)."""
    steps = lrs.to(flat.dtype)
    loss = vmap(lambda lr: adapter.per_example_loss(flat - lr * direction, batch)[0])
    with torch.no_grad():
        return torch.cat([loss(steps[i : i + chunk]) for i in range(0, len(steps), chunk)])


def explanation_curves(
    adapter: HFClassifierAdapter,
    flat: Tensor,
    test_batch: Any,
    data: Dataset,
    indices: Sequence[int],
    config: SimulatabilityConfig,
) -> Tensor:
    """Simulator loss curves [m, n_lr] after one SGD step on each explanation ``indices`` of ``data`` alone."""
    curves = []
    for chunk in index_chunks(list(indices), config.batch_size):
        gradients = dataset_grads(adapter, flat, data, chunk, config.batch_size, config.batch_size)
        curves += [line_losses(adapter, flat, test_batch, g, config.learning_rates, config.lr_chunk) for g in gradients]
    return torch.stack(curves)


# ---------------------------------------------------------------------------------------------- experiment


def run_simulatability(
    model: nn.Module,
    train: Dataset,
    test: Dataset,
    config: SimulatabilityConfig | None = None,
    log: Callable[[str], None] | None = None,
    index_cache: Path | None = None,
) -> dict[str, Any]:
    """Run the whole experiment on a trained classifier and dict-batch datasets; return the results as JSON data.

    ``index_cache`` keeps the kNN index over ``train``'s features between runs (key it by model and data).
    """
    config = config or SimulatabilityConfig()
    log = log or (lambda _message: None)
    if not config.params:
        raise ConfigError("SimulatabilityConfig.params is empty; name the parameters influence is taken over")
    clock, rng, start_machine = StageClock(), np.random.default_rng(config.seed), machine_info()
    train_labels = dataset_labels(train)
    with clock.stage("select_test_points"):
        counts = {"correct": config.n_correct, "wrong": config.n_wrong}
        points = select_test_points(model, test, counts, config.test_pool, config.batch_size, rng)
    log(f"test points: {config.n_correct} correct + {config.n_wrong} wrong ({clock.seconds['select_test_points']}s)")
    with clock.stage("influence"):
        chosen = Subset(test, [p["index"] for p in points])
        top, influence_info = influence_top_k(model, train, chosen, config, index_cache)
    log(f"FastIF top-{config.n_explain} of {config.candidates} kNN candidates ({clock.seconds['influence']}s)")
    sets = explanation_sets(top, train_labels, len(points), config.n_explain, rng)
    with clock.stage("simulator"):
        simulator, simulator_info = train_simulator(model, train, config, rng)
        predicted_train = _predicted_labels(model, train, train_labels, sets, config.batch_size)
    log(f"simulator fine-tuned ({clock.seconds['simulator']}s)")
    with clock.stage("curves"):
        records = _all_curves(simulator, train, test, predicted_train, points, sets, config, train_labels, log)
    log(f"loss curves ({clock.seconds['curves']}s)")
    return {
        "experiment": "simulatability",
        "config": config_to_dict(config),
        "learning_rates": config.learning_rates.tolist(),
        "summary": summarise(records, config.n_lr),
        "influence": influence_info,
        "simulator": simulator_info,
        "sizes": {"n_train": len(train), "n_test_pool": min(config.test_pool, len(test)), "n_points": len(points)},
        "seconds": clock.seconds,
        "machine": {"start": start_machine, "end": machine_info()},
        "records": records,
    }


def _predicted_labels(
    model: nn.Module, train: Dataset, gold: Tensor, sets: list[list[tuple[str, int, float | None]]], batch_size: int
) -> Tensor:
    """Training labels with the task model's predictions at every explanation point (gold elsewhere)."""
    used = sorted({index for explanations in sets for _, index, _ in explanations})
    labels = gold.clone()
    labels[used] = predict(model, train, used, batch_size).argmax(-1)
    return labels


def _all_curves(
    simulator: nn.Module,
    train: Dataset,
    test: Dataset,
    predicted_train: Tensor,
    points: list[dict[str, Any]],
    sets: list[list[tuple[str, int, float | None]]],
    config: SimulatabilityConfig,
    gold_train: Tensor,
    log: Callable[[str], None],
) -> list[dict[str, Any]]:
    """Per test point: the simulator's base loss and every explanation's loss curve under both labellings."""
    adapter = HFClassifierAdapter(simulator, AdapterConfig(include=config.params))
    flat = adapter.flat_params().detach()
    labelled = {"gold": train, "predicted": Relabelled(train, predicted_train)}
    records = []
    for number, (point, explanations) in enumerate(zip(points, sets, strict=True), start=1):
        batch = dict(test.batch([point["index"]]))
        batch["labels"] = torch.tensor([point["predicted"]])
        with torch.no_grad():
            base = float(adapter.per_example_loss(flat, batch)[0])
        indices = [index for _, index, _ in explanations]
        curves = {mode: explanation_curves(adapter, flat, batch, labelled[mode], indices, config) for mode in labelled}
        records.append(_record(point, test, train, base, explanations, curves, gold_train, predicted_train))
        log(f"  test point {number}/{len(points)} ({'correct' if point['correct'] else 'wrong'}): base loss {base:.3g}")
    return records


def _record(
    point: dict[str, Any],
    test: Dataset,
    train: Dataset,
    base: float,
    explanations: list[tuple[str, int, float | None]],
    curves: dict[str, Tensor],
    gold_train: Tensor,
    predicted_train: Tensor,
) -> dict[str, Any]:
    """One test point's JSON record: its labels, the simulator's base loss, and each explanation's curves."""
    return {
        **point,
        "text": example_text(test, point["index"]),
        "base_loss": base,
        "explanations": [
            {
                "kind": kind,
                "train_index": index,
                "score": score,
                "text": example_text(train, index),
                "gold_label": int(gold_train[index]),
                "predicted_label": int(predicted_train[index]),
                "loss": {mode: curves[mode][row].tolist() for mode in LABEL_MODES},
            }
            for row, (kind, index, score) in enumerate(explanations)
        ],
    }
