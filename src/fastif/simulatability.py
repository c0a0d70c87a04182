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

import argparse
import copy
import math
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import vmap

from .app_utils import (
    Relabelled,
    Subset,
    cached_candidate_index,
    candidate_scores,
    dataset_labels,
    example_text,
    index_cache_folder,
    machine_info,
    model_inputs,
    predict,
)
from .config import config_to_dict, save_config
from .data import Dataset, index_chunks
from .errors import ConfigError, DataError
from .files import atomic_write_json, check_writable
from .grads import dataset_grads
from .influence import Influence, TopK
from .model.adapter import AdapterConfig, HFClassifierAdapter, ParameterSelection
from .scores import ScoreConfig
from .solvers import Identity, LiSSA, LiSSAConfig, Solver

KINDS: tuple[str, ...] = ("helpful", "harmful", "random")
LABEL_MODES: tuple[str, ...] = ("gold", "predicted")
CORRECTNESS: tuple[str, ...] = ("correct", "wrong")
RESULTS_FILE = "simulatability.json"
FIGURE_FILE = "simulatability.png"
CONFIG_FILE = "simulatability_config.json"
MINILM_TOP = ("bert.encoder.layer.5", "bert.pooler", "classifier")
"""MiniLM-L6's last encoder layer, pooler and head: 1.9M parameters (the recipe trains layers 4-5, 3.7M)."""


@dataclass(frozen=True)
class SimulatabilityConfig:
    """Sizes and settings of the simulatability experiment (defaults: ~15 min on 2 shared CPU cores).

    ``params`` is one parameter subset used three times: influence is taken over it, the simulator's brief
    fine-tune trains it, and each explanation's SGD step updates it. The step follows the bare per-example loss
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
    params: tuple[str, ...] = MINILM_TOP
    l2: float = 1e-3
    l2_exclude: tuple[str, ...] = ("*bias", "*LayerNorm*")
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
        checks = {
            "n_correct": self.n_correct >= 0,
            "n_wrong": self.n_wrong >= 0,
            "test_pool": self.test_pool >= self.n_correct + self.n_wrong > 0,
            "candidates": self.candidates >= self.n_explain,
            "n_explain": self.n_explain >= 1,
            "lr_max_log10": self.lr_max_log10 > self.lr_min_log10,
            "n_lr": self.n_lr >= 2,
            "params": len(self.params) > 0,
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
                "candidates >= n_explain >= 1, lr_max_log10 > lr_min_log10, n_lr >= 2, a non-empty params tuple, "
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


class _Clock:
    """Wall seconds per named stage, for the results file."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        """Time the enclosed block under ``name``."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = round(time.perf_counter() - start, 2)


# ---------------------------------------------------------------------------------------------- steps


def select_test_points(
    model: nn.Module, test: Dataset, config: SimulatabilityConfig, rng: np.random.Generator
) -> list[dict[str, Any]]:
    """The first ``n_correct`` correctly and ``n_wrong`` wrongly predicted points of a seeded test-pool order."""
    pool = rng.permutation(len(test))[: min(config.test_pool, len(test))].tolist()
    predicted = predict(model, test, pool, config.batch_size).argmax(-1)
    gold = dataset_labels(Subset(test, pool))
    chosen: dict[str, list[dict[str, Any]]] = {"correct": [], "wrong": []}
    wanted = {"correct": config.n_correct, "wrong": config.n_wrong}
    for index, p, g in zip(pool, predicted.tolist(), gold.tolist(), strict=True):
        kind = "correct" if p == g else "wrong"
        if len(chosen[kind]) < wanted[kind]:
            chosen[kind].append({"index": index, "gold": g, "predicted": p, "correct": kind == "correct"})
    for kind, points in chosen.items():
        if len(points) < wanted[kind]:
            raise DataError(
                f"only {len(points)} {kind}ly predicted test points among the {len(pool)} scanned; "
                f"raise test_pool (now {config.test_pool}) or lower n_{kind}"
            )
    return chosen["correct"] + chosen["wrong"]


def make_solver(config: SimulatabilityConfig) -> Solver:
    """LiSSA (automatic contraction-safe scale, absolute damping) or Identity (gradient similarity)."""
    if config.solver == "identity":
        return Identity()
    return LiSSA(
        LiSSAConfig(
            damping=config.damping,
            depth=config.lissa_depth,
            batch_size=config.lissa_batch_size,
            seed=config.seed,
            scale_samples=config.lissa_scale_samples,
            power_iterations=config.lissa_power_iterations,
            tail_average=0.3,
        )
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
    influence = Influence(
        adapter, train, make_solver(config), ScoreConfig(batch_size=config.batch_size), config.batch_size
    )
    start = time.perf_counter()
    influence.build_index(cached_candidate_index(adapter, train, index_cache, config.batch_size))
    index_seconds = round(time.perf_counter() - start, 2)
    neighbours, scores = candidate_scores(influence, test, config.candidates)
    top = _top_k(torch.from_numpy(scores), torch.from_numpy(neighbours), config.n_explain)
    info = {"num_params": adapter.num_params, "index_seconds": index_seconds}
    return top, {**info, "solve": _solve_summary(influence.last_solve)}


def _top_k(scores: Tensor, neighbours: Tensor, k: int) -> TopK:
    """The k largest and k most negative scores per row, mapped to training indices through ``neighbours``."""
    helpful_scores, helpful = scores.topk(k, dim=1)
    harmful_scores, harmful = scores.topk(k, dim=1, largest=False)
    return TopK(neighbours.gather(1, helpful), helpful_scores, neighbours.gather(1, harmful), harmful_scores)


def _solve_summary(info: dict[str, Any]) -> dict[str, Any]:
    """The JSON-ready part of a solver's diagnostics (drops per-step norm traces)."""
    return {key: value for key, value in info.items() if not isinstance(value, Tensor)}


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
    clock, rng, start_machine = _Clock(), np.random.default_rng(config.seed), machine_info()
    train_labels = dataset_labels(train)
    with clock.stage("select_test_points"):
        points = select_test_points(model, test, config, rng)
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


def summarise(records: list[dict[str, Any]], n_lr: int) -> dict[str, Any]:
    """Mean ± sd over (test point, explanation) of the loss change per correctness, label mode and kind.

    Also the mean ± sd of ``log10(loss / base loss)`` (FastIF read the effect in orders of magnitude) and the
    share of explanations that lower the loss, all per learning rate.
    """
    summary: dict[str, Any] = {}
    for correctness in CORRECTNESS:
        chosen = [r for r in records if r["correct"] == (correctness == "correct")]
        for mode in LABEL_MODES:
            for kind in KINDS:
                rows = [
                    (np.asarray(e["loss"][mode]), r["base_loss"])
                    for r in chosen
                    for e in r["explanations"]
                    if e["kind"] == kind
                ]
                summary[f"{correctness}/{mode}/{kind}"] = _curve_stats(rows, n_lr)
    return summary


def _curve_stats(rows: list[tuple[np.ndarray, float]], n_lr: int) -> dict[str, Any]:
    """Per-lr statistics of loss curves against their base losses (NaN-free lists; empty when no rows)."""
    if not rows:
        return {"n": 0}
    losses = np.stack([loss for loss, _ in rows])
    base = np.array([b for _, b in rows])[:, None]
    delta = losses - base
    ratio = np.log10(np.maximum(losses, 1e-30) / np.maximum(base, 1e-30))
    sd = (lambda a: a.std(axis=0, ddof=1)) if len(rows) > 1 else (lambda a: np.zeros(n_lr))
    return {
        "n": len(rows),
        "mean_base_loss": float(base.mean()),
        "delta_mean": delta.mean(axis=0).tolist(),
        "delta_sd": sd(delta).tolist(),
        "log10_ratio_mean": ratio.mean(axis=0).tolist(),
        "log10_ratio_sd": sd(ratio).tolist(),
        "share_lowered": (delta < 0).mean(axis=0).tolist(),
    }


# ---------------------------------------------------------------------------------------------- output


def plot_simulatability(result: dict[str, Any], path: str | Path) -> Path:
    """Loss change vs learning rate, mean ± sd per explanation kind: rows = label mode, columns = correctness."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .files import atomic_write

    lrs = np.asarray(result["learning_rates"])
    colours = {"helpful": "#1b9e77", "harmful": "#d95f02", "random": "#7570b3"}
    figure, axes = plt.subplots(2, 2, figsize=(11, 8), sharex=True, squeeze=False)
    for row, mode in enumerate(LABEL_MODES):
        for column, correctness in enumerate(CORRECTNESS):
            axis = axes[row][column]
            for kind in KINDS:
                stats = result["summary"][f"{correctness}/{mode}/{kind}"]
                if not stats["n"]:
                    continue
                mean, sd = np.asarray(stats["delta_mean"]), np.asarray(stats["delta_sd"])
                axis.plot(lrs, mean, color=colours[kind], label=f"{kind} (n={stats['n']})")
                axis.fill_between(lrs, mean - sd, mean + sd, color=colours[kind], alpha=0.15)
            axis.axhline(0.0, color="black", linewidth=0.6)
            axis.set_xscale("log")
            axis.set_yscale("symlog", linthresh=_linthresh(result))
            axis.set_title(f"{correctness} predictions, explanation labelled {mode}", fontsize=10)
            axis.legend(fontsize=8)
            if column == 0:
                axis.set_ylabel("Δ simulator loss vs model prediction")
            if row == 1:
                axis.set_xlabel("learning rate of the single SGD step")
    figure.suptitle("Simulatability: one training example as one SGD step (mean ± sd)")
    figure.tight_layout()
    target = Path(path)
    atomic_write(target, lambda tmp: figure.savefig(tmp, format="png", dpi=130))
    plt.close(figure)
    return target


def _linthresh(result: dict[str, Any]) -> float:
    """symlog's linear range: a tenth of the median |mean change| at the largest lr (positive)."""
    ends = [abs(stats["delta_mean"][-1]) for stats in result["summary"].values() if stats.get("n")]
    return max(float(np.median(ends)) / 10, 1e-6) if ends else 1e-3


def write_simulatability(result: dict[str, Any], out_dir: str | Path, config: SimulatabilityConfig) -> dict[str, Path]:
    """Write the results JSON, the figure and the config into ``out_dir``."""
    out = Path(out_dir)
    return {
        "results": atomic_write_json(out / RESULTS_FILE, _finite(result)),
        "figure": plot_simulatability(result, out / FIGURE_FILE),
        "config": save_config(config, out / CONFIG_FILE),
    }


def _finite(value: Any) -> Any:
    """Replace NaN/inf floats by None so the results are standard JSON."""
    if isinstance(value, dict):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(item) for item in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


# ---------------------------------------------------------------------------------------------- NLI + CLI


def run_nli_simulatability(config: SimulatabilityConfig, log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """The experiment on the cached 3-class MiniLM MNLI model, its MNLI train split and the MNLI test split."""
    from .data.text import TextPairData
    from .recipes.nli import NLITrainConfig, load_embedded, nli_label_scheme, train_nli_classifier

    log = log or (lambda _message: None)
    start = time.perf_counter()
    trained = train_nli_classifier(NLITrainConfig(), progress=False)
    origin = "cached" if trained.from_cache else "trained"
    log(f"task model: {trained.path} ({origin}, {time.perf_counter() - start:.0f}s)")
    names, _ = nli_label_scheme(trained.config.num_labels)
    records = load_embedded("mnli_train", trained.config.num_labels)[: trained.config.train_size]
    train = TextPairData(records, trained.tokenizer, trained.config.max_length, names)
    test = TextPairData(load_embedded("mnli_test", trained.config.num_labels), trained.tokenizer, 128, names)
    index = index_cache_folder(trained.path, len(train))
    result = run_simulatability(trained.model, train, test, config, log, index)
    result["task_model"] = {"path": str(trained.path), "metrics": trained.metrics, "labels": list(names)}
    return result


def add_simulatability_command(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``experiment simulatability`` (creating or reusing the ``experiment`` group of ``subparsers``)."""
    parser = experiment_group(subparsers).add_parser(
        "simulatability",
        help="simulatability: does one top helpful/harmful training example, as one SGD step, move a simulator?",
        description="FastIF application 1 on the bundled MNLI model: writes simulatability.json and .png.",
    )
    parser.add_argument("--quick", action="store_true", help="small sizes for a 2-3 minute smoke run")
    parser.add_argument("--n-test", type=int, default=None, help="correct and wrong test points each (default 8)")
    parser.add_argument("--candidates", type=int, default=None, help="kNN candidates per test point (default 160)")
    parser.add_argument("--solver", choices=("lissa", "identity"), default=None, help="inverse-HVP (default lissa)")
    parser.add_argument("--output", type=Path, default=Path("benchmarks/results/simulatability"), help="results folder")
    parser.add_argument("--seed", type=int, default=0, help="random seed")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    parser.set_defaults(handler=_simulatability_command)
    return parser


def experiment_group(subparsers: argparse._SubParsersAction) -> argparse._SubParsersAction:
    """The sub-command group of the ``experiment`` command, created on first use and reused afterwards."""
    existing = subparsers.choices.get("experiment")
    if existing is None:
        existing = subparsers.add_parser("experiment", help="run one of the FastIF applications")
        return existing.add_subparsers(dest="experiment", required=True, parser_class=type(existing))
    for action in existing._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action
    return existing.add_subparsers(dest="experiment", required=True, parser_class=type(existing))


def config_from_args(args: argparse.Namespace) -> SimulatabilityConfig:
    """The experiment config the command-line options ask for."""
    overrides: dict[str, Any] = {"seed": args.seed}
    if args.n_test is not None:
        overrides.update(n_correct=args.n_test, n_wrong=args.n_test)
    if args.candidates is not None:
        overrides["candidates"] = args.candidates
    if args.solver is not None:
        overrides["solver"] = args.solver
    base = SimulatabilityConfig.quick() if args.quick else SimulatabilityConfig()
    return replace(base, **overrides)


def _simulatability_command(args: argparse.Namespace) -> int:
    """CLI handler: run the experiment, write its files and print the headline numbers."""
    config = config_from_args(args)
    check_writable(args.output)
    result = run_nli_simulatability(config, log=lambda message: print(message, flush=True))
    paths = write_simulatability(result, args.output, config)
    print(format_headline(result))
    print(f"wrote {paths['results']} and {paths['figure']}")
    return 0


def format_headline(result: dict[str, Any]) -> str:
    """A few lines: mean log10(loss ratio) at the lr nearest 1e-3 for every correctness/label/kind cell."""
    lrs = np.asarray(result["learning_rates"])
    at = int(np.argmin(np.abs(np.log10(lrs) + 3)))
    lines = [f"mean log10(loss after / before) at lr={lrs[at]:.2g} (negative = the step moved towards the model):"]
    for key, stats in result["summary"].items():
        if stats.get("n"):
            lines.append(
                f"  {key:<26} {stats['log10_ratio_mean'][at]:+.3f} ± {stats['log10_ratio_sd'][at]:.3f}"
                f"  lowered {100 * stats['share_lowered'][at]:.0f}%  (n={stats['n']})"
            )
    return "\n".join(lines)
