"""FastIF's fine-tuning loop (error correction, MNLI -> HANS; fine-tuning on unseen data, HANS and ANLI).

For each group (HANS heuristic / ANLI round), mode and seed, starting from the original model, repeat ``steps``
times: draw anchors of the group; take the ``candidates`` pool points nearest to the anchors' mean feature
(FAISS); score them by influence on the anchors' mean loss; take one SGD step on the top helpful / harmful points
(or random candidates, or the anchors themselves); evaluate on every group's held-out test sample.

Design choices (see docs/experiments.md): the kNN index and the anchor queries use the *original* model's
features (one index per run, as FastIF built one per model); s_test is recomputed at the current parameters every
step; the inputs of the trainable top layers are cached once by the core frozen-bottom path
(:mod:`fastif.model.frozen`, kept in a :class:`~fastif.store.Store` under the cache folder), which is exact because
everything below them is frozen: every loss, gradient, HVP, SGD step and evaluation runs on the
:class:`~fastif.model.frozen.FrozenAdapter`, whose parameters are the model's own. The records (pool, anchors,
test points, the model's training data) come from a :class:`FinetuneTask` that a recipe provides (the NLI
recipe's HANS / ANLI tasks).
"""

from __future__ import annotations

import os
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, Protocol

import numpy as np
import torch
from torch import Tensor, nn
from torch.func import grad

from ...candidates import CandidateConfig, CandidateIndex
from ...config import config_to_dict
from ...data import Batch, index_chunks, length_order
from ...data.text import TextPairData, TextRecord
from ...errors import DataError, SolverError
from ...fingerprint import fingerprint_parameters
from ...hvp import Hessian
from ...influence import Influence, TopK
from ...model.adapter import AdapterConfig, HFClassifierAdapter, ModelAdapter
from ...model.frozen import ActivationData, Encoded, FrozenAdapter, Split, encode_prefix, find_split
from ...model.hf import L2_EXCLUDE, top_layer_parameters
from ...solvers import LiSSA, LiSSAConfig
from ...store import Store
from ...store.artifacts import cached_encoding, index_cache_folder
from ...telemetry import environment
from .config import FinetuneConfig

ModelFactory = Callable[[int], tuple[nn.Module, Any, dict[str, Any]]]
"""``factory(num_labels) -> (model, tokenizer, info)``: the classifier to correct, its tokenizer, and metadata."""

Progress = Callable[[str], None]


class TaskRecords(Protocol):
    """The records of a task's evaluation data: per-group anchor and test parts, and an augmentation pool."""

    anchors: Mapping[str, list[TextRecord]]
    test: Mapping[str, list[TextRecord]]
    pool: list[TextRecord]

    def sizes(self) -> dict[str, Any]:
        """The size of every part, for the results file."""
        ...


class FinetuneTask(Protocol):
    """Where a correct / augment run's records and label scheme come from (a recipe provides it)."""

    def num_labels(self, config: Any) -> int:
        """The number of classes of the task's model."""
        ...

    def label_names(self, config: Any) -> tuple[str, ...]:
        """The class names, in label-id order."""
        ...

    def split(self, config: Any) -> TaskRecords:
        """The anchor / test (/ pool) parts of every group of ``config``."""
        ...

    def training_records(self, config: Any) -> Sequence[TextRecord]:
        """The model's own training data (its first ``hessian_size`` points define the Hessian)."""
        ...

    def pool_records(self, config: Any, split: TaskRecords) -> list[TextRecord]:
        """The candidate pool: the model's training data (correct) or unseen points (augment)."""
        ...


@dataclass
class Setup:
    """Everything the runs share, built once: the adapter on the cached bottom, cached data, the kNN index over the
    original model's features, the fixed LiSSA scale."""

    config: FinetuneConfig
    adapter: FrozenAdapter
    original: Tensor
    hessian_data: ActivationData
    pool: ActivationData
    pool_records: list[TextRecord]
    anchors: dict[str, ActivationData]
    anchor_records: dict[str, list[TextRecord]]
    anchor_features: dict[str, Tensor]
    test: dict[str, list[Batch]]
    index: CandidateIndex
    lissa: LiSSAConfig
    info: dict[str, Any]


# ---------------------------------------------------------------------------------------------- setup


def trainable_adapter(model: nn.Module, config: FinetuneConfig) -> HFClassifierAdapter:
    """The model's adapter over what the experiment trains and takes influence over: the top ``trainable_layers``
    encoder layers, the pooler and the classifier; L2 on their weights (the one L2 rule, :data:`L2_EXCLUDE`)."""
    include = top_layer_parameters(model, config.trainable_layers)
    return HFClassifierAdapter(model, AdapterConfig(include=include, l2=config.l2, l2_exclude=L2_EXCLUDE))


Encoder = Callable[[Sequence[TextRecord]], Encoded]


def encoder(
    adapter: ModelAdapter,
    split: Split,
    tokenizer: Any,
    config: FinetuneConfig,
    names: tuple[str, ...],
    cache_dir: str | os.PathLike[str] | None,
) -> Encoder:
    """A function that tokenises records and runs the frozen bottom once over them (:func:`encode_prefix`); with
    ``cache_dir``, the activations and features are kept in a :class:`Store` there, one folder per model and data."""
    model_key = fingerprint_parameters(dict(adapter.model.state_dict())) if cache_dir is not None else ""

    def encode(records: Sequence[TextRecord]) -> Encoded:
        data = TextPairData(list(records), tokenizer, config.max_length, names)
        compute = lambda: encode_prefix(adapter, data, split)  # noqa: E731
        if cache_dir is None:
            return compute()
        identity = {"model_fingerprint": model_key, "data_fingerprint": data.fingerprint(), "config": {}}
        with Store.open(index_cache_folder(identity, cache_dir), **identity) as store:
            return cached_encoding(store, split, data, compute)

    return encode


def _fixed_scale(adapter: ModelAdapter, hessian_data: ActivationData, lissa: LiSSAConfig) -> LiSSAConfig:
    """Pick LiSSA's contraction-safe scale once, on the original model, and fix it for every later step."""
    if lissa.scale is not None:
        return lissa
    solver = LiSSA(lissa).fit(Hessian(adapter, hessian_data, adapter.flat_params()))
    return replace(lissa, scale=float(solver.scale))


def _hessian_and_pool(
    config: FinetuneConfig, encode: Encoder, training: Sequence[TextRecord], pool_records: list[TextRecord]
) -> tuple[ActivationData, Encoded]:
    """The Hessian's data and the encoded pool (with its kNN features); for ``correct`` the pool is the model's
    training data, so one pass serves both."""
    if config.experiment != "correct":
        return encode(training[: config.hessian_size]).data, encode(pool_records)
    encoded = encode(training[: max(config.hessian_size, len(pool_records))])
    pool = Encoded(
        encoded.data.subset(range(len(pool_records))),
        encoded.features[: len(pool_records)],
        encoded.layer_returns_tuple,
    )
    return encoded.data.subset(range(config.hessian_size)), pool


def prepare(
    config: FinetuneConfig, factory: ModelFactory, task: FinetuneTask, progress: Progress, cache_dir: Any = None
) -> Setup:
    """Load the model and data, split them, cache the bottom's output once (the core frozen path), build the kNN
    index over the pool's features from that same pass, fix LiSSA's scale."""
    start = time.perf_counter()
    model, tokenizer, model_info = factory(task.num_labels(config))
    model.eval()
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    full = trainable_adapter(model, config)
    frozen_split = find_split(full, "on")
    assert frozen_split is not None  # "on" raises where the model cannot be split
    encode = encoder(full, frozen_split, tokenizer, config, task.label_names(config), cache_dir)
    split = task.split(config)
    training = task.training_records(config)
    pool_records = task.pool_records(config, split)
    progress(f"encoding (pool {len(pool_records)}, Hessian {config.hessian_size}, test {split.sizes()['test']})")
    hessian_data, pool = _hessian_and_pool(config, encode, training, pool_records)
    anchors = {group: encode(split.anchors[group]) for group in config.groups}
    test = {group: collate(encode(split.test[group]).data) for group in config.groups}
    adapter = FrozenAdapter(full, frozen_split, pool.layer_returns_tuple)
    progress("building the kNN index over the pool's features; fixing LiSSA's scale")
    index = CandidateIndex.build(pool.features, CandidateConfig())
    lissa = _fixed_scale(adapter, hessian_data, config.lissa)
    info = {
        "model": model_info,
        "split_sizes": {**split.sizes(), "pool": {"all": len(pool_records)}},
        "trainable_modules": list(full.config.include),
        "influence_parameters": adapter.num_params,
        "setup_seconds": time.perf_counter() - start,
        "lissa_scale": lissa.scale,
    }
    return Setup(
        config, adapter, adapter.flat_params(), hessian_data, pool.data, pool_records,
        {group: item.data for group, item in anchors.items()}, {g: split.anchors[g] for g in config.groups},
        {group: item.features for group, item in anchors.items()}, test, index, lissa, info,
    )  # fmt: skip


# ---------------------------------------------------------------------------------------------- one step


def anchor_schedule(size: int, anchors: int, steps: int, seed: int, group_index: int) -> list[list[int]]:
    """Anchor indices for every step: slices of seeded permutations (the same for every mode), no repeat in a step."""
    if anchors > size:
        raise DataError(f"cannot draw {anchors} anchors per step from an anchor sample of {size}; enlarge it")
    rng = np.random.default_rng([seed, group_index])
    schedule: list[list[int]] = []
    order: list[int] = []
    for _ in range(steps):
        if len(order) < anchors:
            order = rng.permutation(size).tolist()
        schedule.append(order[:anchors])
        order = order[anchors:]
    return schedule


def collate(data: ActivationData, batch_size: int = 256) -> list[Batch]:
    """``data`` as a list of padded batches, sorted by length (built once, evaluated after every step)."""
    return [data.batch(chunk) for chunk in index_chunks(length_order(data, range(len(data))), batch_size)]


def evaluate(adapter: ModelAdapter, batches: Sequence[Batch]) -> dict[str, float]:
    """Accuracy and mean cross-entropy of the model at its current parameters on pre-collated batches."""
    flat = adapter.flat_params()
    with torch.no_grad():
        logits = torch.cat([adapter.outputs(flat, batch) for batch in batches])
    labels = torch.cat([adapter.raw_batch(batch)["labels"] for batch in batches])
    return {
        "accuracy": float((logits.argmax(-1) == labels).float().mean()),
        "loss": float(nn.functional.cross_entropy(logits, labels)),
    }


def mean_loss(adapter: ModelAdapter, data: ActivationData, flat: Tensor | None = None) -> float:
    """Mean cross-entropy of ``data`` (a handful of points) at ``flat`` (default: the current parameters)."""
    flat = adapter.flat_params() if flat is None else flat
    with torch.no_grad():
        return float(adapter.per_example_loss(flat, data.batch(range(len(data)))).mean())


def sgd_step(adapter: ModelAdapter, data: ActivationData, lr: float) -> None:
    """One plain SGD step (no momentum, no L2) on the mean cross-entropy of ``data``, written into the model's own
    parameters through the adapter's flat vector."""
    flat = adapter.flat_params()
    batch = data.batch(range(len(data)))
    gradient = grad(lambda theta: adapter.per_example_loss(theta, batch).mean())(flat)
    adapter.load_flat_params(flat - lr * gradient)


DAMPING_RETRIES = 6
"""How often :func:`damped_s_test` doubles the damping after LiSSA diverges before giving up."""


def influence_top(setup: Setup, anchors: ActivationData, lissa_seed: int) -> tuple[TopK, dict[str, Any]]:
    """FastIF's steps 2-3 at the current parameters, through the facade's one path: the anchors' mean-loss s_test
    (Hessian over the training sample), its ``candidates`` nearest pool points (kNN on the anchors' mean feature),
    their exact scores, and the top ``selected`` of each sign.

    As the model moves, the Hessian can become more indefinite than at the start (where the damping was chosen),
    so a diverging chain is retried with twice the damping (and the scale raised to match); the damping used is
    recorded with the step.
    """
    lissa = replace(setup.lissa, seed=lissa_seed)
    count = min(setup.config.candidates, setup.index.n)
    for attempt in range(DAMPING_RETRIES + 1):
        influence = Influence(setup.adapter, setup.pool, LiSSA(lissa), hessian_data=setup.hessian_data)
        influence.build_index(setup.index)
        try:
            with warnings.catch_warnings():  # an unsettled chain is recorded per step (converged), not printed
                warnings.filterwarnings("ignore", "LiSSA has not settled", RuntimeWarning)
                scored = influence.candidate_scores(anchors, count, group=True)
            return scored.top_k(setup.config.selected), {**_solve_summary(scored.solve.info), "damping": lissa.damping}
        except SolverError:
            if attempt == DAMPING_RETRIES:
                raise
            lissa = replace(lissa, damping=2 * lissa.damping, scale=float(lissa.scale or 0.0) + 1.5 * lissa.damping)
    raise SolverError("unreachable: the last attempt returns or raises")


def choose(setup: Setup, mode: str, anchors: ActivationData, neighbours: np.ndarray, seeds: tuple[int, int]):
    """The points of one SGD step, their pool indices (None for the anchors) and their scores (if any)."""
    config = setup.config
    if mode == "anchors":
        return anchors, None, None, {}
    if mode == "random":
        rng = np.random.default_rng(seeds)
        chosen = rng.choice(neighbours, size=config.selected, replace=False).tolist()
        return setup.pool.subset(chosen), chosen, None, {}
    top, solve = influence_top(setup, anchors, seeds[0] * 1_000 + seeds[1])
    indices, scores = (top.helpful_indices, top.helpful_scores) if mode == "helpful" else (
        top.harmful_indices, top.harmful_scores
    )  # fmt: skip
    chosen = indices[0].tolist()
    return setup.pool.subset(chosen), chosen, scores[0].tolist(), solve


def _solve_summary(info: dict[str, Any]) -> dict[str, Any]:
    """The JSON-friendly scalars of a solver's diagnostics (traces dropped; the chains' largest late growth kept)."""
    summary = {key: value for key, value in info.items() if isinstance(value, int | float | bool | str)}
    if info.get("late_growth"):
        summary["late_growth"] = max(float(value) for value in info["late_growth"])
    return summary


# ---------------------------------------------------------------------------------------------- runs


def evaluate_all(setup: Setup) -> dict[str, dict[str, float]]:
    """Accuracy and loss on every group's test sample at the current parameters."""
    return {group: evaluate(setup.adapter, batches) for group, batches in setup.test.items()}


def run_one(setup: Setup, group: str, mode: str, seed: int) -> dict[str, Any]:
    """One (group, mode, seed) run from the original parameters; the model is restored afterwards."""
    config = setup.config
    group_index = config.groups.index(group)
    schedule = anchor_schedule(len(setup.anchors[group]), config.anchors, config.steps, seed, group_index)
    steps = []
    try:
        for step, anchor_indices in enumerate(schedule):
            start = time.perf_counter()
            anchors = setup.anchors[group].subset(anchor_indices)
            query = setup.anchor_features[group][anchor_indices]
            neighbours = setup.index.search_mean(query, min(config.candidates, setup.index.n))
            loss_before = mean_loss(setup.adapter, anchors)
            data, chosen, scores, solve = choose(setup, mode, anchors, neighbours, (seed * 100 + group_index, step))
            sgd_step(setup.adapter, data, config.lr)
            steps.append(
                {
                    "step": step + 1,
                    "anchor_ids": [setup.anchor_records[group][i].id for i in anchor_indices],
                    "selected_ids": None if chosen is None else [setup.pool_records[i].id for i in chosen],
                    "selected_labels": [int(label) for label in data.base.labels],
                    "scores": scores,
                    "solver": solve,
                    "anchor_loss_before": loss_before,
                    "anchor_loss_after": mean_loss(setup.adapter, anchors),
                    "eval": evaluate_all(setup),
                    "seconds": time.perf_counter() - start,
                }
            )
    finally:
        setup.adapter.load_flat_params(setup.original)
    return {"group": group, "mode": mode, "seed": seed, "steps": steps}


def run_experiment(
    config: FinetuneConfig,
    factory: ModelFactory,
    task: FinetuneTask,
    progress: Progress | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
) -> dict[str, Any]:
    """Run every (group, mode, seed) of ``config``; return the results (config, original and per-step metrics).

    ``factory`` gives the model and ``task`` its records; ``cache_dir`` keeps the encodings of the frozen bottom on
    disk between runs (None: recompute them).
    """
    say = progress or (lambda _message: None)
    start, cpu_start = time.perf_counter(), time.process_time()
    env_start = environment()
    setup = prepare(config, factory, task, say, cache_dir)
    original = evaluate_all(setup)
    runs = []
    for seed in config.seeds:
        for group in config.groups:
            for mode in config.modes:
                run_start = time.perf_counter()
                runs.append(run_one(setup, group, mode, seed))
                final = runs[-1]["steps"][-1]["eval"][group]["accuracy"]
                change = 100 * (final - original[group]["accuracy"])
                say(f"seed {seed} {group:<15} {mode:<8} {change:+.2f} pts ({time.perf_counter() - run_start:.0f}s)")
    return {
        "config": config_to_dict(config),
        "setup": setup.info,
        "original": original,
        "runs": runs,
        "environment": {
            "start": env_start,
            "end": environment(),
            "wall_seconds": time.perf_counter() - start,
            "cpu_seconds": time.process_time() - cpu_start,
        },
    }
