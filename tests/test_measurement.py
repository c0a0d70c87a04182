"""Influence options the peers' users expect: a measurement other than the loss, and the Gauss-Newton Hessian,
checked against dense float64 computations, on the plain and the frozen path."""

from __future__ import annotations

import torch
from test_frozen import TokenData, _adapter
from torch import nn

from fastif import Exact, Influence, TensorData, TorchAdapter


def _problem(seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(60, 4, generator=generator, dtype=torch.float64)
    y = torch.randint(0, 3, (60,), generator=generator)
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    return TorchAdapter(model, nn.CrossEntropyLoss(reduction="none")), TensorData((x[:50], y[:50])), (x[50:], y[50:])


def _margin(logits: torch.Tensor, batch) -> torch.Tensor:
    """The gold logit minus the largest other logit."""
    labels = batch[1] if isinstance(batch, tuple | list) else batch["labels"]
    gold = logits.gather(1, labels[:, None])[:, 0]
    others = logits.masked_fill(nn.functional.one_hot(labels, logits.shape[1]).bool(), float("-inf"))
    return gold - others.max(dim=1).values


def test_a_measurement_replaces_the_test_loss_only() -> None:
    """With a margin measurement, s_test = (H + λI)⁻¹ ∇margin(test): equal to a dense solve with the gradient of the
    margin, while the training side (H and the training gradients) stays the loss's."""
    adapter, train, (x, y) = _problem()
    influence = Influence(adapter, train, Exact(damping=1.0), measurement=_margin)
    flat = adapter.flat_params()

    def margin_of(theta: torch.Tensor) -> torch.Tensor:
        return _margin(adapter.outputs(theta, (x[:3], y[:3])), (x[:3], y[:3]))

    gradients = torch.autograd.functional.jacobian(margin_of, flat)
    hessian = Influence(adapter, train, Exact(damping=1.0)).hessian.dense()
    expected = torch.linalg.solve(hessian + 1.0 * torch.eye(len(flat), dtype=flat.dtype), gradients.T).T
    torch.testing.assert_close(influence.s_test(TensorData((x[:3], y[:3]))), expected, rtol=1e-8, atol=1e-10)
    loss_measured = Influence(adapter, train, Exact(damping=1.0), measurement=adapter.loss_from_outputs)
    plain = Influence(adapter, train, Exact(damping=1.0))
    test = TensorData((x, y))
    torch.testing.assert_close(loss_measured.scores(test), plain.scores(test), rtol=1e-10, atol=1e-12)


def test_measurement_and_gauss_newton_on_the_frozen_path_equal_the_full_model() -> None:
    """The frozen path passes the model's outputs through: margin-measured scores under the Gauss-Newton Hessian are
    the same with the cache on and off (float64)."""
    adapter = _adapter("bert", 1)
    train, test = TokenData(20, 31), TokenData(2, 32)
    scores = {
        frozen: Influence(
            adapter, train, Exact(damping=0.5), frozen=frozen, hessian_kind="gauss-newton", measurement=_margin
        ).scores(test)
        for frozen in ("on", "off")
    }
    torch.testing.assert_close(scores["on"], scores["off"], rtol=1e-8, atol=1e-12)


def test_gauss_newton_through_the_facade_is_psd_without_damping() -> None:
    """On a tanh MLP the Hessian is indefinite, the Gauss-Newton matrix is not: Exact solves it at a damping far
    below the Hessian's most negative eigenvalue."""
    adapter, train, (x, y) = _problem(0)
    influence = Influence(adapter, train, Exact(damping=1e-4), hessian_kind="gauss-newton")
    eigenvalues = torch.linalg.eigvalsh(influence.hessian.dense())
    hessian_eigenvalues = torch.linalg.eigvalsh(Influence(adapter, train).hessian.dense())
    assert float(eigenvalues.min()) >= -1e-10 and float(hessian_eigenvalues.min()) < -1e-2
    assert torch.isfinite(influence.scores(TensorData((x, y)))).all()
