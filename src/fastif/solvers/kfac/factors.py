"""Factor passes: run the adapter's per-example loss with forward hooks on the Kronecker layers, take the
gradients with respect to their outputs, and accumulate sums (never means) so that batches, splits and ranks add up.

Sums per Kronecker layer: ``A = Σ a aᵀ`` over unmasked tokens (count: tokens), ``S = Σ g gᵀ`` over all tokens
(count: examples), EK-FAC's ``Λ = Σ_i (Q_Sᵀ G_i Q_A)²`` (count: examples); per diagonal parameter: ``Σ_i ∇_i²``.
The true Fisher replaces each example's targets by a draw from the model's predictive distribution, made from one
uniform number per example seeded by ``(seed, example index)``, so the draw does not depend on batching.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Literal

import numpy as np
import torch
from torch import Tensor, nn
from torch.func import grad, vmap

from ...data import Batch, batch_len, map_tensors
from ...errors import SolverError
from ...model.adapter import HFClassifierAdapter, ModelAdapter, TorchAdapter
from ...model.frozen import FrozenAdapter
from .layers import KroneckerLayer

Likelihood = Literal["auto", "categorical", "bernoulli"]


@contextmanager
def captured(layers: Sequence[KroneckerLayer]) -> Iterator[list[list[tuple[Tensor, Tensor]]]]:
    """Record (input, output) of every call of each layer's module while the block runs; hooks removed after."""
    records: list[list[tuple[Tensor, Tensor]]] = [[] for _ in layers]

    def hook(index: int):
        return lambda _module, args, output: records[index].append((args[0].detach(), output))

    handles = [layer.module.register_forward_hook(hook(i)) for i, layer in enumerate(layers)]
    try:
        yield records
    finally:
        for handle in handles:
            handle.remove()


def _attention_mask(batch: Batch) -> Tensor | None:
    """The batch's ``attention_mask``, also inside the frozen path's ``{"batch": ..., "hidden": ...}`` layout."""
    if not isinstance(batch, Mapping):
        return None
    if isinstance(batch.get("attention_mask"), Tensor):
        return batch["attention_mask"]
    return _attention_mask(batch["batch"]) if "batch" in batch else None


def token_mask(batch: Batch, size: int, tokens: int) -> Tensor | None:
    """The batch's [B, T] ``attention_mask`` when a layer's inputs have T tokens per example, else None."""
    mask = _attention_mask(batch)
    return mask if mask is not None and mask.shape == (size, tokens) else None


def layer_tokens(
    adapter: ModelAdapter, flat: Tensor, batch: Batch, layers: Sequence[KroneckerLayer]
) -> list[tuple[Tensor, Tensor]]:
    """Per layer: input tokens a [B, T, columns] and output gradients g [B, T, out] of each example's own loss.

    The losses are summed before the backward pass; examples do not interact (eval mode), so row i of g is the
    gradient of loss i alone. A module called several times contributes all its calls as extra tokens.
    """
    theta = flat.detach().requires_grad_(True)
    with torch.enable_grad(), captured(layers) as records:
        losses = adapter.per_example_loss(theta, batch)
    outputs = [output for record in records for _, output in record]
    if any(not output.requires_grad for output in outputs) or not outputs:
        raise SolverError("no Kronecker layer ran with gradients: check that the selected layers are used by the loss")
    gradients = iter(torch.autograd.grad(losses.sum(), outputs, allow_unused=True))
    result = []
    for layer, record in zip(layers, records, strict=True):
        if not record:
            raise SolverError(f"layer {layer.name!r} did not run in the model's forward pass; deselect its parameters")
        inputs, output_grads = [], []
        for (activation, output), gradient in zip(record, gradients, strict=False):
            inputs.append(layer.tokens(activation))
            output_grads.append(layer.output_tokens(torch.zeros_like(output) if gradient is None else gradient))
        result.append((torch.cat(inputs, dim=1), torch.cat(output_grads, dim=1)))
    return result


def masked_tokens(tokens: Tensor, batch: Batch) -> tuple[Tensor, Tensor]:
    """Tokens with padding (``attention_mask`` 0) zeroed, and how many tokens count."""
    mask = token_mask(batch, tokens.shape[0], tokens.shape[1])
    if mask is None:
        return tokens, torch.tensor(tokens.shape[0] * tokens.shape[1], dtype=torch.int64)
    return tokens * mask[:, :, None].to(tokens.dtype), mask.sum().to(torch.int64).cpu()


def diagonal_squares(adapter: ModelAdapter, flat: Tensor, batch: Batch, index: Tensor, chunk: int = 32) -> Tensor:
    """Σ_i (∂L_i/∂θ_d)² over the examples of ``batch`` for the flat positions ``index`` (vmap of grad)."""

    def loss(sub: Tensor, example: Batch) -> Tensor:
        theta = flat.index_copy(0, index, sub)
        return adapter.per_example_loss(theta, map_tensors(lambda t: t.unsqueeze(0), example)).squeeze(0)

    grad_fn = vmap(grad(loss), in_dims=(None, 0))
    total = torch.zeros(index.numel(), dtype=flat.dtype, device=flat.device)
    size = batch_len(batch)
    with torch.no_grad():
        for start in range(0, size, chunk):
            piece = map_tensors(lambda t, s=start: t[s : s + chunk], batch)
            total += grad_fn(flat[index], piece).square().sum(dim=0)
    return total


def _uniforms(indices: Sequence[int], seed: int, device: torch.device) -> Tensor:
    """One U(0, 1) draw per example, from a generator seeded by (seed, index): the same whatever the batching."""
    draws = [np.random.default_rng((seed, int(index))).random() for index in indices]
    return torch.tensor(draws, dtype=torch.float64, device=device)


def _categorical(logits: Tensor, uniforms: Tensor) -> Tensor:
    """Inverse-CDF draws from softmax(logits) [B, C], one class index per example."""
    cumulative = torch.softmax(logits.detach().to(torch.float64), dim=-1).cumsum(dim=-1)
    return torch.searchsorted(cumulative, uniforms[:, None]).squeeze(1).clamp_max(logits.shape[-1] - 1)


def resolve_likelihood(adapter: ModelAdapter, likelihood: Likelihood) -> Likelihood:
    """The predictive distribution the true Fisher samples from; 'auto' reads it off the adapter's loss."""
    if likelihood != "auto" or hasattr(adapter, "sample_targets"):
        return likelihood
    if isinstance(adapter, FrozenAdapter):
        return resolve_likelihood(adapter.base, likelihood)
    if isinstance(adapter, HFClassifierAdapter):
        return "categorical"
    if isinstance(adapter, TorchAdapter):
        if isinstance(adapter.loss_fn, nn.CrossEntropyLoss):
            return "categorical"
        if isinstance(adapter.loss_fn, nn.BCEWithLogitsLoss):
            return "bernoulli"
    raise SolverError(
        f"the true Fisher needs to sample targets from the model, but {type(adapter).__name__}'s loss does not say "
        "which distribution it is; set likelihood='categorical' (softmax logits, class targets) or 'bernoulli' "
        "(one logit, 0/1 targets), give the adapter a sample_targets(flat, batch, uniforms) method, or use "
        "fisher='empirical'"
    )


def sample_targets(
    adapter: ModelAdapter, flat: Tensor, batch: Batch, indices: Sequence[int], seed: int, likelihood: Likelihood
) -> Batch:
    """``batch`` with its targets replaced by draws from the model's predictive distribution (true Fisher).

    An adapter may define ``sample_targets(flat, batch, uniforms)`` (one U(0, 1) per example) to do this itself.
    """
    if isinstance(adapter, FrozenAdapter):  # draw from the base model run on the cached activations
        with adapter._injected(batch["hidden"]):
            drawn = sample_targets(adapter.base, flat, batch["batch"], indices, seed, likelihood)
        return {**batch, "batch": drawn}
    uniforms = _uniforms(indices, seed, flat.device)
    if likelihood == "auto" and hasattr(adapter, "sample_targets"):
        return adapter.sample_targets(flat, batch, uniforms)
    likelihood = resolve_likelihood(adapter, likelihood)
    params = adapter.space.unflatten(flat)
    with torch.no_grad():
        if isinstance(adapter, HFClassifierAdapter):
            return {**batch, "labels": _categorical(adapter.logits(params, batch), uniforms)}
        if not isinstance(adapter, TorchAdapter) or not isinstance(batch, tuple | list) or len(batch) != 2:
            raise SolverError("target sampling needs a TorchAdapter with (inputs, targets) batches, or an HF adapter")
        inputs, targets = batch
        args = tuple(inputs) if isinstance(inputs, tuple | list) else (inputs,)
        outputs = adapter.functional_call(params, args, {})
        if likelihood == "categorical":
            drawn = _categorical(outputs, uniforms).to(targets.dtype)
        else:
            probabilities = torch.sigmoid(outputs.detach().to(torch.float64)).reshape(targets.shape)
            drawn = (uniforms.reshape(targets.shape) < probabilities).to(targets.dtype)
    return type(batch)((inputs, drawn))
