"""The trainable top of a BERT-like classifier, run on cached inputs: the experiments' main speed-up.

The fine-tuning experiments only ever change the top ``num_layers`` encoder layers (0 by default), the pooler and
the classifier, and everything below is frozen. So the input of the trainable part is computed once per example
(:func:`encode_hidden`; with ``num_layers=0`` only the final [CLS] vector, which is all the pooler reads) and every
later forward pass, gradient, HVP and SGD step runs on :class:`TopLayers` alone. :class:`TopLayers` *shares* its
parameters with the full model, so a step on it is a step on the model, and its logits equal the full model's
(checked in the tests). :func:`cached_encode` keeps the encodings on disk (safetensors), keyed by a fingerprint
of the model's weights, the records and the tokenisation length.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
from torch import Tensor, nn

from ...data import Batch
from ...data.text import TextPairData, records_fingerprint
from ...errors import DataError, ModelError
from ...files import atomic_write
from ...files import cache_dir as default_cache_dir
from ...model.adapter import AdapterConfig, TorchAdapter, additive_attention_mask
from ...model.hf import encoder_layers
from ...model.predict import model_inputs


class TopLayers(nn.Module):
    """The top ``num_layers`` encoder layers (0 = none), pooler, dropout and classifier of a BERT-like classifier.

    ``forward(hidden, mask)`` takes the hidden states entering the first of those layers ([B, T, H]; with no
    layers, the final hidden states, of which the pooler reads position 0) and the 0/1 padding mask ([B, T]),
    and returns the logits; the modules are the model's own (shared parameters).
    """

    def __init__(self, model: nn.Module, num_layers: int) -> None:
        super().__init__()
        layers = encoder_layers(model)
        if not 0 <= num_layers <= len(layers):
            raise ModelError(f"num_layers must be between 0 and {len(layers)} for this model, got {num_layers}")
        base = model.base_model
        if getattr(base, "pooler", None) is None or not hasattr(model, "classifier"):
            raise ModelError(f"{type(model).__name__} needs a pooler and a classifier (a BERT-style classifier)")
        self.first = len(layers) - num_layers
        self.layers = nn.ModuleList(layers[self.first :])
        self.pooler = base.pooler
        self.dropout = getattr(model, "dropout", nn.Identity())
        self.classifier = model.classifier
        prefix = model.base_model_prefix
        self.module_names = (
            *(f"{prefix}.encoder.layer.{i}" for i in range(self.first, len(layers))),
            f"{prefix}.pooler",
            "classifier",
        )

    @property
    def cls_only(self) -> bool:
        """True when no encoder layer is trainable: the cached input is then just the final [CLS] vector."""
        return len(self.layers) == 0

    def pooled(self, hidden: Tensor, mask: Tensor) -> Tensor:
        """The classifier's input (the pooled [CLS] vector): FastIF's kNN feature."""
        if self.layers:
            extended = additive_attention_mask(mask, hidden.dtype)
            for layer in self.layers:
                output = layer(hidden, attention_mask=extended)
                hidden = output[0] if isinstance(output, tuple) else output
        return self.dropout(self.pooler(hidden))

    def forward(self, hidden: Tensor, mask: Tensor) -> Tensor:
        """Logits [B, C] from the cached hidden states."""
        return self.classifier(self.pooled(hidden, mask))


class HiddenStateData:
    """Cached inputs of the top layers, one [L_i, H] tensor per example, and labels; batches pad dynamically.

    ``batch`` returns ``((hidden [B, T, H], mask [B, T]), labels)``, the ``(inputs, targets)`` pair that
    :class:`~fastif.adapters.TorchAdapter` expects.
    """

    def __init__(self, states: Sequence[Tensor], labels: Tensor) -> None:
        if len(states) == 0 or len(states) != len(labels):
            raise DataError(f"HiddenStateData needs one state per label, got {len(states)} and {len(labels)}")
        self.states = list(states)
        self.labels = labels.long()

    def __len__(self) -> int:
        return len(self.states)

    def batch(self, indices: Sequence[int]) -> Batch:
        """Pad the examples ``indices`` to their longest and stack them with their 0/1 mask and labels."""
        index = [int(i) for i in indices]
        if not index or any(i < 0 or i >= len(self) for i in index):
            raise DataError(f"indices must be non-empty and lie in [0, {len(self) - 1}]")
        width = max(self.states[i].shape[0] for i in index)
        first = self.states[index[0]]
        hidden = torch.zeros(len(index), width, first.shape[1], dtype=first.dtype)
        mask = torch.zeros(len(index), width, dtype=torch.long)
        for row, i in enumerate(index):
            length = self.states[i].shape[0]
            hidden[row, :length] = self.states[i]
            mask[row, :length] = 1
        return (hidden, mask), self.labels[index]

    def subset(self, indices: Sequence[int]) -> HiddenStateData:
        """A new data set of the examples ``indices``, in that order (no copy of the states)."""
        index = [int(i) for i in indices]
        return HiddenStateData([self.states[i] for i in index], self.labels[index])


@torch.no_grad()
def encode_hidden(
    model: nn.Module, data: TextPairData, first_layer: int, cls_only: bool = False, batch_size: int = 64
) -> HiddenStateData:
    """Run the frozen bottom of ``model`` once over ``data``: the inputs of layer ``first_layer`` (unpadded), or
    with ``cls_only`` just position 0 (the final [CLS] vector when ``first_layer`` is the number of layers)."""
    was_training = model.training
    model.eval()
    order = sorted(range(len(data)), key=lambda i: data.lengths[i])
    states: list[Tensor] = [torch.empty(0)] * len(data)
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        outputs = model.base_model(**model_inputs(data.batch(chunk)), output_hidden_states=True)
        hidden = outputs.hidden_states[first_layer]
        for row, i in enumerate(chunk):
            states[i] = hidden[row, : 1 if cls_only else data.lengths[i]].clone()
    model.train(was_training)
    return HiddenStateData(states, data.labels)


def model_fingerprint(model: nn.Module) -> str:
    """SHA-256 over the names and bytes of every tensor in the model's state dict (identifies its weights)."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        digest.update(name.encode() + b"\0" + str(tensor.dtype).encode() + str(tuple(tensor.shape)).encode())
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def experiments_cache_dir() -> Path:
    """Where encodings are cached: ``experiments/`` beside the trained-model cache (``~/.cache/fastif``)."""
    return default_cache_dir().parent / "experiments"


def cached_encode(
    model: nn.Module,
    data: TextPairData,
    first_layer: int,
    cls_only: bool,
    cache_dir: str | os.PathLike[str] | None,
    model_key: str,
) -> HiddenStateData:
    """:func:`encode_hidden`, read from or written to ``cache_dir`` (None: no disk cache) under a content key."""
    if cache_dir is None:
        return encode_hidden(model, data, first_layer, cls_only)
    key = {
        "model": model_key,
        "records": records_fingerprint(data.records),
        "max_length": data.max_length,
        "first_layer": first_layer,
        "cls_only": cls_only,
    }
    name = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]
    path = Path(cache_dir) / f"hidden-{name}.safetensors"
    if path.is_file():
        tensors = safetensors.torch.load_file(str(path))
        lengths = tensors["lengths"].tolist()
        if len(lengths) == len(data) and torch.equal(tensors["labels"], data.labels):
            return HiddenStateData(list(torch.split(tensors["hidden"], lengths)), data.labels)
    encoded = encode_hidden(model, data, first_layer, cls_only)
    tensors = {
        "hidden": torch.cat(encoded.states).contiguous(),
        "lengths": torch.tensor([state.shape[0] for state in encoded.states]),
        "labels": data.labels.clone(),
    }
    atomic_write(path, lambda tmp: safetensors.torch.save_file(tensors, tmp))
    return encoded


def top_layers_adapter(top: TopLayers, l2: float) -> TorchAdapter:
    """A fastif adapter over ``top`` (all its parameters), cross-entropy loss, FastIF's L2 on weights only."""
    config = AdapterConfig(l2=l2, l2_exclude=("*bias", "*LayerNorm*", "*layer_norm*"))
    return TorchAdapter(top, _cross_entropy, config, feature_fn=_pooled_feature)


def _cross_entropy(logits: Tensor, labels: Tensor) -> Tensor:
    return nn.functional.cross_entropy(logits, labels, reduction="none")


def _pooled_feature(model: Any, inputs: Any) -> Tensor:
    """kNN features: the pooled vector the classifier sees (as HFClassifierAdapter's default)."""
    hidden, mask = inputs
    return model.pooled(hidden, mask)
