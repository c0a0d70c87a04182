"""Hugging Face sequence classifiers: loading with eager attention, the encoder layers of BERT-like models,
freezing the lower layers, picking the top layers' parameters, and the one L2-mask rule.

Eager attention is required: second-order autodiff (double backward, ``torch.func.jvp``) fails under SDPA on CPU.
The L2 rule (:data:`L2_EXCLUDE`) is what training penalises and what influence puts into the Hessian, so the two
cannot disagree.
"""

from __future__ import annotations

import fnmatch
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import ConfigError, ModelError

L2_EXCLUDE: tuple[str, ...] = ("*bias", "*LayerNorm*", "*layernorm*", "*layer_norm*")
"""Parameters the L2 term leaves out (globs): biases and LayerNorm parameters, as FastIF and BERT training do."""


def _resolve(path_or_name: str | os.PathLike[str]) -> tuple[str, bool]:
    """``(name, is_local)`` for a checkpoint folder or a hub name."""
    name = str(path_or_name)
    return name, Path(name).is_dir()


@contextmanager
def quiet_transformers() -> Iterator[None]:
    """Silence transformers' load report and progress bars (e.g. the expected 'classifier MISSING' notice)."""
    from transformers.utils import logging as hf_logging

    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def _load_hint(is_local: bool) -> str:
    if is_local:
        return "is it a Hugging Face checkpoint folder (config.json + weights)?"
    return "give a local checkpoint folder, or a hub name while online"


def load_tokenizer(path_or_name: str | os.PathLike[str]) -> Any:
    """The tokenizer of a local checkpoint folder or a hub name."""
    from transformers import AutoTokenizer

    name, local = _resolve(path_or_name)
    try:
        return AutoTokenizer.from_pretrained(name, local_files_only=local)
    except (OSError, ValueError) as error:
        raise ModelError(f"cannot load a tokenizer from {name!r} ({error}); {_load_hint(local)}") from None


def load_classifier(
    path_or_name: str | os.PathLike[str],
    num_labels: int | None = None,
    label_names: Sequence[str] | None = None,
    quiet: bool = False,
) -> Any:
    """Load a sequence classifier (local folder or hub name) with eager attention, in eval mode.

    ``label_names`` (or ``num_labels``) sizes a new classification head; ``quiet`` hides transformers' load
    report (use it when a freshly initialised head is expected).
    """
    from transformers import AutoModelForSequenceClassification

    name, local = _resolve(path_or_name)
    kwargs: dict[str, Any] = {"attn_implementation": "eager", "local_files_only": local}
    if label_names is not None:
        num_labels = len(label_names)
        kwargs["id2label"] = dict(enumerate(label_names))
        kwargs["label2id"] = {label: i for i, label in enumerate(label_names)}
    if num_labels is not None:
        kwargs["num_labels"] = num_labels
    with quiet_transformers() if quiet else nullcontext():
        try:
            model = AutoModelForSequenceClassification.from_pretrained(name, **kwargs)
        except (OSError, ValueError, RuntimeError) as error:
            raise ModelError(f"cannot load a classifier from {name!r} ({error}); {_load_hint(local)}") from None
    return model.eval()


def model_label_names(model: nn.Module, override: tuple[str, ...] = ()) -> tuple[str, ...]:
    """Label names in id order: ``override`` if given (checked against the head's size), else ``id2label``."""
    count = int(model.config.num_labels)
    if override:
        if len(override) != count:
            raise ConfigError(f"data.label_names has {len(override)} names but the model has {count} labels")
        return override
    mapping = model.config.id2label or {}
    return tuple(str(mapping.get(i, mapping.get(str(i), i))) for i in range(count))


# ---------------------------------------------------------------------------------------------- parameters


def encoder_layers(model: nn.Module) -> nn.ModuleList:
    """The transformer blocks of a BERT-like classifier (``model.base_model.encoder.layer``)."""
    layers = getattr(getattr(getattr(model, "base_model", None), "encoder", None), "layer", None)
    if not isinstance(layers, nn.ModuleList):
        name = type(model).__name__
        raise ModelError(f"{name} has no base_model.encoder.layer; layer freezing needs a BERT-like model")
    return layers


def freeze_lower_layers(model: nn.Module, frozen_layers: int, freeze_embeddings: bool = True) -> list[str]:
    """Freeze the embeddings (optionally) and encoder layers ``0 .. frozen_layers-1``; return trainable names."""
    layers = encoder_layers(model)
    if not 0 <= frozen_layers <= len(layers):
        raise ConfigError(f"frozen_layers must be between 0 and {len(layers)} for this model, got {frozen_layers}")
    for parameter in model.parameters():
        parameter.requires_grad_(True)
    frozen: list[nn.Module] = list(layers[:frozen_layers])
    if freeze_embeddings:
        frozen.append(model.base_model.embeddings)
    for module in frozen:
        for parameter in module.parameters():
            parameter.requires_grad_(False)
    return [name for name, parameter in model.named_parameters() if parameter.requires_grad]


def _module_name(model: nn.Module, module: nn.Module) -> str:
    """The dotted name of ``module`` inside ``model``."""
    return next(name for name, candidate in model.named_modules() if candidate is module)


def _under(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def top_layer_parameters(model: nn.Module, top_layers: int) -> tuple[str, ...]:
    """The top ``top_layers`` encoder layers plus every parameter outside the embeddings and the encoder."""
    try:
        layers = encoder_layers(model)
    except ModelError:
        raise ConfigError(
            f"{type(model).__name__} is not BERT-like (no base_model.encoder.layer), so parameters.top_layers cannot "
            "pick its layers; list the parameters with --params (module prefixes or globs)"
        ) from None
    if top_layers > len(layers):
        raise ConfigError(f"parameters.top_layers={top_layers} exceeds the model's {len(layers)} layers")
    prefix = _module_name(model, layers)
    encoder = prefix.rpartition(".")[0]
    embeddings = _module_name(model, model.base_model.embeddings)
    top = [f"{prefix}.{i}" for i in range(len(layers) - top_layers, len(layers))]
    rest = [name for name, _ in model.named_parameters() if not _under(name, encoder) and not _under(name, embeddings)]
    return (*top, *rest)


def is_l2_parameter(name: str, exclude: tuple[str, ...] = L2_EXCLUDE) -> bool:
    """Whether the L2 term covers parameter ``name``: weights yes, names matching ``exclude`` (globs) no."""
    return not any(fnmatch.fnmatchcase(name, pattern) for pattern in exclude)


def l2_penalty(model: nn.Module, l2: float, exclude: tuple[str, ...] = L2_EXCLUDE) -> Tensor:
    """``(l2 / 2)·‖θ‖²`` over the trainable weights that :func:`is_l2_parameter` selects."""
    named = model.named_parameters()
    squares = [p.square().sum() for n, p in named if p.requires_grad and is_l2_parameter(n, exclude)]
    return 0.5 * l2 * torch.stack(squares).sum() if squares and l2 else torch.zeros(())
