"""The NLI/MiniLM recipe: bundled MNLI/HANS/ANLI data and label schemes (:mod:`.data`), the MiniLM training
recipe (:mod:`.model`), HANS/ANLI task splits (:mod:`.splits`), and :data:`RECIPE` for the pipeline
(:mod:`.recipe`, registered as the ``nli`` entry point of ``fastif.recipes``)."""

from __future__ import annotations

from .data import (
    EMBEDDED_NAMES,
    MNLI_SPLIT_SIZES,
    MNLI_TRAIN_PAIRS,
    MNLI_VALIDATION_PAIRS,
    NLI2_LABEL_MAP,
    NLI2_LABELS,
    NLI3_LABELS,
    TextDataConfig,
    embedded_file,
    load_embedded,
    load_text_data,
    load_text_pair_data,
    nli_label_scheme,
    seeded_split,
)
from .model import (
    MINILM_HUB_NAME,
    NLI_DAMPING,
    RECIPE_VERSION,
    NLITrainConfig,
    TrainedModel,
    default_cache_dir,
    length_bucketed_batches,
    load_minilm_classifier,
    load_minilm_tokenizer,
    load_trained,
    minilm_path,
    recipe_fingerprint,
    train_nli_classifier,
)
from .recipe import RECIPE, NLIRecipe

__all__ = [
    "EMBEDDED_NAMES",
    "MINILM_HUB_NAME",
    "MNLI_SPLIT_SIZES",
    "MNLI_TRAIN_PAIRS",
    "MNLI_VALIDATION_PAIRS",
    "NLI2_LABELS",
    "NLI2_LABEL_MAP",
    "NLI3_LABELS",
    "NLI_DAMPING",
    "RECIPE",
    "RECIPE_VERSION",
    "NLIRecipe",
    "NLITrainConfig",
    "TextDataConfig",
    "TrainedModel",
    "default_cache_dir",
    "embedded_file",
    "length_bucketed_batches",
    "load_embedded",
    "load_minilm_classifier",
    "load_minilm_tokenizer",
    "load_text_data",
    "load_text_pair_data",
    "load_trained",
    "minilm_path",
    "nli_label_scheme",
    "recipe_fingerprint",
    "seeded_split",
    "train_nli_classifier",
]
