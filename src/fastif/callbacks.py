"""A HuggingFace ``transformers.TrainerCallback`` that builds the gradient store when training ends, or at steps.

    >>> from fastif.callbacks import GradientStoreCallback
    >>> callback = GradientStoreCallback(lambda model: HFClassifierAdapter(model, config), train, "store")
    >>> Trainer(model, args, train_dataset=hf_train, callbacks=[callback]).train()
    >>> influence = Influence(HFClassifierAdapter(model, config), train).build_gradient_store("store")  # reuses it

The store is built by :meth:`fastif.influence.Influence.build_gradient_store` (frozen path by ``frozen``, as the
facade does), so reopening it with an Influence of the same adapter, data and frozen mode reuses every shard.
Needs the ``trainer`` extra (transformers + accelerate, which the HF Trainer requires). transformers is imported
only when :class:`GradientStoreCallback` is first looked up, so ``import fastif`` (and this module) works without
it. Only the main process (``state.is_world_process_zero``) builds.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from functools import cache
from pathlib import Path
from typing import Any

from torch import nn

from .errors import ConfigError
from .gradient_store import BuildReport, GradientStoreConfig
from .influence import Influence
from .model.adapter import ModelAdapter
from .model.frozen import FrozenMode

AdapterSource = ModelAdapter | Callable[[nn.Module], ModelAdapter]


def step_folder(folder: str | os.PathLike[str], step: int) -> Path:
    """Where the store of training step ``step`` goes: ``<folder>/step-<step>``."""
    return Path(folder) / f"step-{step}"


def _steps(at: str | Sequence[int]) -> tuple[int, ...] | None:
    """``None`` for ``at="end"``, else the positive step numbers; ConfigError for anything else."""
    if at == "end":
        return None
    if isinstance(at, str) or not isinstance(at, Sequence) or not at:
        raise ConfigError(f"at must be 'end' or a non-empty list of training steps, got {at!r}")
    if any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in at):
        raise ConfigError(f"at must list positive whole training steps (state.global_step), got {list(at)!r}")
    return tuple(sorted(set(at)))


class _StoreBuilder:
    """What the callback does, without transformers: build the store of the model's current parameters."""

    def __init__(
        self,
        adapter: AdapterSource,
        train_dataset: Any,
        folder: str | os.PathLike[str],
        config: GradientStoreConfig | None = None,
        at: str | Sequence[int] = "end",
        frozen: FrozenMode = "auto",
        **build_options: Any,
    ) -> None:
        self.adapter, self.train_dataset, self.folder = adapter, train_dataset, Path(folder)
        self.config = config or GradientStoreConfig()
        self.steps = _steps(at)
        self.frozen, self.build_options = frozen, build_options
        self.reports: dict[int | str, BuildReport] = {}

    def _adapter_for(self, model: nn.Module) -> ModelAdapter:
        """The adapter over the trained ``model``: the factory's, or the given one if it wraps that model."""
        if not isinstance(self.adapter, ModelAdapter):
            return self.adapter(model)
        if self.adapter.model is not model:
            raise ConfigError(
                "the adapter given to GradientStoreCallback wraps another model than the Trainer's; build it on "
                "the model you pass to Trainer, or pass a factory (lambda model: HFClassifierAdapter(model, ...))"
            )
        return self.adapter

    def build(self, model: nn.Module, folder: Path, key: int | str) -> BuildReport:
        """Build (or resume) the store of ``model``'s current parameters in ``folder``; training mode is restored."""
        training = model.training
        try:
            influence = Influence(self._adapter_for(model), self.train_dataset, frozen=self.frozen)
            report = influence.build_gradient_store(folder, self.config, **self.build_options)
        finally:
            model.train(training)
        self.reports[key] = report
        return report

    def step_end(self, state: Any, model: nn.Module | None) -> None:
        """At a chosen step, build that step's store (main process only)."""
        if self.steps is not None and state.global_step in self.steps and state.is_world_process_zero:
            self.build(_model(model), step_folder(self.folder, state.global_step), state.global_step)

    def train_end(self, state: Any, model: nn.Module | None) -> None:
        """With ``at="end"``, build the final model's store (main process only)."""
        if self.steps is None and state.is_world_process_zero:
            self.build(_model(model), self.folder, "end")


def _model(model: nn.Module | None) -> nn.Module:
    if model is None:
        raise ConfigError("the Trainer passed no model to GradientStoreCallback; use it with transformers.Trainer")
    return model


@cache
def _callback_class() -> type:
    """GradientStoreCallback, subclassing transformers' TrainerCallback (imported here, on first use)."""
    from transformers import TrainerCallback

    class GradientStoreCallback(_StoreBuilder, TrainerCallback):
        """Builds the gradient store of ``train_dataset`` (a fastif dataset of the Trainer's examples) in
        ``folder`` when training ends (``at="end"``), or at the listed steps, one ``step-<n>`` subfolder each.

        ``adapter`` is a ModelAdapter over the Trainer's model, or a factory ``model -> adapter``; ``config`` the
        store's projection/dtype/shards; ``frozen`` the facade's frozen-path mode; ``build_options`` go to
        :func:`~fastif.gradient_store.build_store` (batch_size, chunk_size, on_shard). ``reports`` maps each step
        (or ``"end"``) to its BuildReport.
        """

        def on_step_end(self, args: Any, state: Any, control: Any, model: nn.Module | None = None, **kwargs: Any):
            self.step_end(state, model)

        def on_train_end(self, args: Any, state: Any, control: Any, model: nn.Module | None = None, **kwargs: Any):
            self.train_end(state, model)

    GradientStoreCallback.__module__ = __name__
    return GradientStoreCallback


def __getattr__(name: str) -> Any:
    """Module attribute ``GradientStoreCallback``, made (importing transformers) on first access."""
    if name == "GradientStoreCallback":
        return _callback_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
