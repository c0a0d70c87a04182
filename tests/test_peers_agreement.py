"""Agreement with captum, and self-influence.

fastif's Exact scores equal captum's ``NaiveInfluenceFunction`` scores after the mapping in docs/evaluation.md:
same sign (positive = helpful), captum's Hessian is of the *summed* loss, so ``hessian_reg = n·(l2 + damping)``
and ``captum = fastif / n``. The captum tests skip when captum (the optional ``peers`` extra) is not installed.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import logistic_data
from torch import nn

from fastif import AdapterConfig, Exact, Influence, ScoreConfig, TensorData, TorchAdapter
from fastif.errors import DataError

DAMPING = 1e-3


def _bce(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return nn.functional.binary_cross_entropy_with_logits(logits, targets, reduction="none")


def _model(problem) -> nn.Module:
    """Logistic regression as Linear + Flatten, so the output is [B] for both libraries' loss functions."""
    linear = nn.Linear(problem["x"].shape[1], 1).double()
    with torch.no_grad():
        linear.weight.copy_(torch.as_tensor(problem["theta"][:-1])[None])
        linear.bias.copy_(torch.as_tensor(problem["theta"][-1:]))
    return nn.Sequential(linear, nn.Flatten(0)).eval()


def _influence(problem, train: TensorData, chunk: int = 64) -> Influence:
    """fastif Exact over all parameters; the L2 term covers the bias too, as in the fitted objective."""
    adapter = TorchAdapter(_model(problem), _bce, AdapterConfig(l2=problem["l2"]))
    return Influence(adapter, train, Exact(damping=DAMPING), ScoreConfig(batch_size=chunk))


@pytest.fixture(scope="module")
def captum_naive():
    """A factory for captum's NaiveInfluenceFunction with fastif's Hessian mapped onto captum's convention."""
    influence_module = pytest.importorskip(
        "captum.influence", reason="captum is not installed: pip install -e '.[peers]' (or pip install captum)"
    )

    def build(problem, train: TensorData):
        x, y = train.tensors
        n = len(y)
        return influence_module.NaiveInfluenceFunction(
            _model(problem),
            torch.utils.data.TensorDataset(x, y),
            "unused",
            checkpoints_load_func=lambda model, path: 1.0,
            loss_fn=nn.BCEWithLogitsLoss(reduction="none"),
            batch_size=n,
            projection_dim=x.shape[1] + 1,  # every eigenpair: no low-rank truncation
            hessian_reg=n * (problem["l2"] + DAMPING),  # summed-loss Hessian: n·(H_mean + (l2 + damping)·I)
            hessian_inverse_tol=0.0,
        )

    return build


def test_exact_scores_equal_captum_naive_times_n(logistic, captum_naive):
    train = logistic_data(logistic, logistic["train"][:200])
    test = logistic_data(logistic, logistic["test"][:10])
    ours = _influence(logistic, train).scores(test).numpy()
    theirs = captum_naive(logistic, train).influence(test.tensors).double().numpy()
    n = len(train)
    assert np.corrcoef(ours.ravel(), theirs.ravel())[0, 1] >= 0.999
    np.testing.assert_allclose(theirs * n, ours, rtol=1e-4, atol=1e-6 * np.abs(ours).max())


def test_self_influence_equals_captum_naive_times_n(logistic, captum_naive):
    train = logistic_data(logistic, logistic["train"][:200])
    ours = _influence(logistic, train).self_influence().numpy()
    theirs = captum_naive(logistic, train).self_influence().double().numpy()
    assert np.corrcoef(ours, theirs)[0, 1] >= 0.999
    np.testing.assert_allclose(theirs * len(train), ours, rtol=1e-4, atol=1e-6 * ours.max())


def test_self_influence_is_the_diagonal_of_train_scores(logistic):
    train = logistic_data(logistic, logistic["train"][:120])
    influence = _influence(logistic, train, chunk=32)
    expected = torch.diagonal(influence.scores(train))
    torch.testing.assert_close(influence.self_influence(), expected, rtol=1e-9, atol=1e-12)
    assert bool((influence.self_influence() > 0).all())  # (H + damping·I) is positive definite here


def test_self_influence_indices_and_chunks_agree(logistic):
    train = logistic_data(logistic, logistic["train"][:90])
    influence = _influence(logistic, train)
    full = influence.self_influence(chunk=7)
    picked = [5, 0, 88, 41]
    torch.testing.assert_close(influence.self_influence(picked, chunk=3), full[picked])
    torch.testing.assert_close(influence.self_influence(chunk=90), full)


@pytest.mark.parametrize(
    ("indices", "chunk", "match"), [([90], None, r"\[0, 89\]"), ([], None, "empty"), (None, 0, "chunk")]
)
def test_self_influence_rejects_bad_arguments(logistic, indices, chunk, match):
    influence = _influence(logistic, logistic_data(logistic, logistic["train"][:90]))
    with pytest.raises(DataError, match=match):
        influence.self_influence(indices, chunk=chunk)
