"""Separate dtypes for gradients and scores (``ScoreConfig(grad_dtype=..., score_dtype=...)``): float64 throughout
equals the default path, and float64 accumulation keeps a cancelling sum that float32 throughout loses."""

from __future__ import annotations

import pytest
import torch
from helpers import squared_error
from torch import nn

from fastif import AdapterConfig, Identity, Influence, ScoreConfig, TensorData, TorchAdapter
from fastif.errors import ConfigError


def _linear(dim: int) -> TorchAdapter:
    """A float64 linear model at w = 0 without L2: the loss gradient of (x, y) is exactly -y·x."""
    model = nn.Linear(dim, 1, bias=False).double()
    nn.init.zeros_(model.weight)
    return TorchAdapter(model, squared_error, AdapterConfig(l2=0.0))


def _cancelling_pair(pairs: int = 64) -> tuple[TensorData, TensorData]:
    """One test and one training point whose gradients' products are +b², -b² (b integers below 2^12, so every
    gradient entry and product is exact in float32) and a final 1: the score is 1, the terms' sum of magnitudes
    ~5e8, past float32's 2^24 integer range."""
    b = torch.randint(1000, 4000, (pairs,), generator=torch.Generator().manual_seed(0)).double()
    order = torch.randperm(2 * pairs + 1, generator=torch.Generator().manual_seed(1))
    test_x = torch.cat([b, b, torch.ones(1)])[order]
    train_x = torch.cat([b, -b, torch.ones(1)])[order]
    ones = torch.ones(1, dtype=torch.float64)
    return TensorData((train_x[None], ones)), TensorData((test_x[None], ones))


def _scores(train: TensorData, test: TensorData, **dtypes: str) -> torch.Tensor:
    adapter = _linear(train.tensors[0].shape[1])
    return Influence(adapter, train, Identity(), ScoreConfig(method="grad", **dtypes)).scores(test)


def test_float64_gradients_and_scores_equal_the_default_path_and_a_loop(ridge):
    adapter, train, test, *_ = ridge
    default = Influence(adapter, train, Identity(), ScoreConfig(method="grad")).scores(test)
    wide = Influence(adapter, train, Identity(), ScoreConfig(grad_dtype="float64", score_dtype="float64"))
    assert torch.equal(wide.scores(test), default)
    gradients = wide.test_grads(train)
    loop = torch.stack([torch.stack([g @ t for g in gradients]) for t in wide.test_grads(test)])
    torch.testing.assert_close(default, loop, rtol=1e-12, atol=1e-12)


def test_float32_gradients_accumulated_in_float64_keep_a_cancelling_sum_that_float32_throughout_loses():
    train, test = _cancelling_pair()
    reference = _scores(train, test)
    assert reference.item() == 1.0
    mixed = _scores(train, test, grad_dtype="float32", score_dtype="float64")
    narrow = _scores(train, test, grad_dtype="float32", score_dtype="float32")
    assert mixed.dtype == torch.float64 and narrow.dtype == torch.float32
    assert mixed.item() == 1.0  # float32-exact gradients, products exact in float64
    assert abs(narrow.item() - 1.0) > 0.5  # the partial sums round at float32's ulp (32-64 here)


def test_bfloat16_gradients_score_within_their_rounding_and_come_back_in_the_score_dtype(ridge):
    adapter, train, test, *_ = ridge
    exact = Influence(adapter, train, Identity(), ScoreConfig(method="grad")).scores(test)
    rounded = Influence(adapter, train, Identity(), ScoreConfig(grad_dtype="bfloat16", score_dtype="float32"))
    scores = rounded.scores(test)
    assert scores.dtype == torch.float32
    bound = 2**-8 * (rounded.test_grads(test).abs() @ rounded.test_grads(train).abs().T)  # bf16's unit roundoff
    assert bool(((scores.double() - exact).abs() <= bound + 1e-6).all())
    assert not torch.allclose(scores.double(), exact, rtol=1e-6, atol=0)


def test_a_dtype_option_turns_auto_to_the_gradient_path_and_jvp_refuses_it():
    assert ScoreConfig(score_dtype="float64").casts and not ScoreConfig().casts
    with pytest.raises(ConfigError, match="method='jvp' never forms"):
        ScoreConfig(method="jvp", score_dtype="float64")
    with pytest.raises(ConfigError, match=r"grad_dtype must be one of .*float64"):
        ScoreConfig(grad_dtype="float8")


def test_float16_overflow_names_the_dtype_not_the_model():
    train, test = _cancelling_pair()
    scaled = TensorData((train.tensors[0] * 100, train.tensors[1]))  # entries up to 4e5 > float16's 65,504
    with pytest.raises(ConfigError, match="overflow grad_dtype=float16; use bfloat16"):
        _scores(scaled, test, grad_dtype="float16")
