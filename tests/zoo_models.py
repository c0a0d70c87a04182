"""A zoo of tiny random models (float64, no downloads) with the model's own loss, for the checks in test_zoo.py.

Each case holds an adapter over a small parameter subset (P <= 300), a training and a test set, and ``own_losses``:
the per-example loss computed by the model's own forward, independently of the adapter (no functional_call, no
vmap, no fastif masks), which the checks use as the reference.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import cache

import pytest
import torch
from torch import Tensor, nn

from fastif import AdapterConfig, HFClassifierAdapter, ModelAdapter, TensorData, TorchAdapter
from fastif.data import Batch

VOCAB, LENGTH, LABELS = 30, 7, 3
TRAIN, TEST = 6, 2


@dataclass
class ZooCase:
    """One model of the zoo: its adapter, data, and the per-example loss from the model's own forward."""

    adapter: ModelAdapter
    train: TensorData
    test: TensorData
    own_losses: Callable[[Batch], Tensor]
    own_logits: Callable[[Batch], Tensor] | None = None  # HF models: the model's own logits
    rtol: float = 1e-10  # float64 agreement; looser where the model computes in float32 internally


# ------------------------------------------------------------------------------------------ HuggingFace


def _token_data(n: int, seed: int, pad: int, choices: int = 0) -> TensorData:
    """Right-padded random token rows (lengths 3..LENGTH, at least one full row), labels in range."""
    generator = torch.Generator().manual_seed(seed)
    rows = n * max(choices, 1)
    ids = torch.randint(2, VOCAB, (rows, LENGTH), generator=generator)
    lengths = torch.randint(3, LENGTH + 1, (rows,), generator=generator)
    lengths[0] = LENGTH
    mask = (torch.arange(LENGTH)[None] < lengths[:, None]).long()
    ids = torch.where(mask.bool(), ids, pad)
    if choices:
        ids, mask = ids.view(n, choices, LENGTH), mask.view(n, choices, LENGTH)
    labels = torch.randint(0, choices or LABELS, (n,), generator=generator)
    return TensorData({"input_ids": ids, "attention_mask": mask, "labels": labels})


def _own_hf_logits(model: nn.Module) -> Callable[[Batch], Tensor]:
    return lambda batch: model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


def _hf_case(model: nn.Module, include: tuple[str, ...], choices: int = 0, rtol: float = 1e-10) -> ZooCase:
    model = model.double().eval()
    pad = model.config.pad_token_id
    adapter = HFClassifierAdapter(model, AdapterConfig(include=include, l2=1e-2))
    own_logits = _own_hf_logits(model)

    def own_losses(batch: Batch) -> Tensor:
        return nn.functional.cross_entropy(own_logits(batch), batch["labels"], reduction="none")

    train, test = _token_data(TRAIN, 1, pad, choices), _token_data(TEST, 2, pad, choices)
    return ZooCase(adapter, train, test, own_losses, own_logits, rtol)


def _small(**extra) -> dict:
    """Tiny BERT-style sizes: 8 wide, 2 heads, 2 layers, eager attention."""
    sizes = dict(hidden_size=8, num_hidden_layers=2, num_attention_heads=2, intermediate_size=16)
    return dict(vocab_size=VOCAB, num_labels=LABELS, pad_token_id=0, attn_implementation="eager", **sizes, **extra)


def bert(transformers) -> ZooCase:
    model = transformers.BertForSequenceClassification(transformers.BertConfig(**_small(max_position_embeddings=16)))
    return _hf_case(model, ("bert.encoder.layer.0.attention.self.query", "classifier"))


def roberta(transformers) -> ZooCase:
    config = transformers.RobertaConfig(**{**_small(max_position_embeddings=16), "pad_token_id": 1})
    model = transformers.RobertaForSequenceClassification(config)
    return _hf_case(model, ("roberta.encoder.layer.0.attention.self.query", "classifier.out_proj"))


def distilbert(transformers) -> ZooCase:
    config = transformers.DistilBertConfig(
        vocab_size=VOCAB, dim=8, n_layers=2, n_heads=2, hidden_dim=16, num_labels=LABELS, pad_token_id=0,
        max_position_embeddings=16, attn_implementation="eager",
    )  # fmt: skip
    model = transformers.DistilBertForSequenceClassification(config)
    return _hf_case(model, ("distilbert.transformer.layer.0.attention.q_lin", "classifier"))


def modernbert(transformers) -> ZooCase:
    """Layer 0 global, layer 1 sliding (window 4 each side, shorter than the rows): both mask kinds are used."""
    if not hasattr(transformers, "ModernBertForSequenceClassification"):
        pytest.skip(f"transformers {transformers.__version__} has no ModernBERT")
    config = transformers.ModernBertConfig(
        **_small(max_position_embeddings=16), local_attention=8, global_attn_every_n_layers=2
    )
    model = transformers.ModernBertForSequenceClassification(config)
    return _hf_case(model, ("model.layers.1.attn.Wqkv", "classifier"), rtol=1e-7)  # softmax runs in float32


def deberta_v2(transformers) -> ZooCase:
    model = transformers.DebertaV2ForSequenceClassification(
        transformers.DebertaV2Config(**_small(max_position_embeddings=16))
    )
    return _hf_case(model, ("deberta.encoder.layer.0.attention.self.query_proj", "classifier"))


def gpt2(transformers) -> ZooCase:
    config = transformers.GPT2Config(
        vocab_size=VOCAB, n_embd=8, n_layer=2, n_head=2, n_positions=16, num_labels=LABELS, pad_token_id=0,
        attn_implementation="eager",
    )  # fmt: skip
    return _hf_case(transformers.GPT2ForSequenceClassification(config), ("transformer.h.0.attn.c_attn", "score"))


def llama(transformers) -> ZooCase:
    config = transformers.LlamaConfig(**_small(max_position_embeddings=16), num_key_value_heads=1)
    model = transformers.LlamaForSequenceClassification(config)
    return _hf_case(model, ("model.layers.0.self_attn.q_proj", "score"), rtol=1e-6)  # RMSNorm, softmax in float32


def bert_multiple_choice(transformers) -> ZooCase:
    model = transformers.BertForMultipleChoice(transformers.BertConfig(**_small(max_position_embeddings=16)))
    return _hf_case(model, ("bert.encoder.layer.0.attention.self.query", "classifier"), choices=2)


# ------------------------------------------------------------------------------------------ plain torch


class Convolutional(nn.Module):
    """Conv2d -> tanh -> linear on 1 x 6 x 6 images."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 3, 3)
        self.fc = nn.Linear(48, LABELS)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(torch.tanh(self.conv(x)).flatten(1))


class Recurrent(nn.Module):
    """An LSTM/GRU/RNN over [B, 5, 3] sequences, classified from the last hidden state."""

    def __init__(self, cell: type[nn.Module]) -> None:
        super().__init__()
        self.rnn = cell(3, 4, batch_first=True)
        self.fc = nn.Linear(4, LABELS)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.rnn(x)[0][:, -1])


class Normalised(nn.Module):
    """Linear -> BatchNorm1d (eval mode, non-trivial running statistics) -> tanh -> linear."""

    def __init__(self) -> None:
        super().__init__()
        self.hidden = nn.Linear(5, 6)
        self.norm = nn.BatchNorm1d(6)
        self.fc = nn.Linear(6, LABELS)
        with torch.no_grad():
            self.norm.running_mean.uniform_(-0.5, 0.5)
            self.norm.running_var.uniform_(0.5, 2.0)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(torch.tanh(self.norm(self.hidden(x))))


class Tied(nn.Module):
    """Token embedding whose weight is also the output layer's (tied), predicting a token from a 4-token context."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(12, 6)
        self.out = nn.Linear(6, 12)
        self.out.weight = self.embed.weight

    def forward(self, ids: Tensor) -> Tensor:
        return self.out(torch.tanh(self.embed(ids).mean(1)))


def _torch_case(model: nn.Module, inputs: Tensor, classes: int = LABELS, rtol: float = 1e-10) -> ZooCase:
    model = model.double().eval()
    loss_fn = nn.CrossEntropyLoss(reduction="none")
    inputs = inputs.double() if inputs.is_floating_point() else inputs
    targets = torch.randint(0, classes, (len(inputs),), generator=torch.Generator().manual_seed(3))
    adapter = TorchAdapter(model, loss_fn, AdapterConfig(l2=1e-2))
    data = (inputs, targets)
    train, test = TensorData(tuple(t[:TRAIN] for t in data)), TensorData(tuple(t[TRAIN:] for t in data))
    return ZooCase(adapter, train, test, lambda batch: loss_fn(model(batch[0]), batch[1]), rtol=rtol)


def _normal(*shape: int) -> Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(4), dtype=torch.float64)


def convolutional(_transformers) -> ZooCase:
    return _torch_case(Convolutional(), _normal(TRAIN + TEST, 1, 6, 6))


def lstm(_transformers) -> ZooCase:
    return _torch_case(Recurrent(nn.LSTM), _normal(TRAIN + TEST, 5, 3))


def gru(_transformers) -> ZooCase:
    return _torch_case(Recurrent(nn.GRU), _normal(TRAIN + TEST, 5, 3))


def batchnorm(_transformers) -> ZooCase:
    return _torch_case(Normalised(), _normal(TRAIN + TEST, 5))


def tied(_transformers) -> ZooCase:
    ids = torch.randint(0, 12, (TRAIN + TEST, 4), generator=torch.Generator().manual_seed(5))
    return _torch_case(Tied(), ids, classes=12)


BUILDERS = {
    fn.__name__: fn
    for fn in (
        bert, roberta, distilbert, modernbert, deberta_v2, gpt2, llama, bert_multiple_choice,
        convolutional, lstm, gru, batchnorm, tied,
    )
}  # fmt: skip
HF_CASES = tuple(list(BUILDERS)[:8])


@cache
def _built(name: str) -> ZooCase:
    torch.manual_seed(0)
    import transformers

    return BUILDERS[name](transformers)


def zoo_case(name: str) -> ZooCase:
    """The named case, built once per session (tests must not change its model or data)."""
    return _built(name)
