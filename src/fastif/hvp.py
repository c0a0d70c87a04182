"""Hessian stage: Hessian-vector products of the training objective, on a batch or over the whole training set.

``H`` is the Hessian of ``mean_i L(z_i; θ) + (l2 / 2)·‖m ⊙ θ‖²`` over the adapter's selected parameters. Two
ways to compute ``H v`` on a batch: double backward (the default: measured faster on CPU, see
docs/performance-notes) and forward-over-reverse (``jvp`` of ``grad``); both accept a stack [k, P] and return [k, P].

``kind="gauss-newton"`` replaces the loss Hessian by the Gauss-Newton matrix ``mean_i J_iᵀ ∇²ℓ(f_i) J_i`` (plus the
same L2 term; torch-influence's ``gnh``): ``J_i`` is the Jacobian of example i's model outputs ``f_i`` and ``∇²ℓ``
the loss's Hessian in output space. It drops the term of the outputs' own curvature, so for a convex loss it is
PSD by construction, also on non-convex networks. It needs the outputs apart from the loss (see
:func:`output_functions`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor
from torch.func import grad, jvp, vjp, vmap

from .data import Batch, Dataset, index_chunks
from .errors import DataError, ModelError
from .model.adapter import ModelAdapter

HVPMethod = Literal["fwd-rev", "double-backward"]
HessianKind = Literal["hessian", "gauss-newton"]
ResidualScope = Literal["full", "sample"]
OutputsFn = Callable[[Tensor, Batch], Any]
LossFromOutputs = Callable[[Any, Batch], Tensor]


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


def output_functions(adapter: ModelAdapter) -> tuple[OutputsFn, LossFromOutputs]:
    """The adapter's ``outputs(flat, batch)`` and ``loss_from_outputs(outputs, batch) -> [B]`` (for Gauss-Newton);
    ModelError naming the fix when the adapter cannot separate them."""
    if not adapter.has_outputs:
        raise ModelError(
            f"the Gauss-Newton Hessian needs the model's outputs apart from its loss, and {type(adapter).__name__} "
            "gives neither outputs(flat, batch) nor loss_from_outputs(outputs, batch); add them, or use kind='hessian'"
        )
    return adapter.outputs, adapter.loss_from_outputs


def gauss_newton_hvp(adapter: ModelAdapter, flat: Tensor, batch: Batch, vectors: Tensor) -> Tensor:
    """Products of the batch's Gauss-Newton matrix ``mean_i J_iᵀ ∇²ℓ(f_i) J_i`` with ``vectors`` ([P] or [k, P]).

    ``J v`` by forward mode, the output-space loss Hessian by ``jvp`` of its gradient, ``Jᵀ w`` by ``vjp``.
    """
    single = vectors.dim() == 1
    stack = vectors.unsqueeze(0) if single else vectors
    outputs_fn, loss_fn = output_functions(adapter)

    def model(theta: Tensor) -> Any:
        return outputs_fn(theta, batch)

    def mean_loss(model_outputs: Any) -> Tensor:
        return loss_fn(model_outputs, batch).mean()

    with torch.no_grad():
        outputs, pullback = vjp(model, flat)
        output_gradient = grad(mean_loss)

        def product(vector: Tensor) -> Tensor:
            _, tangent = jvp(model, (flat,), (vector,))
            _, curved = jvp(output_gradient, (outputs,), (tangent,))
            return pullback(curved)[0]

        result = vmap(product)(stack)
    return result[0] if single else result


class Hessian:
    """The training objective's Hessian as a linear operator over ``data`` at parameters ``flat``.

    ``matvec`` averages exact batch Hessians over the whole set (weighted by batch size) and adds ``l2·m``;
    ``batch_matvec`` is the objective's Hessian on a subset (what stochastic solvers such as LiSSA sample).
    ``kind="gauss-newton"`` uses the Gauss-Newton matrix instead of the loss Hessian (module docstring).
    ``sample`` is a fixed subset for cheap residual checks: the whole set when it has at most ``sample_size``
    examples, else ``sample_size`` examples drawn once with ``sample_seed``. The solvers check
    their residual ‖(H + damping·I)s − v‖ / ‖v‖ through :meth:`residual_matvec`: on the full H when a pass over the
    set fits their budget, else on this sample (another matrix on a large set, so it is labelled ``"sample"``).
    """

    def __init__(
        self,
        adapter: ModelAdapter,
        data: Dataset,
        flat: Tensor | None = None,
        batch_size: int = 64,
        method: HVPMethod = "double-backward",
        kind: HessianKind = "hessian",
        sample_size: int = 1024,
        sample_seed: int = 0,
    ) -> None:
        if len(data) == 0:
            raise DataError("the training set is empty; influence needs at least one training example")
        if kind not in ("hessian", "gauss-newton"):
            raise ModelError(f"unknown Hessian kind {kind!r}; use 'hessian' or 'gauss-newton'")
        if sample_size < 1:
            raise DataError(f"sample_size must be positive, got {sample_size}")
        self.adapter, self.data, self.batch_size, self.method = adapter, data, batch_size, method
        self.kind = kind
        self.flat = adapter.flat_params() if flat is None else flat
        self.num_examples = len(data)
        if kind == "gauss-newton":
            output_functions(adapter)  # refuse an adapter without outputs now, not in the middle of a solve
        self.sample = self._draw_sample(sample_size, sample_seed)

    @property
    def dim(self) -> int:
        """Number of parameters P (the operator is P x P)."""
        return self.adapter.num_params

    @property
    def sample_examples(self) -> int:
        """How many examples the residual sample holds (all of them for small sets)."""
        return len(self.sample)

    def _draw_sample(self, size: int, seed: int) -> list[int]:
        if self.num_examples <= size:
            return list(range(self.num_examples))
        return sorted(np.random.default_rng(seed).choice(self.num_examples, size=size, replace=False).tolist())

    def _regulariser(self, vectors: Tensor) -> Tensor:
        return self.adapter.config.l2 * self.adapter.l2_mask * vectors

    def _batch(self, indices: Sequence[int]) -> Batch:
        batch = self.adapter.to_device(self.data.batch(indices))
        self.adapter.check_batch(batch)
        return batch

    def _loss_product(self, batch: Batch, vectors: Tensor) -> Tensor:
        if self.kind == "gauss-newton":
            return gauss_newton_hvp(self.adapter, self.flat, batch, vectors)
        return loss_hvp(self.adapter, self.flat, batch, vectors, self.method)

    def _mean_matvec(self, indices: Sequence[int], vectors: Tensor) -> Tensor:
        """The objective's Hessian over the examples ``indices``, in chunks of ``batch_size``."""
        total = torch.zeros_like(vectors)
        for chunk in index_chunks(indices, self.batch_size):
            total += self._loss_product(self._batch(chunk), vectors) * (len(chunk) / len(indices))
        return total + self._regulariser(vectors)

    def matvec(self, vectors: Tensor) -> Tensor:
        """H v over the whole training set, for v of shape [P] or [k, P]."""
        return self._mean_matvec(range(self.num_examples), vectors)

    def residual_matvec(self, vectors: Tensor, budget_examples: float = math.inf) -> tuple[Tensor, ResidualScope, int]:
        """H v for a residual check, with its scope and example count: the full H when the set fits the sample or a
        pass over it costs at most ``budget_examples`` example-HVPs (default: always), else the fixed sample's H."""
        if len(self.sample) == self.num_examples or self.num_examples <= budget_examples:
            return self.matvec(vectors), "full", self.num_examples
        return self._mean_matvec(self.sample, vectors), "sample", len(self.sample)

    def batch_matvec(self, vectors: Tensor, indices: Sequence[int]) -> Tensor:
        """H_B v: the objective's Hessian on the examples ``indices`` only (mean loss + L2 term)."""
        return self._loss_product(self._batch(indices), vectors) + self._regulariser(vectors)

    def dense(self, columns_per_pass: int = 256) -> Tensor:
        """The full P x P matrix, built from ``matvec`` on identity columns (for small P only), symmetrised."""
        eye = torch.eye(self.dim, dtype=self.flat.dtype, device=self.flat.device)
        blocks = [self.matvec(eye[i : i + columns_per_pass]) for i in range(0, self.dim, columns_per_pass)]
        matrix = torch.cat(blocks)
        return 0.5 * (matrix + matrix.T)
