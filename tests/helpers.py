"""Test helpers imported as a library (``from helpers import ...``): losses, a tight logistic-regression fit, a
tiny random BERT and ragged token batches."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from fastif import AdapterConfig, TensorData, TorchAdapter


def squared_error(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-example 0.5·(f(x) - y)²."""
    return 0.5 * (prediction.squeeze(-1) - target) ** 2


def logistic_loss(logit: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-example binary cross-entropy with logits."""
    return nn.functional.binary_cross_entropy_with_logits(logit.squeeze(-1), target, reduction="none")


def fit_logistic(x: np.ndarray, y: np.ndarray, l2: float, weights: np.ndarray | None = None, start=None) -> np.ndarray:
    """Minimise sum_i w_i·BCE_i / n + (l2/2)·‖θ‖² (θ = [w, b]) by L-BFGS to a tight tolerance."""
    from scipy.optimize import minimize

    n = len(y)
    weights = np.ones(n) if weights is None else weights
    design = np.hstack([x, np.ones((n, 1))])

    def objective(theta):
        logits = design @ theta
        losses = np.logaddexp(0.0, logits) - y * logits
        probabilities = 1.0 / (1.0 + np.exp(-logits))
        value = (weights * losses).sum() / n + 0.5 * l2 * theta @ theta
        gradient = design.T @ (weights * (probabilities - y)) / n + l2 * theta
        return value, gradient

    theta0 = np.zeros(design.shape[1]) if start is None else start
    result = minimize(
        objective, theta0, jac=True, method="L-BFGS-B", options={"gtol": 1e-12, "ftol": 1e-15, "maxiter": 10_000}
    )
    return result.x


def logistic_adapter(problem, theta=None) -> TorchAdapter:
    """A TorchAdapter over nn.Linear(30, 1) holding the fitted logistic-regression parameters."""
    theta = problem["theta"] if theta is None else theta
    model = nn.Linear(problem["x"].shape[1], 1).double()
    with torch.no_grad():
        model.weight.copy_(torch.as_tensor(theta[:-1])[None])
        model.bias.copy_(torch.as_tensor(theta[-1:]))
    return TorchAdapter(model, logistic_loss, AdapterConfig(l2=problem["l2"]))


def logistic_data(problem, indices) -> TensorData:
    return TensorData((torch.as_tensor(problem["x"][indices]), torch.as_tensor(problem["y"][indices])))


def tiny_bert(dtype: torch.dtype = torch.float32, num_labels: int = 3):
    """A 2-layer, 16-wide random BERT classifier with eager attention."""
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=60,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=32,
        num_labels=num_labels,
        attn_implementation="eager",
    )
    return BertForSequenceClassification(config).to(dtype).eval()


def token_batch(n: int, length: int = 9, seed: int = 0, num_labels: int = 3) -> dict[str, torch.Tensor]:
    """Random token ids with ragged padding, and labels."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 60, (n, length), generator=generator)
    lengths = torch.randint(3, length + 1, (n,), generator=generator)
    mask = (torch.arange(length)[None] < lengths[:, None]).long()
    return {
        "input_ids": ids * mask,
        "attention_mask": mask,
        "token_type_ids": torch.zeros_like(ids),
        "labels": torch.randint(0, num_labels, (n,), generator=generator),
    }
