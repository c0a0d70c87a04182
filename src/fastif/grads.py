"""Gradient stage: per-example loss gradients (vmap of grad) and forward-mode directional derivatives (jvp).

Both operate on the adapter's flat parameter vector. ``directional_derivatives`` gives ∇L(z_j)·t for a whole
batch from one forward-mode pass, without materialising the [B, P] gradient matrix.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor
from torch.func import grad, jvp, vmap

from .data import Batch, Dataset, batch_len, iter_batches, map_tensors
from .model.adapter import ModelAdapter


def _single_example_loss(adapter: ModelAdapter):
    """A function (θ, example) -> scalar loss, where ``example`` is one example without its batch dimension."""

    def loss(flat: Tensor, example: Batch) -> Tensor:
        return adapter.per_example_loss(flat, map_tensors(lambda t: t.unsqueeze(0), example)).squeeze(0)

    return loss


def _slice(batch: Batch, start: int, stop: int) -> Batch:
    return map_tensors(lambda t: t[start:stop], batch)


def per_example_grads(adapter: ModelAdapter, flat: Tensor, batch: Batch, chunk_size: int = 32) -> Tensor:
    """∇_θ L(z_j; θ) for every example of ``batch``: a [B, P] tensor, computed ``chunk_size`` examples at a time."""
    batch = adapter.to_device(batch)
    adapter.check_batch(batch)
    grad_fn = vmap(grad(_single_example_loss(adapter)), in_dims=(None, 0))
    size = batch_len(batch)
    with torch.no_grad():
        return torch.cat([grad_fn(flat, _slice(batch, i, i + chunk_size)) for i in range(0, size, chunk_size)])


def directional_derivatives(adapter: ModelAdapter, flat: Tensor, batch: Batch, tangent: Tensor) -> Tensor:
    """∇_θ L(z_j; θ)·tangent for every example of ``batch`` ([B]), by one ``torch.func.jvp`` of the loss vector."""
    batch = adapter.to_device(batch)
    adapter.check_batch(batch)
    with torch.no_grad():
        _, derivative = jvp(lambda theta: adapter.per_example_loss(theta, batch), (flat,), (tangent,))
    return derivative


def dataset_grads(
    adapter: ModelAdapter,
    flat: Tensor,
    data: Dataset,
    indices: Sequence[int] | None = None,
    batch_size: int = 64,
    chunk_size: int = 32,
) -> Tensor:
    """Per-example gradients [n, P] of the examples ``indices`` (default: all) of ``data``."""
    rows = [per_example_grads(adapter, flat, batch, chunk_size) for _, batch in iter_batches(data, batch_size, indices)]
    if not rows:
        return torch.empty(0, adapter.num_params, dtype=adapter.dtype, device=adapter.device)
    return torch.cat(rows)


def mean_loss_grad(adapter: ModelAdapter, flat: Tensor, data: Dataset, batch_size: int = 64) -> Tensor:
    """Gradient [P] of the mean loss over all of ``data`` (e.g. a group of anchor points), without the L2 term."""
    total = torch.zeros_like(flat)
    for _, batch in iter_batches(data, batch_size):
        batch = adapter.to_device(batch)
        adapter.check_batch(batch)
        total += grad(lambda theta, b=batch: adapter.per_example_loss(theta, b).sum())(flat)
    return total / len(data)
