"""The NLI/MiniLM recipe for the generic pipeline: the embedded model is MiniLM fine-tuned on the bundled MNLI
train split, data are bundled NLI sets or (premise, hypothesis, label) files, and examples show as premise and
hypothesis."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ...config import config_from_dict
from ...data.files import HF_PREFIX, hf_rows
from ...data.text import TextPairData, TextRecord, records_from_rows
from ...errors import ConfigError, DataError
from ...model.hf import freeze_lower_layers, load_classifier, load_tokenizer, model_label_names
from ...pipeline.config import EMBEDDED_MODEL, DataConfig, ModelConfig
from ...pipeline.recipe import LoadedModel
from .data import EMBEDDED_NAMES, NLI2_LABEL_MAP, NLI2_LABELS, TextDataConfig, load_text_data, nli_label_scheme
from .model import (
    NLI_DAMPING,
    TRAIN_CONFIG_FILE,
    NLITrainConfig,
    load_minilm_classifier,
    load_minilm_tokenizer,
    load_trained,
    train_nli_classifier,
    training_plan,
)


def _label_map(label_names: tuple[str, ...]) -> tuple[tuple[str, str], ...]:
    """Raw-label aliases: 3-class NLI labels fold into entailment / non-entailment for a 2-class NLI model."""
    return NLI2_LABEL_MAP if label_names == NLI2_LABELS else ()


def _loaded(model: Any, tokenizer: Any, data: DataConfig, options: Any, info: dict[str, Any]) -> LoadedModel:
    names = model_label_names(model, data.label_names)
    l2 = options.l2 if options is not None else None
    return LoadedModel(model, tokenizer, names, _label_map(names), l2, options, info)


def _text_config(loaded: LoadedModel, data: DataConfig, **where: Any) -> TextDataConfig:
    """A TextDataConfig with ``data``'s columns and the model's label scheme."""
    return TextDataConfig(
        premise_column=data.text_column,
        hypothesis_column=data.text_pair_column,
        label_column=data.label_column,
        id_column=data.id_column,
        label_names=loaded.label_names,
        label_map=loaded.label_map,
        max_length=data.max_length,
        **where,
    )


def _max_length(loaded: LoadedModel, data: DataConfig) -> int:
    """``data.max_length``, refused when the model has fewer position embeddings (it would fail on long pairs)."""
    positions = getattr(loaded.model.config, "max_position_embeddings", None)
    if isinstance(positions, int) and data.max_length > positions:
        raise ConfigError(
            f"--max-length (data.max_length) is {data.max_length} but the model reads at most {positions} tokens; "
            f"set it to {positions} or less",
            "data.max_length",
        )
    shortest = loaded.tokenizer.num_special_tokens_to_add(pair=data.text_pair_column is not None) + 2
    if data.max_length < shortest:  # the tokenizer cannot truncate below its special tokens and returns full pairs
        raise ConfigError(
            f"--max-length (data.max_length) is {data.max_length} but a pair needs at least {shortest} tokens "
            "(its special tokens and one token of each text)",
            "data.max_length",
        )
    return data.max_length


class NLIRecipe:
    """MiniLM on NLI. The damping :data:`~fastif.recipes.nli.model.NLI_DAMPING` makes H + damping·I positive
    definite for the embedded model's pooler + classifier; other models may need more (a solver that meets an
    indefinite matrix says which damping would do)."""

    name = "nli"
    damping = NLI_DAMPING

    def options(self, value: Any) -> NLITrainConfig:
        """The training recipe's options: defaults, a config table, or an NLITrainConfig."""
        if value is None:
            return NLITrainConfig()
        if isinstance(value, NLITrainConfig):
            return value
        if isinstance(value, dict):
            return config_from_dict(NLITrainConfig, value, "model.recipe.")
        raise ConfigError(f"model.recipe must be a table of NLITrainConfig options, got {type(value).__name__}")

    def load_plan(self, model: ModelConfig) -> str | None:
        """A "plan:" line when the embedded model must be trained first (minutes); None otherwise."""
        return training_plan(model.recipe) if model.model == EMBEDDED_MODEL else None

    def load_model(self, model: ModelConfig, data: DataConfig, device: torch.device, progress: bool) -> LoadedModel:
        """The embedded recipe's model (trained once, then cached), a ``fastif train`` folder, or any HF classifier."""
        if model.model == EMBEDDED_MODEL:
            trained, source = train_nli_classifier(model.recipe, progress=progress), "embedded"
        elif (Path(model.model) / TRAIN_CONFIG_FILE).is_file():
            trained, source = load_trained(model.model), str(model.model)
        else:
            classifier = load_classifier(model.model, quiet=True).to(device)
            info = {"source": str(model.model), "path": str(model.model)}
            return _loaded(classifier, load_tokenizer(model.model), data, None, info)
        info = {
            "source": source,
            "path": str(trained.path),
            "from_cache": trained.from_cache,
            "metrics": trained.metrics,
        }
        return _loaded(trained.model.to(device), trained.tokenizer, data, trained.config, info)

    def untrained_model(self, model: ModelConfig, seed: int, device: torch.device) -> LoadedModel:
        """MiniLM with a fresh head and the recipe's frozen layers."""
        options = model.recipe
        classifier = load_minilm_classifier(options.num_labels, seed=seed)
        freeze_lower_layers(classifier, options.frozen_layers, options.freeze_embeddings)
        names = nli_label_scheme(options.num_labels)[0]
        info = {"source": "minilm with an untrained head (bench)"}
        return LoadedModel(
            classifier.to(device), load_minilm_tokenizer(), names, _label_map(names), options.l2, options, info
        )

    def _records(self, spec: str, role: str, loaded: LoadedModel, data: DataConfig) -> list[TextRecord]:
        """Records of a bundled set, a JSONL/CSV/TSV file or ``hf:NAME[:CONFIG][@SPLIT]``, labelled for the model."""
        if spec in EMBEDDED_NAMES:
            embedded = TextDataConfig(embedded=spec, label_names=loaded.label_names, label_map=loaded.label_map)
            return load_text_data(embedded)
        if spec.startswith(HF_PREFIX):
            rows = hf_rows(spec, role, data.label_column, loaded.label_names)
            return records_from_rows(rows, _text_config(loaded, data, path=spec).columns, spec)
        if not Path(spec).is_file():
            raise DataError(
                f"--{role} {spec!r} is neither a file nor a bundled set {EMBEDDED_NAMES}; give a JSONL/CSV path, a "
                "bundled set, or hf:NAME[:CONFIG][@SPLIT]"
            )
        return load_text_data(_text_config(loaded, data, path=spec))

    def load_data(self, role: str, loaded: LoadedModel, data: DataConfig) -> TextPairData:
        """The tokenised train or test set; the embedded MNLI split is cut to what the recipe model was trained on."""
        records = self._records(data.train if role == "train" else data.test, role, loaded, data)
        if role == "train":
            if loaded.options is not None and data.train == "mnli_train":
                records = records[: loaded.options.train_size]
            if data.train_size is not None:
                records = records[: data.train_size]
        return TextPairData(records, loaded.tokenizer, _max_length(loaded, data), loaded.label_names)

    def text_example(
        self, loaded: LoadedModel, data: DataConfig, text: str, text_pair: str | None, label: str
    ) -> TextPairData:
        """One premise (and hypothesis) given on the command line, its label checked like a file's."""
        if data.text_pair_column is not None and text_pair is None:
            raise ConfigError(
                "give --hypothesis with --premise (or set data.text_pair_column to none for single texts)"
            )
        row = {"premise": text, "hypothesis": text_pair, "label": label, "id": "text-0"}
        config = TextDataConfig(
            path="<command line>",
            hypothesis_column=None if text_pair is None else "hypothesis",
            label_names=loaded.label_names,
            label_map=loaded.label_map,
        )
        records = records_from_rows([(1, row)], config.columns, "--premise/--hypothesis/--label")
        return TextPairData(records, loaded.tokenizer, _max_length(loaded, data), loaded.label_names)

    def describe(self, data: TextPairData, index: int) -> dict[str, Any]:
        """An NLI example as id, premise, hypothesis and label."""
        record = data.records[index]
        return {"id": record.id, "premise": record.text, "hypothesis": record.text_pair, "label": record.label_name}


RECIPE = NLIRecipe()
