"""Model, data and adapter stages of the pipeline: load the classifier, its tokenizer and label names, the text
sets (bundled, JSONL/CSV files or Hugging Face ``datasets``), and the parameter selection influence is taken over."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..adapters import AdapterConfig, HFClassifierAdapter
from ..errors import ConfigError, DataError, ModelError
from ..nli_data import (
    EMBEDDED_NAMES,
    NLI2_LABEL_MAP,
    NLI2_LABELS,
    NLIRecord,
    TextDataConfig,
    TextPairData,
    load_text_data,
    records_from_rows,
)
from ..nli_model import (
    TRAIN_CONFIG_FILE,
    NLITrainConfig,
    encoder_layers,
    load_classifier,
    load_tokenizer,
    load_trained,
    train_nli_classifier,
)
from .config import EMBEDDED_MODEL, DataConfig, ModelConfig, ParameterConfig

HF_PREFIX = "hf:"


@dataclass
class LoadedModel:
    """A classifier ready for influence: model (eval mode, on its device), tokenizer, label scheme, provenance."""

    model: nn.Module
    tokenizer: Any
    label_names: tuple[str, ...]
    recipe: NLITrainConfig | None = None
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def label_map(self) -> tuple[tuple[str, str], ...]:
        """Raw-label aliases: 3-class NLI labels fold into entailment / non-entailment for a 2-class NLI model."""
        return NLI2_LABEL_MAP if self.label_names == NLI2_LABELS else ()


def resolve_device(name: str) -> torch.device:
    """The torch device called ``name``; ConfigError if it is malformed or absent on this machine."""
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"unknown device {name!r}; use 'cpu', 'cuda' or 'cuda:N'") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r} asked for but torch sees no GPU; use --device cpu")
    return device


def _model_label_names(model: nn.Module, override: tuple[str, ...]) -> tuple[str, ...]:
    """Label names in id order: ``override`` if given (checked against the head's size), else ``id2label``."""
    count = int(model.config.num_labels)
    if override:
        if len(override) != count:
            raise ConfigError(f"data.label_names has {len(override)} names but the model has {count} labels")
        return override
    mapping = model.config.id2label or {}
    return tuple(str(mapping.get(i, mapping.get(str(i), i))) for i in range(count))


def load_model(config: ModelConfig, data: DataConfig, device: torch.device, progress: bool = True) -> LoadedModel:
    """The embedded recipe's model (trained once, then cached), a ``fastif train`` folder, or any HF classifier."""
    if config.model == EMBEDDED_MODEL:
        trained = train_nli_classifier(config.recipe, progress=progress)
        source = "embedded"
    elif (Path(config.model) / TRAIN_CONFIG_FILE).is_file():
        trained, source = load_trained(config.model), str(config.model)
    else:
        model = load_classifier(config.model, quiet=True).to(device)
        info = {"source": str(config.model), "path": str(config.model)}
        return LoadedModel(model, load_tokenizer(config.model), _model_label_names(model, data.label_names), None, info)
    info = {
        "source": source,
        "path": str(trained.path),
        "from_cache": trained.from_cache,
        "metrics": trained.metrics,
    }
    model = trained.model.to(device)
    return LoadedModel(model, trained.tokenizer, _model_label_names(model, data.label_names), trained.config, info)


# ---------------------------------------------------------------------------------------------- text sets


def _text_config(loaded: LoadedModel, data: DataConfig, **where: Any) -> TextDataConfig:
    """A TextDataConfig with ``data``'s columns and the model's label scheme."""
    return TextDataConfig(
        premise_column=data.premise_column,
        hypothesis_column=data.hypothesis_column,
        label_column=data.label_column,
        id_column=data.id_column,
        label_names=loaded.label_names,
        label_map=loaded.label_map,
        max_length=data.max_length,
        **where,
    )


def _hf_rows(spec: str, role: str, label_column: str, label_names: tuple[str, ...]) -> list[tuple[int, dict]]:
    """Rows of a Hugging Face dataset ``hf:NAME[:CONFIG][@SPLIT]`` (needs ``datasets`` and a network)."""
    name, _, split = spec.removeprefix(HF_PREFIX).partition("@")
    name, _, subset = name.partition(":")
    try:
        import datasets
    except ImportError:
        raise ConfigError(
            f"{spec}: reading Hugging Face datasets needs the `datasets` package and a network "
            "(pip install datasets), or export the split to a JSONL/CSV file"
        ) from None
    try:
        dataset = datasets.load_dataset(name, subset or None, split=split or role)
    except Exception as error:  # datasets raises many error types (network, missing split, bad name)
        message = " ".join(str(error).split())[:300]
        raise DataError(
            f"cannot load {spec} ({message}); check the name, config and split, and that you are online "
            "(offline: export it to a JSONL/CSV file)"
        ) from None
    names = getattr(dataset.features.get(label_column), "names", None)
    as_names = names is not None and set(names) <= set(label_names)
    rows = []
    for number, row in enumerate(dataset, start=1):
        row = dict(row)
        if as_names and isinstance(row.get(label_column), int) and row[label_column] >= 0:
            row[label_column] = names[row[label_column]]
        rows.append((number, row))
    return rows


def load_records(spec: str, role: str, loaded: LoadedModel, data: DataConfig) -> list[NLIRecord]:
    """The records of a bundled set, a JSONL/CSV/TSV file or ``hf:NAME[:CONFIG][@SPLIT]``, labelled for the model."""
    if spec in EMBEDDED_NAMES:
        embedded = TextDataConfig(embedded=spec, label_names=loaded.label_names, label_map=loaded.label_map)
        return load_text_data(embedded)
    if spec.startswith(HF_PREFIX):
        rows = _hf_rows(spec, role, data.label_column, loaded.label_names)
        return records_from_rows(rows, _text_config(loaded, data, path=spec), spec)
    if not Path(spec).is_file():
        raise DataError(
            f"--{role} {spec!r} is neither a file nor a bundled set {EMBEDDED_NAMES}; give a JSONL/CSV path, a "
            "bundled set, or hf:NAME[:CONFIG][@SPLIT]"
        )
    return load_text_data(_text_config(loaded, data, path=spec))


def load_train(loaded: LoadedModel, data: DataConfig) -> TextPairData:
    """The training set tokenised for the model; a recipe model's bundled split is cut to what it was trained on."""
    records = load_records(data.train, "train", loaded, data)
    if loaded.recipe is not None and data.train == "mnli_train":
        records = records[: loaded.recipe.train_size]
    if data.train_size is not None:
        records = records[: data.train_size]
    return TextPairData(records, loaded.tokenizer, data.max_length, loaded.label_names)


def text_records(
    loaded: LoadedModel, data: DataConfig, premise: str, hypothesis: str | None, label: str
) -> list[NLIRecord]:
    """One record from text given on the command line, its label checked like a file's."""
    if data.hypothesis_column is not None and hypothesis is None:
        raise ConfigError("give --hypothesis with --premise (or set data.hypothesis_column to none for single texts)")
    row = {"premise": premise, "hypothesis": hypothesis, "label": label, "id": "text-0"}
    config = TextDataConfig(
        path="<command line>",
        hypothesis_column=None if hypothesis is None else "hypothesis",
        label_names=loaded.label_names,
        label_map=loaded.label_map,
    )
    return records_from_rows([(1, row)], config, "--premise/--hypothesis/--label")


# ---------------------------------------------------------------------------------------------- parameters


def _module_name(model: nn.Module, module: nn.Module) -> str:
    """The dotted name of ``module`` inside ``model``."""
    return next(name for name, candidate in model.named_modules() if candidate is module)


def _under(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def selected_parameters(model: nn.Module, config: ParameterConfig) -> tuple[str, ...]:
    """``config.include``, or the top ``top_layers`` encoder layers plus everything outside embeddings and encoder."""
    if config.include:
        return config.include
    try:
        layers = encoder_layers(model)
    except ModelError:
        raise ConfigError(
            f"{type(model).__name__} is not BERT-like (no base_model.encoder.layer), so parameters.top_layers cannot "
            "pick its layers; list the parameters with --params (module prefixes or globs)"
        ) from None
    if config.top_layers > len(layers):
        raise ConfigError(f"parameters.top_layers={config.top_layers} exceeds the model's {len(layers)} layers")
    prefix = _module_name(model, layers)
    encoder = prefix.rpartition(".")[0]
    embeddings = _module_name(model, model.base_model.embeddings)
    top = [f"{prefix}.{i}" for i in range(len(layers) - config.top_layers, len(layers))]
    rest = [name for name, _ in model.named_parameters() if not _under(name, encoder) and not _under(name, embeddings)]
    return (*top, *rest)


def build_adapter(loaded: LoadedModel, config: ParameterConfig, feature_module: str) -> HFClassifierAdapter:
    """The HF adapter over the selected parameters, with the recipe's L2 term unless ``config.l2`` is set."""
    l2 = config.l2 if config.l2 is not None else (loaded.recipe.l2 if loaded.recipe is not None else 0.0)
    adapter_config = AdapterConfig(
        include=selected_parameters(loaded.model, config),
        exclude=config.exclude,
        l2=l2,
        l2_exclude=config.l2_exclude,
    )
    return HFClassifierAdapter(loaded.model, adapter_config, feature_module=feature_module)
