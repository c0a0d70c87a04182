"""Model adapter stage: per-example losses, features, and which parameters influence is taken over.

An adapter turns ``(model, batch)`` into a functional per-example loss ``loss(θ, batch) -> [B]`` of a *flat*
parameter vector θ that holds only the selected parameters (everything else stays frozen at its current value).
Every later stage (gradients, HVPs, solvers, scores) works on flat vectors of length ``adapter.num_params``.

The training objective is ``mean_i loss_i(θ) + (l2 / 2)·‖m ⊙ θ‖²``, where the mask m drops the parameters that
match ``l2_exclude`` (FastIF: biases and LayerNorm weights). The L2 term enters the objective, its gradient and
the Hessian, but not the per-example loss gradients that influence scores use (see DEVELOPERS.md).
"""

from __future__ import annotations

import fnmatch
import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call

from ..data import Batch, batch_len, batch_tensors, map_tensors
from ..errors import DataError, ModelError


def _matches(name: str, pattern: str) -> bool:
    """True if ``pattern`` is the parameter's name, a module prefix of it, or an fnmatch glob for it."""
    return name == pattern or name.startswith(pattern + ".") or fnmatch.fnmatchcase(name, pattern)


@dataclass(frozen=True)
class ParameterSelection:
    """Which parameters influence is taken over: names, module prefixes or globs; empty ``include`` = all.

    Example (FastIF's choice for BERT): ``include=("bert.encoder.layer.10", "bert.encoder.layer.11",
    "bert.pooler", "classifier")``.
    """

    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()

    def select(self, names: list[str]) -> list[str]:
        """The selected names, in model order; raises ModelError if a pattern or the whole selection matches nothing."""
        for pattern in (*self.include, *self.exclude):
            if not any(_matches(name, pattern) for name in names):
                raise ModelError(
                    f"parameter pattern {pattern!r} matches no parameter; names look like {names[:3]} "
                    "(use a module prefix such as 'encoder.layer.5', or a glob such as '*.bias')"
                )
        chosen = [
            name
            for name in names
            if (not self.include or any(_matches(name, p) for p in self.include))
            and not any(_matches(name, p) for p in self.exclude)
        ]
        if not chosen:
            raise ModelError("the parameter selection is empty: include/exclude leave no parameter to differentiate")
        return chosen


@dataclass(frozen=True)
class AdapterConfig:
    """Adapter settings shared by every model type: the parameter selection and the objective's L2 term."""

    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    l2: float = 0.0
    l2_exclude: tuple[str, ...] = ()

    @property
    def selection(self) -> ParameterSelection:
        return ParameterSelection(self.include, self.exclude)


class ParameterSpace:
    """Maps between a flat vector and the named tensors of the selected parameters."""

    def __init__(self, named: Mapping[str, Tensor]) -> None:
        self.names = list(named)
        self.shapes = [tuple(t.shape) for t in named.values()]
        self.numels = [math.prod(shape) for shape in self.shapes]
        self.size = sum(self.numels)

    def flatten(self, named: Mapping[str, Tensor]) -> Tensor:
        """Concatenate the named tensors into one flat vector (model order)."""
        return torch.cat([named[name].reshape(-1) for name in self.names])

    def unflatten(self, flat: Tensor) -> dict[str, Tensor]:
        """Views of ``flat`` shaped like the selected parameters (works under torch.func transforms)."""
        pieces = torch.split(flat, self.numels)
        return {name: piece.view(shape) for name, piece, shape in zip(self.names, pieces, self.shapes, strict=True)}

    def mask(self, patterns: tuple[str, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
        """A flat 0/1 vector that is 0 on parameters matching any of ``patterns``."""
        parts = [
            torch.full((numel,), 0.0 if any(_matches(name, p) for p in patterns) else 1.0, dtype=dtype, device=device)
            for name, numel in zip(self.names, self.numels, strict=True)
        ]
        return torch.cat(parts)


class ModelAdapter(ABC):
    """Functional view of a model: per-example loss of a flat parameter vector, plus features for kNN.

    The model is put in eval mode (no dropout), so losses are deterministic functions of θ.
    """

    def __init__(self, model: nn.Module, config: AdapterConfig | None = None) -> None:
        self.model = model.eval()
        self.config = config or AdapterConfig()
        if self.config.l2 < 0:
            raise ModelError(f"l2 must be >= 0, got {self.config.l2}")
        named = dict(model.named_parameters())
        if not named:
            raise ModelError("the model has no parameters to take influence over")
        self.names = self.config.selection.select(list(named))
        self.space = ParameterSpace({name: named[name] for name in self.names})
        reference = named[self.names[0]]
        self.dtype, self.device = reference.dtype, reference.device
        self.l2_mask = self.space.mask(self.config.l2_exclude, self.dtype, self.device)

    @property
    def num_params(self) -> int:
        """Length of the flat parameter vector."""
        return self.space.size

    def flat_params(self) -> Tensor:
        """A detached copy of the selected parameters' current values, as one flat vector."""
        named = dict(self.model.named_parameters())
        return self.space.flatten({name: named[name].detach() for name in self.names}).clone()

    def load_flat_params(self, flat: Tensor) -> None:
        """Write a flat vector back into the model's selected parameters (e.g. after an SGD step)."""
        named = dict(self.model.named_parameters())
        with torch.no_grad():
            for name, value in self.space.unflatten(flat).items():
                named[name].copy_(value)

    def to_device(self, batch: Batch) -> Batch:
        """Move a batch to the model's device; floating tensors also take the model's dtype."""
        return map_tensors(
            lambda t: t.to(self.device, self.dtype if t.is_floating_point() else t.dtype),
            batch,
        )

    def per_example_loss(self, flat: Tensor, batch: Batch) -> Tensor:
        """Loss of every example in ``batch`` at parameters ``flat``: a tensor of shape [B]."""
        try:
            losses = self._loss(self.space.unflatten(flat), batch)
        except (RuntimeError, IndexError, TypeError) as error:
            if "vmap" in str(error) or "functorch" in str(error):
                raise
            raise DataError(
                f"the model failed on this batch ({str(error).splitlines()[0]}); check that the batch's shapes, "
                "dtypes and label range match what the model expects"
            ) from error
        size = batch_len(batch)
        if losses.dim() != 1 or losses.shape[0] != size:
            raise ModelError(
                f"the loss must give one value per example (shape [{size}]), got shape {tuple(losses.shape)}; "
                "use reduction='none'"
            )
        return losses

    def regulariser(self, flat: Tensor) -> Tensor:
        """The objective's L2 term (l2 / 2)·‖m ⊙ θ‖²."""
        return 0.5 * self.config.l2 * torch.sum(self.l2_mask * flat * flat)

    def objective(self, flat: Tensor, batch: Batch) -> Tensor:
        """Training objective on a batch: mean per-example loss plus the L2 term."""
        return self.per_example_loss(flat, batch).mean() + self.regulariser(flat)

    def functional_call(self, params: dict[str, Tensor], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """Run the model with the selected parameters replaced by ``params`` (others as they are)."""
        return functional_call(self.model, params, args, kwargs)

    def check_batch(self, batch: Batch) -> None:
        """Refuse a batch with non-finite floating inputs; subclasses add model-specific checks (label range)."""
        for tensor in batch_tensors(batch):
            if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                raise DataError("the batch contains NaN or Inf values; clean or impute the inputs first")

    @abstractmethod
    def _loss(self, params: dict[str, Tensor], batch: Batch) -> Tensor:
        """Per-example loss [B] with the selected parameters set to ``params``."""

    def features(self, batch: Batch) -> Tensor:
        """Feature vectors [B, d] used for kNN candidate search (no gradients)."""
        raise ModelError(f"{type(self).__name__} has no feature function; pass feature_fn= to the adapter")


def _split_pair(batch: Batch) -> tuple[Any, Tensor]:
    """Unpack a ``(inputs, targets)`` batch with a clear error for anything else."""
    if not isinstance(batch, tuple | list) or len(batch) != 2:
        raise DataError("TorchAdapter batches must be (inputs, targets) pairs, e.g. TensorData((X, y))")
    return batch[0], batch[1]


class TorchAdapter(ModelAdapter):
    """Any ``nn.Module`` on ``(inputs, targets)`` batches with a per-example loss ``loss_fn(outputs, targets)``.

    ``loss_fn`` must not reduce (e.g. ``nn.CrossEntropyLoss(reduction="none")``). ``feature_fn(model, inputs)``
    optionally gives kNN features; by default the flattened inputs are used.
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: Callable[[Tensor, Tensor], Tensor],
        config: AdapterConfig | None = None,
        feature_fn: Callable[[nn.Module, Any], Tensor] | None = None,
    ) -> None:
        super().__init__(model, config)
        self.loss_fn = loss_fn
        self.feature_fn = feature_fn

    def _loss(self, params: dict[str, Tensor], batch: Batch) -> Tensor:
        inputs, targets = _split_pair(batch)
        args = tuple(inputs) if isinstance(inputs, tuple | list) else (inputs,)
        return self.loss_fn(self.functional_call(params, args, {}), targets)

    @torch.no_grad()
    def features(self, batch: Batch) -> Tensor:
        inputs, _ = _split_pair(batch)
        if self.feature_fn is not None:
            return self.feature_fn(self.model, inputs)
        if not isinstance(inputs, Tensor):
            raise ModelError("default features need tensor inputs; pass feature_fn= for structured inputs")
        return inputs.reshape(inputs.shape[0], -1).to(self.dtype)


def additive_attention_mask(mask: Tensor, dtype: torch.dtype) -> Tensor:
    """Turn a [B, T] 0/1 padding mask into the [B, 1, 1, T] additive float mask BERT-style models accept.

    The 4-D float form bypasses transformers' mask construction, whose data-dependent branches break vmap.
    """
    return (1.0 - mask[:, None, None, :].to(dtype)) * torch.finfo(dtype).min


HF_INPUT_KEYS = ("input_ids", "attention_mask", "token_type_ids")


class HFClassifierAdapter(ModelAdapter):
    """HuggingFace ``*ForSequenceClassification`` models on dict batches with ``input_ids``, ``attention_mask``
    (optional ``token_type_ids``) and ``labels``; loss = cross-entropy against ``labels``.

    Switches attention to the eager implementation (second-order autodiff fails under SDPA on CPU) and feeds a
    4-D additive float mask (so ``torch.func.vmap`` works). Features are the classifier's input (for BERT: the
    pooled [CLS] vector), captured with a forward hook on ``feature_module`` (default ``"classifier"``).
    """

    def __init__(
        self, model: nn.Module, config: AdapterConfig | None = None, feature_module: str = "classifier"
    ) -> None:
        if hasattr(model, "set_attn_implementation"):
            model.set_attn_implementation("eager")
        super().__init__(model, config)
        modules = dict(model.named_modules())
        if feature_module not in modules:
            raise ModelError(f"feature_module {feature_module!r} is not a module of the model")
        self.feature_module = modules[feature_module]

    def _model_inputs(self, batch: Batch) -> dict[str, Tensor]:
        if not isinstance(batch, Mapping) or "input_ids" not in batch or "labels" not in batch:
            raise DataError("HuggingFace batches must be dicts with 'input_ids', 'attention_mask' and 'labels'")
        inputs = {key: batch[key] for key in HF_INPUT_KEYS if key in batch}
        if "attention_mask" in inputs:
            inputs["attention_mask"] = additive_attention_mask(inputs["attention_mask"], self.dtype)
        return inputs

    def logits(self, params: dict[str, Tensor], batch: Batch) -> Tensor:
        """Classifier logits [B, C] with the selected parameters set to ``params``."""
        return self.functional_call(params, (), self._model_inputs(batch)).logits

    def _loss(self, params: dict[str, Tensor], batch: Batch) -> Tensor:
        return torch.nn.functional.cross_entropy(self.logits(params, batch), batch["labels"], reduction="none")

    def check_batch(self, batch: Batch) -> None:
        super().check_batch(batch)
        self._model_inputs(batch)
        labels, classes = batch["labels"], self.model.config.num_labels
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= classes):
            raise DataError(f"labels must lie in [0, {classes - 1}] for this {classes}-class model")

    @torch.no_grad()
    def features(self, batch: Batch) -> Tensor:
        captured: list[Tensor] = []
        handle = self.feature_module.register_forward_hook(lambda _m, args, _out: captured.append(args[0]))
        try:
            self.model(**self._model_inputs(batch))
        finally:
            handle.remove()
        feature = captured[0]
        return feature[:, 0] if feature.dim() == 3 else feature
