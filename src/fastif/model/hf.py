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

from ..config import shown
from ..errors import ConfigError, ModelError

L2_EXCLUDE: tuple[str, ...] = ("*bias", "*LayerNorm*", "*layernorm*", "*layer_norm*")
"""Parameters the L2 term leaves out (globs): biases and LayerNorm parameters, as FastIF and BERT training do."""


TOKENIZER_FILES = (
    "tokenizer.json",
    "vocab.txt",
    "vocab.json",
    "tokenizer.model",
    "spiece.model",
    "sentencepiece.bpe.model",
)
"""Files one of which a checkpoint folder's tokenizer needs: without them transformers builds an empty tokenizer."""
PICKLED_WEIGHTS = ("pytorch_model.bin", "*.bin", "*.pt", "*.pth", "*.ckpt")
"""Weight files that are pickles: fastif never loads them."""
OFFLINE_HINT = "fastif works offline: give the path of a local checkpoint folder (a hub name is fetched only online)"


def _resolve(path_or_name: str | os.PathLike[str]) -> tuple[str, bool]:
    """``(name, is_local)`` for a checkpoint folder or a hub name; a path that names no folder is refused."""
    name = str(path_or_name)
    path = Path(name)
    if path.is_dir():
        return name, True
    first = Path(path.parts[0]) if path.parts else path
    looks_local = name.startswith((".", "/", "~")) or name.endswith("/") or name.count("/") > 1 or first.is_dir()
    if path.exists() or looks_local:
        raise ModelError(f"{shown(name)} is not a checkpoint folder (no such folder); {OFFLINE_HINT}")
    return name, False


def _check_weights(folder: Path) -> None:
    """Refuse a checkpoint folder whose weights are a pickle or whose safetensors files are damaged, naming the file."""
    import safetensors

    tensors = sorted(folder.glob("*.safetensors"))
    pickled = sorted({path for pattern in PICKLED_WEIGHTS for path in folder.glob(pattern)})
    if not tensors and pickled:
        raise ModelError(
            f"{pickled[0]} is a pickled PyTorch checkpoint, and fastif never unpickles (a pickle can run code); "
            "convert it to safetensors where you trust it: model.save_pretrained(folder, safe_serialization=True)"
        )
    for path in tensors:
        try:
            with safetensors.safe_open(str(path), framework="pt"):
                pass
        except Exception as error:  # safetensors raises its own SafetensorError (truncated file, bad header)
            raise ModelError(f"{path} is damaged ({error}); copy or save the checkpoint again") from None


@contextmanager
def quiet_transformers() -> Iterator[None]:
    """Silence transformers' load report and progress bars (e.g. the expected 'classifier MISSING' notice) and the
    hub client's retry messages."""
    from huggingface_hub.utils import logging as hub_logging
    from transformers.utils import logging as hf_logging

    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hub_verbosity = hub_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    hub_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hub_logging.set_verbosity(hub_verbosity)
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def _load_hint(is_local: bool) -> str:
    if is_local:
        return "is it a Hugging Face checkpoint folder (config.json + weights)?"
    return "give a local checkpoint folder, or a hub name while online"


def _not_fetched(name: str, what: str) -> ModelError:
    """The one-line error for a hub name that could not be loaded (offline, or no such model)."""
    return ModelError(
        f"cannot load a {what} from {shown(name)}: it is not a local folder and was not found online; {OFFLINE_HINT}"
    )


def load_tokenizer(path_or_name: str | os.PathLike[str]) -> Any:
    """The tokenizer of a local checkpoint folder or a hub name; a folder without tokenizer files is refused."""
    from transformers import AutoTokenizer

    name, local = _resolve(path_or_name)
    if local and not any((Path(name) / file).is_file() for file in TOKENIZER_FILES):
        raise ModelError(
            f"no tokenizer in {name} (none of {', '.join(TOKENIZER_FILES)}); save the model's tokenizer there "
            "too: tokenizer.save_pretrained(folder)"
        )
    try:
        return AutoTokenizer.from_pretrained(name, local_files_only=local)
    except Exception as error:  # tokenizers and transformers raise many types for a damaged or missing file
        if not local:
            raise _not_fetched(name, "tokenizer") from None
        message = " ".join(str(error).split())[:300]
        raise ModelError(f"cannot load a tokenizer from {name!r} ({message}); {_load_hint(local)}") from None


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
    if local:
        _check_weights(Path(name))
        kwargs["use_safetensors"] = True  # never fall back to a pickled pytorch_model.bin
    with quiet_transformers() if quiet or not local else nullcontext():
        try:
            model = AutoModelForSequenceClassification.from_pretrained(name, **kwargs)
        except (OSError, ValueError, RuntimeError) as error:
            if not local:
                raise _not_fetched(name, "classifier") from None
            message = " ".join(str(error).split())[:300]
            raise ModelError(f"cannot load a classifier from {name!r} ({message}); {_load_hint(local)}") from None
    return model.eval()


def load_causal_lm(path_or_name: str | os.PathLike[str]) -> Any:
    """Load a causal language model (``*ForCausalLM``; local folder of safetensors, or a hub name) with eager
    attention, in eval mode."""
    from transformers import AutoModelForCausalLM

    name, local = _resolve(path_or_name)
    kwargs: dict[str, Any] = {"attn_implementation": "eager", "local_files_only": local}
    if local:
        _check_weights(Path(name))
        kwargs["use_safetensors"] = True  # never fall back to a pickled pytorch_model.bin
    with quiet_transformers():
        try:
            model = AutoModelForCausalLM.from_pretrained(name, **kwargs)
        except (OSError, ValueError, RuntimeError) as error:
            if not local:
                raise _not_fetched(name, "causal language model") from None
            message = " ".join(str(error).split())[:300]
            raise ModelError(f"cannot load a causal LM from {name!r} ({message}); {_load_hint(local)}") from None
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
