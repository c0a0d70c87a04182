"""Hessian stage: Hessian-vector products of the training objective, on a batch or over the whole training set.

``H`` is the Hessian of ``mean_i L(z_i; θ) + (l2 / 2)·‖m ⊙ θ‖²`` over the adapter's selected parameters. Two
ways to compute ``H v`` on a batch: double backward (the default: measured faster on CPU, see
docs/performance-notes) and forward-over-reverse (``jvp`` of ``grad``); both accept a stack [k, P] and return [k, P].
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor
from torch.func import grad, jvp, vmap

from .data import Batch, Dataset, index_chunks
from .errors import DataError
from .model.adapter import ModelAdapter

HVPMethod = Literal["fwd-rev", "double-backward"]


def _mean_loss(adapter: ModelAdapter, batch: Batch):
    return lambda theta: adapter.per_example_loss(theta, batch).mean()


def loss_hvp(
    adapter: ModelAdapter, flat: Tensor, batch: Batch, vectors: Tensor, method: HVPMethod = "double-backward"
) -> Tensor:
    """Products of the batch's mean-loss Hessian (no L2 term) with ``vectors`` ([P] or [k, P])."""
    single = vectors.dim() == 1
    stack = vectors.unsqueeze(0) if single else vectors
    if method == "fwd-rev":
        grad_fn = grad(_mean_loss(adapter, batch))
        with torch.no_grad():
            product = vmap(lambda v: jvp(grad_fn, (flat,), (v,))[1])(stack)
    elif method == "double-backward":
        theta = flat.detach().requires_grad_(True)
        with torch.enable_grad():
            (gradient,) = torch.autograd.grad(_mean_loss(adapter, batch)(theta), theta, create_graph=True)
            (product,) = torch.autograd.grad(gradient, theta, stack, is_grads_batched=True)
    else:
        raise ValueError(f"unknown HVP method {method!r}")
    return product[0] if single else product


class Hessian:
    """The training objective's Hessian as a linear operator over ``data`` at parameters ``flat``.

    ``matvec`` averages exact batch Hessians over the whole set (weighted by batch size) and adds ``l2·m``;
    ``batch_matvec`` is the objective's Hessian on a subset (what stochastic solvers such as LiSSA sample).
    """

    def __init__(
        self,
        adapter: ModelAdapter,
        data: Dataset,
        flat: Tensor | None = None,
        batch_size: int = 64,
        method: HVPMethod = "double-backward",
    ) -> None:
        if len(data) == 0:
            raise DataError("the training set is empty; influence needs at least one training example")
        self.adapter, self.data, self.batch_size, self.method = adapter, data, batch_size, method
        self.flat = adapter.flat_params() if flat is None else flat
        self.num_examples = len(data)

    @property
    def dim(self) -> int:
        """Number of parameters P (the operator is P x P)."""
        return self.adapter.num_params

    def _regulariser(self, vectors: Tensor) -> Tensor:
        return self.adapter.config.l2 * self.adapter.l2_mask * vectors

    def _batch(self, indices: Sequence[int]) -> Batch:
        batch = self.adapter.to_device(self.data.batch(indices))
        self.adapter.check_batch(batch)
        return batch

    def matvec(self, vectors: Tensor) -> Tensor:
        """H v over the whole training set, for v of shape [P] or [k, P]."""
        total = torch.zeros_like(vectors)
        for chunk in index_chunks(range(self.num_examples), self.batch_size):
            batch = self._batch(chunk)
            total += loss_hvp(self.adapter, self.flat, batch, vectors, self.method) * (len(chunk) / self.num_examples)
        return total + self._regulariser(vectors)

    def batch_matvec(self, vectors: Tensor, indices: Sequence[int]) -> Tensor:
        """H_B v: the objective's Hessian on the examples ``indices`` only (mean loss + L2 term)."""
        return loss_hvp(self.adapter, self.flat, self._batch(indices), vectors, self.method) + self._regulariser(
            vectors
        )

    def dense(self, columns_per_pass: int = 256) -> Tensor:
        """The full P x P matrix, built from ``matvec`` on identity columns (for small P only), symmetrised."""
        eye = torch.eye(self.dim, dtype=self.flat.dtype, device=self.flat.device)
        blocks = [self.matvec(eye[i : i + columns_per_pass]) for i in range(0, self.dim, columns_per_pass)]
        matrix = torch.cat(blocks)
        return 0.5 * (matrix + matrix.T)
