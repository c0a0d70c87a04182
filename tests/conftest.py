"""Shared fixtures: small problems with known ground truth, and a tiny random BERT (helpers in helpers.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import fit_logistic, squared_error, tiny_bert
from sklearn.datasets import load_breast_cancer
from torch import nn

from fastif import AdapterConfig, HFClassifierAdapter, TensorData, TorchAdapter


@pytest.fixture
def ridge():
    """Ridge regression: 100 points, 10 features, L2 1e-2, float64; returns (adapter, train, test, X, l2)."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(120, 10, generator=generator, dtype=torch.float64)
    y = x @ torch.randn(10, generator=generator, dtype=torch.float64) + 0.1 * torch.randn(
        120, generator=generator, dtype=torch.float64
    )
    model = nn.Linear(10, 1, bias=False).double()
    with torch.no_grad():
        model.weight.copy_(torch.randn(1, 10, generator=generator, dtype=torch.float64))
    adapter = TorchAdapter(model, squared_error, AdapterConfig(l2=1e-2))
    return adapter, TensorData((x[:100], y[:100])), TensorData((x[100:], y[100:])), x[:100], 1e-2


@pytest.fixture(scope="session")
def logistic():
    """L2-regularised logistic regression on breast_cancer (standardised), trained to convergence, float64."""
    data = load_breast_cancer()
    x = (data.data - data.data.mean(0)) / data.data.std(0)
    y = data.target.astype(np.float64)
    order = np.random.default_rng(0).permutation(len(y))
    train, test = order[:400], order[400:]
    l2 = 1e-2
    theta = fit_logistic(x[train], y[train], l2)
    return {"x": x, "y": y, "train": train, "test": test, "l2": l2, "theta": theta}


@pytest.fixture
def bert_adapter():
    """Tiny BERT (float64) with influence over the top layer, pooler and classifier."""
    model = tiny_bert(torch.float64)
    config = AdapterConfig(
        include=("bert.encoder.layer.1", "bert.pooler", "classifier"), l2=1e-3, l2_exclude=("*bias", "*LayerNorm*")
    )
    return HFClassifierAdapter(model, config)


@pytest.fixture(scope="session", autouse=True)
def private_cache_root(tmp_path_factory):
    """Point the cache root at a session folder, so tests never read or fill the user's ``~/.cache/fastif``."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("FASTIF_CACHE", str(tmp_path_factory.mktemp("fastif-cache")))
        yield
