"""Multi-checkpoint TracIn and checkpoint ensembles (``fastif.checkpoints``): hand-computed sums on a linear model,
an ensemble of one = the plain facade, two identical checkpoints = one."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from fastif import CG, CheckpointInfluence, Influence
from fastif.checkpoints import load_checkpoint
from fastif.errors import DataError

RATES = (0.5, 0.2, 0.05)


def _thetas(count: int = 3) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(3)
    return [torch.randn(10, dtype=torch.float64, generator=generator) for _ in range(count)]


def _as(form: str, thetas: list[torch.Tensor], folder) -> list:
    """The checkpoints as flat vectors, state dicts or safetensors files."""
    if form == "flat":
        return thetas
    states = [{"weight": theta.reshape(1, -1).clone()} for theta in thetas]
    if form == "state":
        return states
    paths = [folder / f"checkpoint-{c}.safetensors" for c in range(len(states))]
    for path, state in zip(paths, states, strict=True):
        save_file(state, path)
    return paths


def _gradients(theta: torch.Tensor, data) -> torch.Tensor:
    """Per-example gradients of 0.5·(θ·x − y)²: (θ·x − y)·x."""
    x, y = data.tensors
    return (x @ theta - y)[:, None] * x


@pytest.mark.parametrize("form", ["flat", "state", "safetensors"])
def test_tracin_with_the_identity_solver_is_the_learning_rate_weighted_sum_of_gradient_dots(ridge, form, tmp_path):
    adapter, train, test, *_ = ridge
    before = adapter.flat_params()
    thetas = _thetas()
    tracin = CheckpointInfluence.tracin(adapter, train, _as(form, thetas, tmp_path), RATES)
    truth = sum(rate * _gradients(t, test) @ _gradients(t, train).T for rate, t in zip(RATES, thetas, strict=True))
    torch.testing.assert_close(tracin.scores(test), truth, rtol=1e-12, atol=1e-12)
    self_truth = sum(rate * _gradients(t, train).pow(2).sum(1) for rate, t in zip(RATES, thetas, strict=True))
    torch.testing.assert_close(tracin.self_influence(), self_truth, rtol=1e-12, atol=1e-12)
    assert torch.equal(adapter.flat_params(), before)  # the model's own parameters come back


def test_an_ensemble_of_one_is_the_plain_facade(ridge):
    adapter, train, test, *_ = ridge
    (theta,) = _thetas(1)
    ensemble = CheckpointInfluence(adapter, train, [theta], solver=CG(damping=0.1))
    scores, candidates = ensemble.scores(test), ensemble.candidate_scores(test, num_candidates=7)
    before = adapter.flat_params()
    adapter.load_flat_params(theta)
    plain = Influence(adapter, train, CG(damping=0.1))
    torch.testing.assert_close(scores, plain.scores(test), rtol=1e-12, atol=1e-12)
    expected = plain.candidate_scores(test, num_candidates=7)
    assert torch.equal(candidates.indices, expected.indices)
    torch.testing.assert_close(candidates.scores, expected.scores, rtol=1e-12, atol=1e-12)
    adapter.load_flat_params(before)


def test_two_identical_checkpoints_are_one(ridge):
    adapter, train, test, *_ = ridge
    (theta,) = _thetas(1)
    one = CheckpointInfluence(adapter, train, [theta], solver=CG(damping=0.1)).scores(test)
    two = CheckpointInfluence(adapter, train, [theta, theta.clone()], solver=CG(damping=0.1)).scores(test)
    torch.testing.assert_close(two, one, rtol=1e-12, atol=1e-12)
    split = CheckpointInfluence.tracin(adapter, train, [theta, theta], [0.3, 0.7]).scores(test)
    torch.testing.assert_close(split, CheckpointInfluence.tracin(adapter, train, [theta], [1.0]).scores(test))


def test_ensemble_candidates_are_the_last_checkpoints_scored_at_every_checkpoint(ridge):
    adapter, train, test, *_ = ridge
    thetas = _thetas(2)
    ensemble = CheckpointInfluence(adapter, train, thetas, solver=CG(damping=0.1))
    found = ensemble.candidate_scores(test, num_candidates=6)
    full = ensemble.scores(test)
    torch.testing.assert_close(found.scores, full.gather(1, found.indices), rtol=1e-12, atol=1e-12)
    adapter_copy = adapter.flat_params()
    adapter.load_flat_params(thetas[-1])
    last = Influence(adapter, train, CG(damping=0.1)).candidate_scores(test, num_candidates=6)
    adapter.load_flat_params(adapter_copy)
    assert torch.equal(found.indices, last.indices)
    assert not torch.allclose(found.scores, last.scores)


def test_bad_checkpoints_are_refused_with_the_fix(ridge, tmp_path):
    adapter, train, *_ = ridge
    pickle = tmp_path / "model.pt"
    torch.save({"weight": torch.zeros(1, 10)}, pickle)
    with pytest.raises(DataError, match="never unpickles: save it with safetensors"):
        load_checkpoint(adapter, pickle)
    with pytest.raises(DataError, match="must hold the 10 selected parameters"):
        load_checkpoint(adapter, torch.zeros(11, dtype=torch.float64))
    with pytest.raises(DataError, match=r"does not have: \['head.weight'\]"):
        load_checkpoint(adapter, {"head.weight": torch.zeros(1, 10)})
    with pytest.raises(DataError, match="2 weights for 1 checkpoints"):
        CheckpointInfluence(adapter, train, [torch.zeros(10)], [1.0, 2.0])
    with pytest.raises(DataError, match="leave cache unset"):
        CheckpointInfluence(adapter, train, [torch.zeros(10)], cache=object())
