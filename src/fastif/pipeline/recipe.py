"""The recipe protocol: what the generic pipeline needs from a domain (a model family and its data).

A recipe loads the model and its tokenizer, loads the training and test sets, turns a text given on the command
line into a one-example dataset, and names the columns an example is displayed with. Recipes are found by name
through the ``fastif.recipes`` entry point group, so the pipeline never imports one::

    [project.entry-points."fastif.recipes"]
    nli = "fastif.recipes.nli:RECIPE"

A name of the form ``module:attribute`` loads that object directly (for recipes outside an installed package).
"""

from __future__ import annotations

import functools
import importlib
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from typing import TYPE_CHECKING, Any, Protocol

import torch
from torch import nn

from ..data import Dataset
from ..errors import ConfigError

if TYPE_CHECKING:
    from .config import DataConfig, ModelConfig

RECIPE_GROUP = "fastif.recipes"


@dataclass
class LoadedModel:
    """A classifier ready for influence: model (eval mode, on its device), tokenizer, label scheme, provenance.

    ``label_map`` folds raw labels of the data into the model's label names; ``l2`` is the L2 term the model was
    trained with (``None``: unknown, so influence uses ``parameters.l2`` or 0); ``options`` are the recipe's
    training options when the recipe trained it.
    """

    model: nn.Module
    tokenizer: Any
    label_names: tuple[str, ...]
    label_map: tuple[tuple[str, str], ...] = ()
    l2: float | None = None
    options: Any = None
    info: dict[str, Any] = field(default_factory=dict)


class Recipe(Protocol):
    """A domain the pipeline can explain: how to load its model and data, and how to show an example.

    ``damping`` is the recipe's default damping of ``H + damping·I`` (each recipe says why in its docstring).
    """

    name: str
    damping: float

    def options(self, value: Any) -> Any:
        """The recipe's typed training options from ``None`` (defaults), a dict (a config table) or an instance."""
        ...

    def load_plan(self, model: ModelConfig) -> str | None:
        """One "plan:" line when loading ``model`` takes long (e.g. training it first), else None."""
        ...

    def load_model(self, model: ModelConfig, data: DataConfig, device: torch.device, progress: bool) -> LoadedModel:
        """The model ``model.model`` names (``"embedded"``: the recipe's own, trained once and cached)."""
        ...

    def untrained_model(self, model: ModelConfig, seed: int, device: torch.device) -> LoadedModel:
        """The recipe's model with a freshly initialised head (timings do not depend on the weights)."""
        ...

    def load_data(self, role: str, loaded: LoadedModel, data: DataConfig) -> Dataset:
        """The ``"train"`` or ``"test"`` set of ``data``, tokenised and labelled for ``loaded``."""
        ...

    def text_example(
        self, loaded: LoadedModel, data: DataConfig, text: str, text_pair: str | None, label: str
    ) -> Dataset:
        """A one-example dataset from text given on the command line, its label checked like a file's."""
        ...

    def describe(self, data: Dataset, index: int) -> dict[str, Any]:
        """Display columns of example ``index`` (e.g. id, texts, label), in the order results show them."""
        ...


@functools.cache
def find_recipe(name: str) -> Recipe:
    """The recipe registered under ``name`` in the ``fastif.recipes`` entry points, or ``module:attribute``."""
    if ":" in name:
        module, _, attribute = name.partition(":")
        try:
            return getattr(importlib.import_module(module), attribute)
        except (ImportError, AttributeError) as error:
            raise ConfigError(f"cannot load recipe {name!r} ({error}); give an importable module:attribute") from None
    found = entry_points(group=RECIPE_GROUP).select(name=name)
    if not found:
        known = sorted(entry.name for entry in entry_points(group=RECIPE_GROUP))
        raise ConfigError(
            f"no recipe {name!r} among the installed ones {known}; install the package that provides it "
            "(for fastif's own: pip install -e '.[nli]'), or give module:attribute"
        )
    return next(iter(found)).load()
