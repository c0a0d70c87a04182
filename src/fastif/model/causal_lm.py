"""Causal language models: the per-example loss of any HuggingFace ``*ForCausalLM`` over a label mask, per-token
losses and scores, and mean-pooled features for kNN.

Batches follow HuggingFace's convention: ``{"input_ids", "attention_mask", "labels"}`` with ``labels`` the input
ids and -100 on tokens that carry no loss (prompt tokens, padding). Token t's loss is the cross-entropy of
predicting ``labels[t]`` from the logits at position t - 1 (the shift HF applies), so position 0 never carries a
loss. The per-example loss is their sum, or their mean over the tokens with a label.

Tied LM heads (GPT-2's ``lm_head.weight`` is ``transformer.wte.weight``): the adapter follows
:func:`~fastif.model.adapter.tied_aliases`: each name is one use of the shared matrix. Selecting ``lm_head``
differentiates the output head alone (the input embeddings held at their value, so the frozen path applies);
selecting the embedding's name alone, the input side alone; selecting both (or every parameter), the shared
matrix, as the model's own gradient does.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.func import jvp

from ..data import Batch
from ..errors import DataError, ModelError
from .adapter import AdapterConfig, HFAdapter

Reduction = Literal["sum", "mean"]
IGNORE_INDEX = -100
"""The label of a token that carries no loss (HuggingFace's and PyTorch's ``ignore_index``)."""


class HFCausalLMAdapter(HFAdapter):
    """HuggingFace ``*ForCausalLM`` models: per-example loss = sum (or mean) of the label-masked next-token
    cross-entropies; the causal mask is the model's own (checked against its forward when built, see
    :class:`~fastif.model.adapter.HFAdapter`), attention is eager. Features: the mean of the last hidden state
    (the LM head's input) over the non-padding tokens."""

    def __init__(self, model: nn.Module, config: AdapterConfig | None = None, reduction: Reduction = "sum") -> None:
        if reduction not in ("sum", "mean"):
            raise ModelError(f"reduction must be 'sum' or 'mean', got {reduction!r}")
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        if head is None:
            raise ModelError(
                f"{type(model).__name__} has no LM head (get_output_embeddings() is None); HFCausalLMAdapter needs a "
                "*ForCausalLM model, e.g. AutoModelForCausalLM.from_pretrained(folder)"
            )
        super().__init__(model, config)
        self.reduction: Reduction = reduction
        self.head = head
        self.causal = True
        self.mask_mode = self._choose_mask_mode()

    def _compared(self, logits: Tensor, probe: dict[str, Tensor]) -> Tensor:
        return logits[probe["attention_mask"].bool()]  # padded positions carry no loss and may differ

    def _own_logits(self, probe: dict[str, Tensor]) -> Tensor:
        """The model's own logits on each probe row without its padding (a float64 forward over right padding can
        give NaN where a sliding window leaves a padded query no key, and NaN values then leak through attention)."""
        lengths = probe["attention_mask"].sum(dim=1).tolist()
        ids = probe["input_ids"]
        return torch.cat([self.model(input_ids=ids[i : i + 1, :n]).logits[0] for i, n in enumerate(lengths)])

    def token_losses(self, logits: Tensor, batch: Batch) -> Tensor:
        """Per-token losses [B, T] of ``logits`` [B, T, V]: token t's weighted next-token cross-entropy (0 where
        the label is -100, and at t = 0); a row sums to the example's loss."""
        labels = batch["labels"]
        shifted = logits[:, :-1]
        losses = nn.functional.cross_entropy(
            shifted.reshape(-1, shifted.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=IGNORE_INDEX,
            reduction="none",
        ).view(labels.shape[0], -1)  # fmt: skip
        losses = torch.cat([losses.new_zeros(labels.shape[0], 1), losses], dim=1)
        if self.reduction == "mean":
            counts = (labels[:, 1:] != IGNORE_INDEX).sum(dim=1, keepdim=True).clamp(min=1)
            losses = losses / counts
        return losses

    def loss_from_outputs(self, outputs: Any, batch: Batch) -> Tensor:
        return self.token_losses(outputs, batch).sum(dim=1)

    def _loss(self, params: dict[str, Tensor], batch: Batch) -> Tensor:
        return self.loss_from_outputs(self.logits(params, batch), batch)

    def per_token_loss(self, flat: Tensor, batch: Batch) -> Tensor:
        """Per-token losses [B, T] at parameters ``flat`` (0 where masked; rows sum to :meth:`per_example_loss`)."""
        return self.token_losses(self.outputs(flat, batch), batch)

    def token_scores(self, flat: Tensor, batch: Batch, s_test: Tensor) -> Tensor:
        """Per-token influence scores [B, T]: ``s_testᵀ ∇ℓ_t`` for each token loss ℓ_t (one forward-mode JVP), so a
        row sums to the example's score ``s_testᵀ ∇L`` (positive = the token's loss helps)."""
        batch = self.to_device(batch)
        self.check_batch(batch)
        with torch.no_grad():
            return jvp(lambda theta: self.per_token_loss(theta, batch), (flat,), (s_test.to(flat),))[1]

    def check_batch(self, batch: Batch) -> None:
        super().check_batch(batch)
        if not isinstance(batch, Mapping) or "labels" not in batch or "input_ids" not in batch:
            raise DataError(
                "causal-LM batches must be dicts with 'input_ids', 'attention_mask' and 'labels' (the input ids, "
                "-100 on tokens without a loss), e.g. from fastif.data.documents.LMDocuments"
            )
        ids, labels = batch["input_ids"], batch["labels"]
        if labels.shape != ids.shape:
            raise DataError(f"labels must be shaped like input_ids {tuple(ids.shape)}, got {tuple(labels.shape)}")
        vocab = int(self.model.config.vocab_size)
        real = labels[labels != IGNORE_INDEX]
        if real.numel() and (int(real.min()) < 0 or int(real.max()) >= vocab):
            raise DataError(f"labels must be token ids in [0, {vocab - 1}] or -100 (no loss) for this model")

    @torch.no_grad()
    def features(self, batch: Batch) -> Tensor:
        inputs = self._model_inputs(batch)
        captured: list[Tensor] = []
        handle = self.head.register_forward_hook(lambda _m, args, _out: captured.append(args[0]))
        try:
            with self._masks_for_mode():  # the adapter's masks: finite where the model's own float64 ones give NaN
                self.model(**inputs)
        finally:
            handle.remove()
        mask = inputs["attention_mask"].to(captured[0].dtype)[..., None]
        return (captured[0] * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1)


def top_decoder_parameters(model: nn.Module, top_layers: int = 1) -> tuple[str, ...]:
    """The top ``top_layers`` decoder layers and everything above the stack (final norm, LM head by its own name),
    for an architecture with a frozen-path splitter: the frozen path's natural selection. A tied head is selected
    as ``lm_head.weight`` alone, its output use (see the module docstring)."""
    from .frozen import Splitter

    splitter = Splitter.registry.get(getattr(model.config, "model_type", "") or "")
    if splitter is None:
        raise ModelError(
            f"no decoder layout is known for {type(model).__name__} (model_type {model.config.model_type!r}); "
            "list the parameters with --params (module prefixes or globs)"
        )
    prefix = model.base_model_prefix
    stack = f"{prefix}.{splitter.layers}"
    layers = len(model.get_submodule(stack))
    if not 0 <= top_layers <= layers:
        raise ModelError(f"top_layers must lie in [0, {layers}] for this {layers}-layer model, got {top_layers}")
    below = [f"{prefix}.{path}" for path in splitter.bottom]
    below += [f"{stack}.{i}" for i in range(layers - top_layers)]
    names = [name for name, _ in model.named_parameters(remove_duplicate=False)]
    return tuple(name for name in names if not any(name == p or name.startswith(p + ".") for p in below))


def driving_span(token_scores: Tensor, width: int, helpful: bool = True) -> tuple[int, int]:
    """``(start, end)`` of the ``width`` consecutive tokens whose scores sum highest (lowest when not ``helpful``):
    the part of a training document that drove its score."""
    if width < 1:
        raise DataError(f"the span width must be at least 1 token, got {width}")
    width = min(width, token_scores.shape[-1])
    sums = token_scores.unfold(-1, width, 1).sum(dim=-1)
    start = int(sums.argmax() if helpful else sums.argmin())
    return start, start + width
