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
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.func import functional_call, vmap

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


def tied_aliases(model: nn.Module) -> dict[str, str]:
    """Each later name of a parameter the model holds under several names, mapped to its first name (what
    ``named_parameters`` keeps): e.g. ``{"lm_head.weight": "transformer.wte.weight"}`` for GPT-2's tied LM head.

    Adapters treat each name as one use of the tied tensor: selecting one name differentiates that use alone (the
    other held at its value, as for an untied model); selecting both, or every parameter, the shared tensor.
    """
    first: dict[int, str] = {}
    aliases = {}
    for name, parameter in model.named_parameters(remove_duplicate=False):
        if id(parameter) in first:
            aliases[name] = first[id(parameter)]
        else:
            first[id(parameter)] = name
    return aliases


def use_eager_attention(model: nn.Module) -> None:
    """Switch every HuggingFace (sub)model inside ``model`` to eager attention, in place.

    Double backward (the Hessian) is not implemented for the SDPA/flash attention kernels on CPU.
    """
    for module in model.modules():
        current = getattr(getattr(module, "config", None), "_attn_implementation", "eager")
        if hasattr(module, "set_attn_implementation") and current != "eager":
            module.set_attn_implementation("eager")


class ModelAdapter(ABC):
    """Functional view of a model: per-example loss of a flat parameter vector, plus features for kNN.

    The model is put in eval mode (no dropout), so losses are deterministic functions of θ, and HuggingFace
    (sub)models are switched to eager attention (second-order autodiff fails under SDPA/flash kernels on CPU).
    ``unsupported`` collects the torch.func transforms (``"vmap"``, ``"jvp"``) found not to work on this model, so
    the gradient stage takes its fallback path at once (see :mod:`fastif.grads`).
    """

    def __init__(self, model: nn.Module, config: AdapterConfig | None = None) -> None:
        use_eager_attention(model)
        self.model = model.eval()
        self.unsupported: set[str] = set()
        self.config = config or AdapterConfig()
        if not 0 <= self.config.l2 < math.inf:
            raise ModelError(f"l2 must be >= 0 and finite, got {self.config.l2}")
        named = dict(model.named_parameters(remove_duplicate=False))
        if not named:
            raise ModelError("the model has no parameters to take influence over")
        aliases = tied_aliases(model)
        chosen = self.config.selection.select(list(named))
        self.names = [name for name in chosen if aliases.get(name) not in chosen]
        self.shared = {alias: name for alias, name in aliases.items() if alias in chosen and name in chosen}
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
        named = dict(self.model.named_parameters(remove_duplicate=False))
        return self.space.flatten({name: named[name].detach() for name in self.names}).clone()

    def load_flat_params(self, flat: Tensor) -> None:
        """Write a flat vector back into the model's selected parameters (e.g. after an SGD step)."""
        named = dict(self.model.named_parameters(remove_duplicate=False))
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
        """Run the model with the selected parameters replaced by ``params`` (others as they are). A tied tensor
        replaced under one of its names changes that use alone; under both (see :func:`tied_aliases`), every use."""
        shared = {alias: params[name] for alias, name in self.shared.items() if name in params}
        return functional_call(self.model, {**params, **shared}, args, kwargs, tie_weights=False)

    def check_batch(self, batch: Batch) -> None:
        """Refuse a batch with non-finite floating inputs; subclasses add model-specific checks (label range)."""
        for tensor in batch_tensors(batch):
            if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                raise DataError("the batch contains NaN or Inf values; clean or impute the inputs first")

    def locate_nonfinite(self, flat: Tensor, batch: Batch) -> str:
        """Where NaN/Inf first appears when ``batch`` runs at ``flat``: a module's output (forward hooks, in execution
        order), the loss, or else the backward pass. A diagnostic re-run for error messages, not for the fast path."""
        batch = self.to_device(batch)
        first: list[str] = []

        def record(name: str) -> Callable[..., None]:
            def hook(module: nn.Module, _args: Any, output: Any) -> None:
                if not first and any(
                    t.is_floating_point() and not bool(t.isfinite().all()) for t in batch_tensors(output)
                ):
                    first.append(
                        f"module {name!r} ({type(module).__name__})" if name else "the model's top-level forward"
                    )

            return hook

        handles = [module.register_forward_hook(record(name)) for name, module in self.model.named_modules()]
        try:
            with torch.no_grad():
                losses = self._loss(self.space.unflatten(flat), batch)
        finally:
            for handle in handles:
                handle.remove()
        if first:
            return f"NaN/Inf first appears in the output of {first[0]}; check that module's inputs and weights"
        if not bool(losses.isfinite().all()):
            return "the model's outputs are finite but the loss is NaN/Inf; check the loss function (e.g. log of zero)"
        return "the forward pass and the loss are finite, so NaN/Inf arises in the backward pass (e.g. sqrt at zero)"

    @abstractmethod
    def _loss(self, params: dict[str, Tensor], batch: Batch) -> Tensor:
        """Per-example loss [B] with the selected parameters set to ``params``."""

    def _outputs(self, params: dict[str, Tensor], batch: Batch) -> Any:
        """The model's outputs (e.g. logits) with the selected parameters set to ``params``: what a Gauss-Newton
        Hessian or a measurement other than the loss needs. Adapters that can separate them override this."""
        raise ModelError(
            f"{type(self).__name__} gives no model outputs apart from its loss (needed by the Gauss-Newton Hessian "
            "and by measurements); implement _outputs and loss_from_outputs, or use TorchAdapter/HFClassifierAdapter"
        )

    def loss_from_outputs(self, outputs: Any, batch: Batch) -> Tensor:
        """The per-example loss [B] of ``outputs`` on ``batch`` (so ``_loss = loss_from_outputs ∘ _outputs``)."""
        raise ModelError(f"{type(self).__name__} gives no loss of outputs; implement loss_from_outputs")

    def outputs(self, flat: Tensor, batch: Batch) -> Any:
        """The model's outputs at the flat parameters ``flat``."""
        return self._outputs(self.space.unflatten(flat), batch)

    def raw_batch(self, batch: Batch) -> Batch:
        """The batch as the user's dataset gave it (adapters that add cached inputs strip them here)."""
        return batch

    @property
    def has_outputs(self) -> bool:
        """Whether this adapter separates the model's outputs from its loss (see :meth:`_outputs`)."""
        return type(self)._outputs is not ModelAdapter._outputs

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

    def _outputs(self, params: dict[str, Tensor], batch: Batch) -> Any:
        inputs, _ = _split_pair(batch)
        args = tuple(inputs) if isinstance(inputs, tuple | list) else (inputs,)
        return self.functional_call(params, args, {})

    def loss_from_outputs(self, outputs: Any, batch: Batch) -> Tensor:
        return self.loss_fn(outputs, _split_pair(batch)[1])

    def _loss(self, params: dict[str, Tensor], batch: Batch) -> Tensor:
        return self.loss_from_outputs(self._outputs(params, batch), batch)

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


def attention_bias(mask: Tensor, dtype: torch.dtype, causal: bool, window: int | None = None) -> Tensor:
    """Turn a [B, T] 0/1 padding mask into the [B, 1, T, T] additive mask eager attention adds to its scores.

    0 where a query may attend a key, a large negative number elsewhere: ``finfo(dtype).min``, but never below
    float32's, so a row that blocks every key stays finite in the float32 softmax that Llama and ModernBERT run
    (float64's minimum casts to -inf there and turns padded positions, then gradients, into NaN). ``causal`` adds
    ``key <= query``; ``window`` a sliding window, ``query - key < window`` when causal and ``|query - key| <= window``
    otherwise (transformers' masking_utils rules). Tensor operations only, no data-dependent branches, so it works
    under ``torch.func.vmap``.
    """
    positions = torch.arange(mask.shape[-1], device=mask.device)
    offset = positions[:, None] - positions[None, :]
    allowed = mask[:, None, None, :].bool()
    if causal:
        allowed = allowed & (offset >= 0)
    if window is not None:
        allowed = allowed & ((offset < window) if causal else (offset.abs() <= window))
    blocked = max(torch.finfo(dtype).min, torch.finfo(torch.float32).min)
    return torch.where(allowed, torch.zeros((), dtype=dtype, device=mask.device), blocked)


HF_INPUT_KEYS = ("input_ids", "attention_mask", "token_type_ids")
HEAD_NAMES = ("classifier", "score", "logits_proj")
MaskMode = Literal["model", "built"]


def is_causal_model(model: nn.Module) -> bool:
    """True if the model's attention is causal (decoders such as GPT-2 or Llama): an attention module says so
    (``is_causal``, transformers 5) or the config is a decoder's."""
    flags = any(getattr(module, "is_causal", False) is True for module in model.modules())
    return flags or bool(getattr(model.config, "is_decoder", False))


def find_head(model: nn.Module, outputs: int) -> str:
    """Name of the classification head: a known name (``classifier``, ``score``, ``logits_proj``), else the last
    ``nn.Linear`` giving ``outputs`` values (one logit per class, or per choice)."""
    modules = dict(model.named_modules())
    for name in HEAD_NAMES:
        if name in modules:
            return name
    linears = [
        name for name, module in modules.items() if isinstance(module, nn.Linear) and module.out_features == outputs
    ]
    if not linears:
        raise ModelError(
            f"cannot find the classification head of {type(model).__name__} (no module named {', '.join(HEAD_NAMES)} "
            f"and no nn.Linear with {outputs} outputs); pass feature_module= (the module whose input is the feature)"
        )
    return linears[-1]


def _unsqueezed(batch: Batch) -> Batch:
    return map_tensors(lambda t: t.unsqueeze(0), batch)


class HFAdapter(ModelAdapter):
    """What every HuggingFace adapter shares: dict batches, and the model's own forward under ``torch.func.vmap``.

    transformers' mask construction fails under vmap (BERT-style encoders check the mask with Python branches), so
    a forward pre-hook on the base model swaps the 2-D mask for the 4-D additive mask(s) its attention needs: causal
    for decoders, per layer type for models mixing full and sliding-window layers (``mask_mode="built"``). Models
    that read the 2-D mask themselves (DeBERTa-v2 multiplies its embeddings by it) get it unchanged
    (``mask_mode="model"``). Subclasses call :meth:`_choose_mask_mode` once built: the first mode whose logits equal
    the model's own on a padded probe batch wins.
    """

    def __init__(self, model: nn.Module, config: AdapterConfig | None = None) -> None:
        super().__init__(model, config)
        self.causal = is_causal_model(model)
        self.mask_mode: MaskMode = "built"

    def _model_inputs(self, batch: Batch) -> dict[str, Tensor]:
        if not isinstance(batch, Mapping) or "input_ids" not in batch:
            raise DataError("HuggingFace batches must be dicts with 'input_ids', 'attention_mask' and 'labels'")
        inputs = {key: batch[key] for key in HF_INPUT_KEYS if key in batch}
        if "attention_mask" not in inputs:
            inputs["attention_mask"] = torch.ones_like(inputs["input_ids"])
        return inputs

    def _layer_masks(self, mask: Tensor) -> Tensor | dict[str, Tensor]:
        """The 4-D mask for a [B, T] padding mask; a dict by layer type for models mixing full and sliding layers."""
        config = self.model.config
        window = getattr(config, "sliding_window", None) if getattr(config, "use_sliding_window", True) else None
        if not getattr(config, "layer_types", None):  # one kind for every layer (Mistral: all sliding)
            return attention_bias(mask, self.dtype, self.causal, window)
        kinds = set(config.layer_types)
        if kinds == {"full_attention"}:
            return attention_bias(mask, self.dtype, self.causal)
        if not kinds <= {"full_attention", "sliding_attention"}:
            raise ModelError(f"{type(self).__name__} cannot build masks for the attention layer types {sorted(kinds)}")
        return {
            kind: attention_bias(
                mask, self.dtype, self.causal, None if kind == "full_attention" else config.sliding_window
            )
            for kind in kinds
        }

    def _swap_mask(self, _module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        mask = kwargs.get("attention_mask")
        if mask is None or mask.dim() != 2:
            return None
        return args, {**kwargs, "attention_mask": self._layer_masks(mask)}

    @contextmanager
    def _masks_for_mode(self) -> Iterator[None]:
        """In ``"built"`` mode, swap the base model's 2-D mask for the 4-D one(s) while the block runs."""
        if self.mask_mode != "built":
            yield
            return
        base = getattr(self.model, "base_model", self.model)
        handle = base.register_forward_pre_hook(self._swap_mask, with_kwargs=True)
        try:
            yield
        finally:
            handle.remove()

    def logits(self, params: dict[str, Tensor], batch: Batch) -> Tensor:
        """The model's logits with the selected parameters set to ``params``, masks as ``mask_mode`` says."""
        with self._masks_for_mode():
            return self.functional_call(params, (), self._model_inputs(batch)).logits

    def _outputs(self, params: dict[str, Tensor], batch: Batch) -> Tensor:
        return self.logits(params, batch)

    def _probe_batch(self) -> dict[str, Tensor]:
        """Two token rows, the second right-padded, for the mask check."""
        config, length = self.model.config, 6
        pad = getattr(config, "pad_token_id", None)
        tokens = [i for i in range(1, min(getattr(config, "vocab_size", 8), 8)) if i != pad][:3]
        ids = torch.tensor([tokens * 2, tokens + [0 if pad is None else pad] * 3], device=self.device)
        mask = torch.tensor([[1] * length, [1] * 3 + [0] * 3], device=self.device)
        return {"input_ids": ids, "attention_mask": mask}

    def _compared(self, logits: Tensor, probe: dict[str, Tensor]) -> Tensor:
        """The part of the probe's logits that must equal the model's own (all of it; an LM drops padded positions)."""
        return logits

    def _own_logits(self, probe: dict[str, Tensor]) -> Tensor:
        """The model's own logits on the probe, one row at a time, as :meth:`_compared` shapes them."""
        rows = [map_tensors(lambda t, i=i: t[i : i + 1], probe) for i in range(len(probe["input_ids"]))]
        return self._compared(torch.cat([self.model(**row).logits for row in rows]), probe)

    def _choose_mask_mode(self) -> MaskMode:
        """The first mask mode whose vmapped logits equal the model's own on the probe batch; ModelError if none."""
        probe = self._probe_batch()
        params = self.space.unflatten(self.flat_params())
        with torch.no_grad():
            expected = self._own_logits(probe)
        failures = []
        for mode in ("built", "model"):
            self.mask_mode = mode
            try:
                with torch.no_grad():
                    got = vmap(lambda example: self.logits(params, _unsqueezed(example)).squeeze(0))(probe)
            except (RuntimeError, ValueError) as error:
                failures.append(f"{mode} masks: {str(error).splitlines()[0][:120]}")
                continue
            gap = float((self._compared(got, probe) - expected).abs().max())
            if gap <= 100 * torch.finfo(self.dtype).eps * float(expected.abs().max()):  # rounding only
                return mode
            failures.append(f"{mode} masks: logits differ by {gap:.2g}")
        raise ModelError(
            f"{type(self).__name__} cannot reproduce {type(self.model).__name__}'s own forward under torch.func.vmap "
            f"({'; '.join(failures)}); wrap the model in a TorchAdapter with its own loss function instead"
        )


class HFClassifierAdapter(HFAdapter):
    """HuggingFace ``*ForSequenceClassification`` and ``*ForMultipleChoice`` models on dict batches with
    ``input_ids``, ``attention_mask`` (optional ``token_type_ids``) and ``labels``; loss = cross-entropy against
    ``labels`` (a class, or a choice: multiple-choice inputs are shaped [B, num_choices, T]).

    Masks follow :class:`HFAdapter`. Features are the input of ``feature_module`` (default: the head, found from
    the model), at the position the model classifies from ([CLS] for encoders, the last non-pad token for decoders).
    """

    def __init__(
        self, model: nn.Module, config: AdapterConfig | None = None, feature_module: str | None = None
    ) -> None:
        super().__init__(model, config)
        self.multiple_choice = type(model).__name__.endswith("ForMultipleChoice")
        self.feature_name = feature_module or find_head(model, 1 if self.multiple_choice else model.config.num_labels)
        modules = dict(model.named_modules())
        if self.feature_name not in modules:
            raise ModelError(f"feature_module {self.feature_name!r} is not a module of the model")
        self.feature_module = modules[self.feature_name]
        self.mask_mode = self._choose_mask_mode()

    def loss_from_outputs(self, outputs: Any, batch: Batch) -> Tensor:
        return torch.nn.functional.cross_entropy(outputs, batch["labels"], reduction="none")

    def _loss(self, params: dict[str, Tensor], batch: Batch) -> Tensor:
        return self.loss_from_outputs(self.logits(params, batch), batch)

    def _probe_batch(self) -> dict[str, Tensor]:
        """The two probe rows, as one 2-choice example for multiple choice."""
        probe = super()._probe_batch()
        return {key: value[None] for key, value in probe.items()} if self.multiple_choice else probe

    def check_batch(self, batch: Batch) -> None:
        super().check_batch(batch)
        inputs = self._model_inputs(batch)
        if "labels" not in batch:
            raise DataError("HuggingFace batches must be dicts with 'input_ids', 'attention_mask' and 'labels'")
        ids, labels = inputs["input_ids"], batch["labels"]
        if self.multiple_choice and ids.dim() != 3:
            raise DataError(f"multiple-choice input_ids must be shaped [B, num_choices, T], got {tuple(ids.shape)}")
        classes = ids.shape[1] if self.multiple_choice else self.model.config.num_labels
        kind = "choice" if self.multiple_choice else "class"
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= classes):
            raise DataError(f"labels must lie in [0, {classes - 1}] for this {classes}-{kind} model")
        if self.causal and self.model.config.pad_token_id is None and not bool(inputs["attention_mask"].all()):
            raise DataError(
                "this decoder classifies from its last position, padding included, because model.config.pad_token_id "
                "is None; set model.config.pad_token_id = tokenizer.pad_token_id"
            )

    def _pooled_positions(self, ids: Tensor) -> Tensor:
        """The position each row is classified from, as the decoder heads do: the last token that is not padding."""
        pad = self.model.config.pad_token_id
        positions = torch.arange(ids.shape[-1], device=ids.device)
        if pad is None:
            return torch.full(ids.shape[:1], ids.shape[-1] - 1, device=ids.device)
        return (positions * (ids != pad)).argmax(-1)

    @torch.no_grad()
    def features(self, batch: Batch) -> Tensor:
        inputs = self._model_inputs(batch)
        captured: list[Tensor] = []
        handle = self.feature_module.register_forward_hook(lambda _m, args, _out: captured.append(args[0]))
        try:
            with self._masks_for_mode():  # the adapter's masks: finite where a float64 sliding window gives NaN
                self.model(**inputs)
        finally:
            handle.remove()
        feature = captured[0]
        if feature.dim() == 3:
            ids = inputs["input_ids"].reshape(-1, inputs["input_ids"].shape[-1])
            position = self._pooled_positions(ids) if self.causal else torch.zeros_like(ids[:, 0])
            feature = feature[torch.arange(len(feature), device=feature.device), position]
        return feature.reshape(inputs["input_ids"].shape[0], -1)


class MeasuredAdapter(ModelAdapter):
    """``base`` with a measurement in place of the loss: ``measurement(outputs, batch) -> [B]`` (e.g. a margin or
    one class's logit; captum's ``test_loss_fn``, kronfluence's ``compute_measurement``). Influence takes the test
    side's gradient of it, while H stays the training objective's."""

    def __init__(self, base: ModelAdapter, measurement: Callable[[Any, Batch], Tensor]) -> None:
        super().__init__(base.model, base.config)
        if not base.has_outputs:
            base._outputs({}, ())  # raises the ModelError that names the fix
        self.base, self.measurement = base, measurement

    def _loss(self, params: dict[str, Tensor], batch: Batch) -> Tensor:
        return self.measurement(self.base._outputs(params, batch), self.base.raw_batch(batch))

    def check_batch(self, batch: Batch) -> None:
        self.base.check_batch(batch)
