"""Gauss-Newton Hessian: equals H for linear least squares, PSD on an MLP, and J_iᵀ(diag p − ppᵀ)J_i for softmax CE."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.func import functional_call, jacrev

from fastif import AdapterConfig, Hessian, ModelAdapter, TensorData, TorchAdapter
from fastif.errors import ModelError


def _mlp(inputs: int = 4, hidden: int = 5, outputs: int = 3) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(inputs, hidden), nn.Tanh(), nn.Linear(hidden, outputs)).double()


def _classification(n: int = 12) -> TensorData:
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(n, 4, generator=generator, dtype=torch.float64)
    return TensorData((x, torch.randint(0, 3, (n,), generator=generator)))


def _cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(logits, targets, reduction="none")


def test_equals_the_hessian_for_linear_least_squares(ridge):
    adapter, train, *_ = ridge
    exact = Hessian(adapter, train).dense()
    assert torch.allclose(Hessian(adapter, train, kind="gauss-newton", batch_size=32).dense(), exact, atol=1e-12)


def test_is_psd_on_an_mlp_where_the_hessian_is_not():
    adapter = TorchAdapter(_mlp(), _cross_entropy)
    data = _classification()
    newton = torch.linalg.eigvalsh(Hessian(adapter, data, kind="gauss-newton").dense())
    assert float(newton.min()) >= -1e-10
    assert float(torch.linalg.eigvalsh(Hessian(adapter, data).dense()).min()) < -1e-6


def test_equals_the_dense_softmax_formula_on_a_tiny_mlp():
    model = _mlp()
    adapter = TorchAdapter(model, _cross_entropy, AdapterConfig(l2=0.1, l2_exclude=("*bias",)))
    data = _classification()
    (x, _), flat = data.tensors, adapter.flat_params()

    def logits(theta: torch.Tensor) -> torch.Tensor:
        return functional_call(model, adapter.space.unflatten(theta), (x,))

    jacobian = jacrev(logits)(flat)  # [n, C, P]
    p = torch.softmax(logits(flat), dim=1)
    curvature = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
    truth = torch.einsum("ncp,ncd,ndq->pq", jacobian, curvature, jacobian) / len(data)
    truth += 0.1 * torch.diag(adapter.l2_mask)
    assert torch.allclose(Hessian(adapter, data, kind="gauss-newton", batch_size=5).dense(), truth, atol=1e-12)


def test_uses_the_adapters_own_output_methods_when_it_has_them():
    class Doubled(TorchAdapter):
        """Outputs twice the logits and halves them in the loss: the same objective, a different split."""

        calls = 0

        def outputs(self, flat, batch):
            Doubled.calls += 1
            return 2 * self.functional_call(self.space.unflatten(flat), (batch[0],), {})

        def loss_from_outputs(self, outputs, batch):
            return _cross_entropy(outputs / 2, batch[1])

    data = _classification()
    plain = Hessian(TorchAdapter(_mlp(), _cross_entropy), data, kind="gauss-newton").dense()
    doubled = Hessian(Doubled(_mlp(), _cross_entropy), data, kind="gauss-newton").dense()
    assert Doubled.calls > 0
    assert torch.allclose(doubled, plain, atol=1e-12)


def test_an_adapter_without_outputs_is_refused():
    class LossOnly(ModelAdapter):
        """An adapter that knows only its loss."""

        def _loss(self, params, batch):
            return _cross_entropy(self.functional_call(params, (batch[0],), {}), batch[1])

    with pytest.raises(ModelError, match=r"outputs apart from its loss.*kind='hessian'"):
        Hessian(LossOnly(_mlp()), _classification(), kind="gauss-newton")
