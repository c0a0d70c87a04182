"""Gradient stage: per-example loss gradients (vmap of grad) and forward-mode directional derivatives (jvp).

Both operate on the adapter's flat parameter vector. ``directional_derivatives`` gives ∇L(z_j)·t for a whole
batch from one forward-mode pass, without materialising the [B, P] gradient matrix.

Some models do not support a transform (``vmap`` over nn.LSTM/GRU/RNN, forward-mode AD through CPU LSTM kernels).
Then the same numbers come from a fallback: a loop of ``grad`` over single examples instead of vmap, gradient dot
products instead of jvp. The first failure is recorded in ``adapter.unsupported`` and warned about once per adapter,
naming the path that runs; an error the fallback hits too is the model's own and is raised as such.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence

import torch
from torch import Tensor
from torch.func import grad, jvp, vmap

from .data import Batch, Dataset, batch_len, iter_batches, map_tensors
from .errors import DataError
from .model.adapter import ModelAdapter

TRANSFORM_ERRORS = (RuntimeError, DataError)  # what a transform's failure surfaces as (DataError wraps model errors)


def _single_example_loss(adapter: ModelAdapter):
    """A function (θ, example) -> scalar loss, where ``example`` is one example without its batch dimension."""

    def loss(flat: Tensor, example: Batch) -> Tensor:
        return adapter.per_example_loss(flat, map_tensors(lambda t: t.unsqueeze(0), example)).squeeze(0)

    return loss


def _slice(batch: Batch, start: int, stop: int) -> Batch:
    return map_tensors(lambda t: t[start:stop], batch)


def _fall_back(adapter: ModelAdapter, transform: str, error: Exception, path: str) -> None:
    """Record that ``transform`` fails on this model and warn once, naming the path that runs instead."""
    adapter.unsupported.add(transform)
    reason = str(error.__cause__ or error).splitlines()[0][:160]
    warnings.warn(
        f"fastif: torch.func.{transform} does not work on {type(adapter.model).__name__} ({reason}); {path}",
        RuntimeWarning,
        stacklevel=3,
    )


ExampleLoss = Callable[[Tensor, Batch], Tensor]
"""(parameters, one example without its batch dimension) -> scalar loss."""


def _looped_grads(loss: ExampleLoss, params: Tensor, batch: Batch) -> Tensor:
    """Per-example gradients one example at a time: the path for models that vmap cannot batch (RNNs)."""
    loss_grad = grad(loss)
    return torch.stack([loss_grad(params, map_tensors(lambda t, i=i: t[i], batch)) for i in range(batch_len(batch))])


def example_grads(adapter: ModelAdapter, loss: ExampleLoss, params: Tensor, chunk: Batch) -> Tensor:
    """Per-example gradients [B, len(params)] of ``loss`` over one chunk: vmap of grad, or the loop where vmap
    fails on this model (recorded on the adapter, so later chunks loop at once)."""
    if "vmap" in adapter.unsupported:
        return _looped_grads(loss, params, chunk)
    try:
        return vmap(grad(loss), in_dims=(None, 0))(params, chunk)
    except TRANSFORM_ERRORS as error:
        looped = _looped_grads(loss, params, chunk)  # raises the model's own error if it is not vmap's
        _fall_back(adapter, "vmap", error, "per-example gradients run as a loop over examples (same numbers, slower)")
        return looped


def _chunk_grads(adapter: ModelAdapter, flat: Tensor, chunk: Batch) -> Tensor:
    """Per-example gradients of one chunk over every selected parameter."""
    return example_grads(adapter, _single_example_loss(adapter), flat, chunk)


def per_example_grads(adapter: ModelAdapter, flat: Tensor, batch: Batch, chunk_size: int = 32) -> Tensor:
    """∇_θ L(z_j; θ) for every example of ``batch``: a [B, P] tensor, computed ``chunk_size`` examples at a time."""
    batch = adapter.to_device(batch)
    adapter.check_batch(batch)
    size = batch_len(batch)
    with torch.no_grad():
        return torch.cat(
            [_chunk_grads(adapter, flat, _slice(batch, i, i + chunk_size)) for i in range(0, size, chunk_size)]
        )


def directional_derivatives(adapter: ModelAdapter, flat: Tensor, batch: Batch, tangent: Tensor) -> Tensor:
    """∇_θ L(z_j; θ)·tangent for every example of ``batch`` ([B]), by one ``torch.func.jvp`` of the loss vector,
    or by gradient dot products where forward-mode AD fails on this model."""
    batch = adapter.to_device(batch)
    adapter.check_batch(batch)
    if "jvp" not in adapter.unsupported:
        try:
            with torch.no_grad():
                return jvp(lambda theta: adapter.per_example_loss(theta, batch), (flat,), (tangent,))[1]
        except TRANSFORM_ERRORS as error:
            dots = per_example_grads(adapter, flat, batch) @ tangent  # raises the model's own error if not jvp's
            _fall_back(adapter, "jvp", error, "scores run as gradient dot products (same numbers)")
            return dots
    return per_example_grads(adapter, flat, batch) @ tangent


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
