"""Frozen-bottom path: compute the constant bottom of a model once, then run every influence step on the top alone.

Influence is taken over the selected parameters θ only. If the lowest module holding a selected parameter is
layer ``first`` of the model's layer stack and nothing below it (the embeddings, layers ``0 … first-1``) is
selected, the hidden states entering layer ``first`` do not depend on θ: they are computed once per example by one
no-grad forward pass (:func:`encode_prefix`, shortest example first) and cached. Every later gradient, HVP, JVP and
score runs the model's *own* forward with that cached tensor injected at the bottom (a forward hook on the module
whose output enters the layer stack) and the layers below ``first`` replaced by pass-throughs, so masks, pooling and
heads are the model's own and the numbers equal the full model's (tested to float64 rounding). The same pass
yields the kNN features (the input of the adapter's feature module) and the logits: one pass, not two.

Cost: the cache holds ``length × hidden_size`` values per example (``hidden_size`` values when the head reads only
the first token, e.g. BERT's pooler with no trainable encoder layer), at the model's dtype: for MiniLM (384-d,
fp32) 1,536 bytes per token, about 60 kB for a 40-token pair, or 1.5 kB with only pooler + classifier selected.
Past ``budget_bytes`` the cache is a numpy memmap on disk instead of RAM.

Architectures register a :class:`Splitter` by subclassing (``class MySplitter(Splitter, model_types=("x",))``).
"""

from __future__ import annotations

import contextlib
import functools
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
import torch
from torch import Tensor, nn

from .. import progress
from ..data import Batch, Dataset, index_chunks, length_order
from ..data.views import Subset
from ..errors import DataError, ModelError
from .adapter import ModelAdapter

FrozenMode = Literal["auto", "on", "off"]
DEFAULT_BUDGET_BYTES = 2 * 1024**3


class Splitter:
    """Where an architecture keeps its layer stack, relative to ``model.base_model``.

    ``entry``: the module whose output enters layer 0; ``layers``: the ``nn.ModuleList`` of layers; ``bottom``:
    modules that run before the stack (a selected parameter there disables the split); ``first_token_head``: the
    head reads only position 0 of the last layer's output (so, with no trainable layer, only that is cached).
    ``first_token_layer(layer, hidden, mask)``, where given, computes a last layer's output at position 0 only
    ([B, 1, H]: its query and feed-forward for that position; keys and values for all): the same numbers as the
    full layer at that position, for about 1/T of its cost beyond the key/value projections.
    ``classifier_head(model, hidden)``, where given, is a ``*ForSequenceClassification`` model's own head on the
    last layer's output (pooler, dropout, classifier): with no trainable layer the frozen path calls it alone,
    not the whole forward with every layer passed through.
    """

    registry: ClassVar[dict[str, type[Splitter]]] = {}
    entry: ClassVar[str]
    layers: ClassVar[str]
    bottom: ClassVar[tuple[str, ...]]
    first_token_head: ClassVar[bool] = False
    first_token_layer: ClassVar[Callable[[nn.Module, Tensor, Tensor | None], Tensor] | None] = None
    classifier_head: ClassVar[Callable[[nn.Module, Tensor], Tensor] | None] = None

    def __init_subclass__(cls, model_types: tuple[str, ...] = (), **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        for model_type in model_types:
            Splitter.registry[model_type] = cls


def bert_first_token_layer(layer: nn.Module, hidden: Tensor, mask: Tensor | None) -> Tensor:
    """A BERT/RoBERTa layer (eval mode, eager attention) evaluated at position 0 only: [B, T, H] -> [B, 1, H]."""
    attention = layer.attention.self
    batch = hidden.shape[0]
    first = hidden[:, :1]

    def heads(projection: nn.Module, states: Tensor) -> Tensor:
        return projection(states).view(batch, states.shape[1], -1, attention.attention_head_size).transpose(1, 2)

    scores = heads(attention.query, first) @ heads(attention.key, hidden).transpose(2, 3) * attention.scaling
    if mask is not None:
        scores = scores + (mask[..., :1, :] if mask.dim() == 4 else mask)
    context = (scores.softmax(dim=-1) @ heads(attention.value, hidden)).transpose(1, 2).reshape(batch, 1, -1)
    attended = layer.attention.output(context, first)
    return layer.output(layer.intermediate(attended), attended)


def _bert_head(model: nn.Module, hidden: Tensor) -> Tensor:
    """BertForSequenceClassification's head: pooler ([CLS], dense, tanh), dropout, classifier."""
    return model.classifier(model.dropout(model.base_model.pooler(hidden)))


def _roberta_head(model: nn.Module, hidden: Tensor) -> Tensor:
    """RobertaForSequenceClassification's head (it reads [CLS] itself)."""
    return model.classifier(hidden)


def _distilbert_head(model: nn.Module, hidden: Tensor) -> Tensor:
    """DistilBertForSequenceClassification's head: [CLS], pre_classifier, ReLU, dropout, classifier."""
    return model.classifier(model.dropout(nn.functional.relu(model.pre_classifier(hidden[:, 0]))))


class BertSplitter(Splitter, model_types=("bert",)):
    """BERT: ``embeddings`` then ``encoder.layer``; the pooler reads [CLS]."""

    entry, layers, bottom, first_token_head = "embeddings", "encoder.layer", ("embeddings",), True
    first_token_layer = staticmethod(bert_first_token_layer)
    classifier_head = staticmethod(_bert_head)


class RobertaSplitter(BertSplitter, model_types=("roberta",)):
    """RoBERTa: BERT's stack; its classification head reads [CLS] (no pooler)."""

    classifier_head = staticmethod(_roberta_head)


class DistilBertSplitter(Splitter, model_types=("distilbert",)):
    """DistilBERT: ``embeddings`` then ``transformer.layer``; ``pre_classifier`` reads [CLS]."""

    entry, layers, bottom, first_token_head = "embeddings", "transformer.layer", ("embeddings",), True
    classifier_head = staticmethod(_distilbert_head)


class GPT2Splitter(Splitter, model_types=("gpt2",)):
    """GPT-2: token + position embeddings, ``drop``, then the blocks ``h`` (and ``ln_f``, the score head)."""

    entry, layers, bottom = "drop", "h", ("wte", "wpe", "drop")


class LlamaSplitter(Splitter, model_types=("llama", "mistral", "qwen2")):
    """Llama: ``embed_tokens`` then ``layers`` (rotary positions come from position ids); Mistral and Qwen2 share
    the layout (frozen = unfrozen: tests/test_frozen.py for classifiers, tests/test_causal_lm.py for LMs). For
    classifiers and causal LMs alike the stack is under ``model.base_model_prefix`` (``model``; GPT-2's
    ``transformer``)."""

    entry, layers, bottom = "embed_tokens", "layers", ("embed_tokens",)


@dataclass(frozen=True)
class Split:
    """A model cut below layer ``first`` of ``layers`` (full dotted names); ``first_token_only``: cache [CLS] only;
    ``last_layer``: computes the last layer at the first token only (see :class:`Splitter`), or None."""

    entry: str
    layers: str
    first: int
    num_layers: int
    first_token_only: bool
    last_layer: Callable[[nn.Module, Tensor, Tensor | None], Tensor] | None = None
    head: Callable[[nn.Module, Tensor], Tensor] | None = None


def _under(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def _no_split(mode: FrozenMode, reason: str) -> None:
    """``auto`` falls back silently; ``on`` says why the frozen path cannot run and what to do."""
    if mode == "on":
        raise ModelError(f"frozen='on' but {reason}; use frozen='auto' or 'off'")


def find_split(adapter: ModelAdapter, mode: FrozenMode = "auto") -> Split | None:
    """The split of ``adapter``'s model below its lowest selected layer, or None where the frozen path cannot help."""
    if mode not in ("auto", "on", "off"):
        raise ModelError(f"frozen must be 'auto', 'on' or 'off', got {mode!r}")
    if mode == "off" or isinstance(adapter, FrozenAdapter):  # a FrozenAdapter already runs on the cached bottom
        return None
    model = adapter.model
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    splitter = Splitter.registry.get(model_type or "")
    if splitter is None:
        _no_split(
            mode,
            f"no frozen-bottom splitter is registered for {type(model).__name__} (model_type "
            f"{model_type!r}); register one with class MySplitter(fastif.model.frozen.Splitter, model_types=(...))",
        )
        return None
    prefix = model.base_model_prefix
    full = {key: f"{prefix}.{path}" for key, path in (("entry", splitter.entry), ("layers", splitter.layers))}
    layers = model.get_submodule(full["layers"])
    below = [f"{prefix}.{path}" for path in splitter.bottom]
    if any(_under(name, path) for name in adapter.names for path in below):
        _no_split(mode, "a selected parameter lies in the embeddings, below every layer")
        return None
    selected_layers = [i for i in range(len(layers)) if any(_under(n, f"{full['layers']}.{i}") for n in adapter.names)]
    first = min(selected_layers, default=len(layers))
    if first == 0 and mode == "auto":
        return None
    first_token = splitter.first_token_head and first == len(layers)
    last_layer = splitter.first_token_layer if splitter.first_token_head and first < len(layers) else None
    classifier = type(model).__name__.endswith("ForSequenceClassification")
    head = splitter.classifier_head if first_token and classifier else None
    return Split(full["entry"], full["layers"], first, len(layers), first_token, last_layer, head)


class _PassThrough(nn.Module):
    """Stands in for a layer below the split: returns its hidden-state input as the real layer's output type."""

    def __init__(self, as_tuple: bool) -> None:
        super().__init__()
        self.as_tuple = as_tuple

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        hidden = args[0] if args else kwargs["hidden_states"]
        return (hidden,) if self.as_tuple else hidden


def _first_token_forward(
    compute: Callable[[nn.Module, Tensor, Tensor | None], Tensor],
    layer: nn.Module,
    hidden_states: Tensor,
    attention_mask: Tensor | None = None,
    *args: Any,
    **kwargs: Any,
) -> Any:
    """Stands in for the last layer's ``forward``: its output at position 0 only, as the layer's output type."""
    return compute(layer, hidden_states, attention_mask)


class _Head(nn.Module):
    """Runs a splitter's ``classifier_head`` on the model's own modules (parameter names ``model.<name>``)."""

    def __init__(self, model: nn.Module, head: Callable[[nn.Module, Tensor], Tensor]) -> None:
        super().__init__()
        self.model, self.head = model, head

    def forward(self, hidden: Tensor) -> Tensor:
        return self.head(self.model, hidden)


class FrozenAdapter(ModelAdapter):
    """``base`` on cached bottom activations: same model, selection, L2 mask and loss; batches are
    ``{"batch": base batch, "hidden": [B, T, H]}`` from :class:`ActivationData`."""

    def __init__(self, base: ModelAdapter, split: Split, layer_returns_tuple: bool = False) -> None:
        super().__init__(base.model, base.config)
        self.base, self.split = base, split
        self._entry = base.model.get_submodule(split.entry)
        self._layers = base.model.get_submodule(split.layers)
        self._pass = [_PassThrough(layer_returns_tuple) for _ in range(split.first)]
        self._head = None if split.head is None else _Head(base.model, split.head)

    @contextlib.contextmanager
    def _injected(self, hidden: Tensor) -> Iterator[None]:
        """Run the model with ``hidden`` entering layer ``first`` and the layers below it skipped."""
        originals = [self._layers[i] for i in range(self.split.first)]
        handle = self._entry.register_forward_hook(lambda _module, _args, _output: hidden)
        for i, stand_in in enumerate(self._pass):
            self._layers[i] = stand_in
        last = self._layers[len(self._layers) - 1]
        if self.split.last_layer is not None:
            last.forward = functools.partial(_first_token_forward, self.split.last_layer, last)
        try:
            yield
        finally:
            handle.remove()
            for i, layer in enumerate(originals):
                self._layers[i] = layer
            last.__dict__.pop("forward", None)

    def _loss(self, params: dict[str, Tensor], batch: Batch) -> Tensor:
        if self._head is not None:
            return self.base.loss_from_outputs(self._outputs(params, batch), batch["batch"])
        with self._injected(batch["hidden"]):
            return self.base._loss(params, batch["batch"])

    def _outputs(self, params: dict[str, Tensor], batch: Batch) -> Any:
        if self._head is not None:  # the model's own head on the cached [CLS] vector, no other module runs
            named = {f"model.{name}": value for name, value in params.items()}
            return torch.func.functional_call(self._head, named, (batch["hidden"],))
        with self._injected(batch["hidden"]):
            return self.base._outputs(params, batch["batch"])

    def loss_from_outputs(self, outputs: Any, batch: Batch) -> Tensor:
        return self.base.loss_from_outputs(outputs, batch["batch"])

    def raw_batch(self, batch: Batch) -> Batch:
        return batch["batch"]

    @property
    def has_outputs(self) -> bool:
        return self.base.has_outputs

    def check_batch(self, batch: Batch) -> None:
        self.base.check_batch(batch["batch"])

    @torch.no_grad()
    def features(self, batch: Batch) -> Tensor:
        with self._injected(batch["hidden"]):
            return self.base.features(batch["batch"])


class ActivationData:
    """A dataset's examples with their cached bottom activations; ``batch`` pads them like the base batch."""

    def __init__(
        self,
        base: Dataset,
        states: Tensor | np.ndarray,
        offsets: Sequence[int],
        sizes: Sequence[int],
        first_token_only: bool = False,
    ) -> None:
        self.base, self.states, self.first_token_only = base, states, first_token_only
        self.offsets, self.sizes = list(offsets), list(sizes)
        lengths = getattr(base, "lengths", None)
        self.lengths = list(self.sizes if lengths is None else lengths)  # so scores and HVPs batch similar lengths

    def __len__(self) -> int:
        return len(self.base)

    def fingerprint(self) -> str | None:
        """The base dataset's content fingerprint, where it has one (the activations follow from it and the model)."""
        method = getattr(self.base, "fingerprint", None)
        return str(method()) if callable(method) else None

    def subset(self, indices: Sequence[int]) -> ActivationData:
        """Examples ``indices`` (in that order) with their activations, sharing the storage (no copy)."""
        index = [int(i) for i in indices]
        if not index or min(index) < 0 or max(index) >= len(self):
            raise DataError(f"a subset needs indices in [0, {len(self) - 1}], got {index[:10]}")
        subset = getattr(self.base, "subset", None)
        base = subset(index) if callable(subset) else Subset(self.base, index)
        offsets, sizes = [self.offsets[i] for i in index], [self.sizes[i] for i in index]
        return ActivationData(base, self.states, offsets, sizes, self.first_token_only)

    def batch(self, indices: Sequence[int]) -> Batch:
        """The base batch of ``indices`` plus their activations, zero-padded to the base batch's width."""
        base = self.base.batch(indices)
        index = [int(i) for i in indices]
        sizes = np.asarray([self.sizes[i] for i in index], dtype=np.int64)
        mask = base.get("attention_mask") if isinstance(base, dict) else None
        width = int(sizes.max()) if mask is None or self.first_token_only else int(mask.shape[-1])
        kept = np.minimum(sizes, width)
        rows = np.repeat(np.arange(len(index)), kept)
        positions = np.arange(int(kept.sum())) - np.repeat(np.cumsum(kept) - kept, kept)
        sources = np.repeat([self.offsets[i] for i in index], kept) + positions
        if isinstance(self.states, np.ndarray):
            gathered = torch.from_numpy(np.asarray(self.states[sources]))
        else:
            gathered = self.states[torch.from_numpy(sources)]
        hidden = torch.zeros(len(index), width, *gathered.shape[1:], dtype=gathered.dtype)
        hidden[torch.from_numpy(rows), torch.from_numpy(positions)] = gathered
        return {"batch": base, "hidden": hidden}


@dataclass
class Encoded:
    """One pass over a dataset: its activations at the split, its kNN features [n, d], and whether layers
    return tuples (so pass-throughs mimic them)."""

    data: ActivationData
    features: Tensor
    layer_returns_tuple: bool


def _example_sizes(data: Dataset, split: Split) -> list[int] | None:
    """Rows cached per example: 1 for a first-token head, else its length (None when the dataset has no lengths)."""
    if split.first_token_only:
        return [1] * len(data)
    lengths = getattr(data, "lengths", None)
    return None if lengths is None else [int(length) for length in lengths]


class _Sink:
    """Preallocated storage for all examples' states: a tensor in RAM, or a memmap on disk past the budget."""

    def __init__(self, sizes: list[int], budget_bytes: int, folder: str | Path | None, first_token: bool) -> None:
        self.sizes, self.budget, self.folder, self.first_token = sizes, budget_bytes, folder, first_token
        self.offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(int).tolist()
        self.array: Tensor | np.ndarray | None = None

    def _allocate(self, like: Tensor) -> None:
        shape = (sum(self.sizes), *like.shape[1:])
        if int(np.prod(shape)) * like.element_size() <= self.budget:
            self.array = torch.zeros(shape, dtype=like.dtype)
            return
        directory = Path(self.folder) if self.folder is not None else Path(tempfile.mkdtemp(prefix="fastif-cache-"))
        directory.mkdir(parents=True, exist_ok=True)
        dtype = torch.zeros(0, dtype=like.dtype).numpy().dtype
        self.array = np.lib.format.open_memmap(directory / "activations.npy", mode="w+", dtype=dtype, shape=shape)

    def put(self, i: int, state: Tensor) -> None:
        if self.array is None:
            self._allocate(state)
        rows = slice(self.offsets[i], self.offsets[i] + self.sizes[i])
        self.array[rows] = state.numpy() if isinstance(self.array, np.ndarray) else state

    def finish(self, data: Dataset) -> ActivationData:
        if isinstance(self.array, np.memmap):
            self.array.flush()
        return ActivationData(data, self.array, self.offsets, self.sizes, self.first_token)


def _check_right_padded(batch: Batch, sizes: list[int] | None) -> None:
    """The cache keeps each example's first ``length`` positions, so padding must come last (as fastif's datasets
    pad); a left-padded batch would cache the padding and drop tokens."""
    mask = batch.get("attention_mask") if isinstance(batch, dict) else None
    if sizes is None or mask is None or mask.dim() != 2:
        return
    if bool((mask[:, 1:] > mask[:, :-1]).any()):
        raise DataError(
            "the frozen path needs right-padded batches (a token follows padding here); pad on the right "
            "(tokenizer.padding_side = 'right'), or use frozen='off'"
        )


@torch.no_grad()
def encode_prefix(
    adapter: ModelAdapter,
    data: Dataset,
    split: Split,
    batch_size: int = 64,
    budget_bytes: int = DEFAULT_BUDGET_BYTES,
    folder: str | Path | None = None,
) -> Encoded:
    """One no-grad forward over ``data`` (shortest first): the hidden states entering layer ``split.first`` and the
    kNN features; the states go to a memmap under ``folder`` (default: a temporary folder) past ``budget_bytes``."""
    if len(data) == 0:
        raise DataError("cannot cache the activations of an empty dataset")
    model = adapter.model
    layers = model.get_submodule(split.layers)
    source = layers[split.first - 1] if split.first > 0 else model.get_submodule(split.entry)
    captured: dict[str, Any] = {}

    def capture(_module: nn.Module, _args: Any, output: Any) -> None:
        captured["tuple"] = isinstance(output, tuple)
        captured["hidden"] = output[0] if isinstance(output, tuple) else output

    sizes = _example_sizes(data, split)
    states: dict[int, Tensor] = {}
    sink = None if sizes is None else _Sink(sizes, budget_bytes, folder, split.first_token_only)
    features: dict[int, Tensor] = {}
    handle = source.register_forward_hook(capture)
    try:
        with progress.task("frozen-bottom pass", len(data), "ex") as advance:
            for chunk in index_chunks(length_order(data, list(range(len(data)))), batch_size):
                batch = data.batch(chunk)
                _check_right_padded(batch, sizes)
                feature = adapter.features(adapter.to_device(batch))
                hidden = captured["hidden"].detach().cpu()
                for row, i in enumerate(chunk):
                    state = hidden[row, : hidden.shape[1] if sizes is None else sizes[i]].clone()
                    if sink is None:
                        states[i] = state
                    else:
                        sink.put(i, state)
                    features[i] = feature[row].float().cpu()
                advance(len(chunk))
    finally:
        handle.remove()
    if sink is None:
        sink = _Sink([states[i].shape[0] for i in range(len(data))], budget_bytes, folder, False)
        for i, state in states.items():
            sink.put(i, state)
    stacked = torch.stack([features[i] for i in range(len(data))])
    return Encoded(sink.finish(data), stacked, bool(captured.get("tuple", False)))
