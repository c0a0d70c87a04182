"""Tasks (a) and (b): softmax regression and a small MLP on scikit-learn's digits, trained to a tight optimum.

Both models are float64 and minimise ``mean CE + (l2 / 2)·‖θ‖²`` over *all* parameters (biases included), so
every library's Hessian convention maps onto fastif's exactly (see docs/evaluation.md). Training runs L-BFGS and then
Newton steps to a gradient norm below 1e-12. Leave-one-out retraining starts from the trained parameters and takes
chord Newton steps (the trained model's Hessian, factorised once) to the same precision: exact retraining for the
convex softmax regression, and the local retraining influence functions model for the MLP. LDS retraining on 50%
subsets starts there too and runs L-BFGS to a max-abs gradient of 1e-6 (subset effects are far larger than that).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from sklearn.datasets import load_digits
from torch import Tensor, nn

from fastif import AdapterConfig, TensorData, TorchAdapter
from fastif.evaluation import flip_labels

NUM_CLASSES = 10


@dataclass(frozen=True)
class DigitsSpec:
    """One digits problem: model kind, sizes, L2, damping, seed and optional label noise."""

    kind: str  # "logreg" or "mlp"
    n_train: int = 1000
    n_test: int = 50
    l2: float = 1e-3
    damping: float = 0.0
    hidden: int = 32
    flip_fraction: float = 0.0
    seed: int = 0


@dataclass
class DigitsProblem:
    """A trained model with its data, objective and retraining function (all float64 tensors)."""

    spec: DigitsSpec
    model: nn.Module
    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor
    flipped: np.ndarray | None = None
    info: dict = field(default_factory=dict)
    info_cache: dict = field(default_factory=dict, repr=False)

    @property
    def train(self) -> TensorData:
        """The training set as a fastif dataset."""
        return TensorData((self.x_train, self.y_train))

    @property
    def test(self) -> TensorData:
        """The test set as a fastif dataset."""
        return TensorData((self.x_test, self.y_test))

    @property
    def num_params(self) -> int:
        """Number of parameters P (influence is taken over all of them)."""
        return sum(p.numel() for p in self.model.parameters())

    def adapter(self) -> TorchAdapter:
        """A fastif adapter over all parameters with the training L2 term."""
        return TorchAdapter(copy.deepcopy(self.model), per_example_ce, AdapterConfig(l2=self.spec.l2))

    def retrain(self, kept: np.ndarray) -> nn.Module:
        """The model retrained exactly on the training rows ``kept`` (leave-one-out), warm-started.

        Chord Newton steps with the trained model's Hessian (factorised once) converge to machine precision in a
        few gradient evaluations when one point is left out; full Newton / L-BFGS take over if they do not.
        """
        model = copy.deepcopy(self.model)
        index = torch.as_tensor(kept, dtype=torch.long)
        x, y = self.x_train[index], self.y_train[index]
        if "cholesky" not in self.info_cache:
            self.info_cache["cholesky"] = torch.linalg.cholesky(
                flat_hessian(self.model, self.x_train, self.y_train, self.spec.l2)
            )
        chord_newton(model, x, y, self.spec.l2, self.info_cache["cholesky"])
        if gradient_norm(model, x, y, self.spec.l2) > 1e-10:
            fit(model, x, y, self.spec.l2, warm=True)
        return model

    def retrain_subset(self, kept: np.ndarray) -> nn.Module:
        """The model retrained on a large subset ``kept`` (LDS), warm-started, by L-BFGS to gradient 1e-6."""
        model = copy.deepcopy(self.model)
        index = torch.as_tensor(kept, dtype=torch.long)
        lbfgs(model, self.x_train[index], self.y_train[index], self.spec.l2, max_iter=2000)
        return model

    def test_losses(self, model: nn.Module) -> np.ndarray:
        """Per-test cross-entropy [n_test]."""
        with torch.no_grad():
            return per_example_ce(model(self.x_test), self.y_test).numpy()

    def test_margins(self, model: nn.Module) -> np.ndarray:
        """Per-test margin: correct logit minus log-sum-exp of the others (higher = better supported)."""
        with torch.no_grad():
            logits = model(self.x_test)
            correct = logits.gather(1, self.y_test[:, None])[:, 0]
            others = logits.scatter(1, self.y_test[:, None], float("-inf"))
            return (correct - torch.logsumexp(others, dim=1)).numpy()


def per_example_ce(logits: Tensor, targets: Tensor) -> Tensor:
    """Cross-entropy per example (no reduction)."""
    return nn.functional.cross_entropy(logits, targets, reduction="none")


def make_model(spec: DigitsSpec) -> nn.Module:
    """Softmax regression (650 parameters) or a 64-32-10 tanh MLP (2,410 parameters), float64, seeded."""
    torch.manual_seed(spec.seed)
    if spec.kind == "logreg":
        return nn.Sequential(nn.Linear(64, NUM_CLASSES)).double()
    if spec.kind == "mlp":
        return nn.Sequential(nn.Linear(64, spec.hidden), nn.Tanh(), nn.Linear(spec.hidden, NUM_CLASSES)).double()
    raise ValueError(f"unknown model kind {spec.kind!r}; use 'logreg' or 'mlp'")


def objective(model: nn.Module, x: Tensor, y: Tensor, l2: float) -> Tensor:
    """Mean cross-entropy plus (l2 / 2)·‖θ‖² over all parameters."""
    penalty = sum(p.square().sum() for p in model.parameters())
    return per_example_ce(model(x), y).mean() + 0.5 * l2 * penalty


def lbfgs(model: nn.Module, x: Tensor, y: Tensor, l2: float, max_iter: int) -> None:
    """Full-batch L-BFGS with strong Wolfe line search, to a max-abs gradient of 1e-6."""
    optimizer = torch.optim.LBFGS(
        model.parameters(),
        lr=1.0,
        max_iter=max_iter,
        tolerance_grad=1e-6,
        tolerance_change=1e-12,
        history_size=50,
        line_search_fn="strong_wolfe",
    )

    def closure() -> Tensor:
        optimizer.zero_grad()
        loss = objective(model, x, y, l2)
        loss.backward()
        return loss

    optimizer.step(closure)


def fit(model: nn.Module, x: Tensor, y: Tensor, l2: float, max_iter: int = 500, warm: bool = False) -> float:
    """Minimise the objective to machine precision (L-BFGS, then Newton steps); return ‖∇‖.

    ``warm`` (start near the optimum): Newton steps first, L-BFGS only if they do not reach a gradient of 1e-10.
    """
    if warm:
        newton_polish(model, x, y, l2)
        if gradient_norm(model, x, y, l2) < 1e-10:
            return gradient_norm(model, x, y, l2)
    lbfgs(model, x, y, l2, max_iter)
    newton_polish(model, x, y, l2)
    return gradient_norm(model, x, y, l2)


def _flat_objective(model: nn.Module, x: Tensor, y: Tensor, l2: float) -> Callable[[Tensor], Tensor]:
    """The objective as a function of one flat parameter vector (model order)."""
    names = [name for name, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    sizes = [p.numel() for p in model.parameters()]

    def value(theta: Tensor) -> Tensor:
        params = {n: t.view(s) for n, t, s in zip(names, torch.split(theta, sizes), shapes, strict=True)}
        logits = torch.func.functional_call(model, params, (x,))
        return per_example_ce(logits, y).mean() + 0.5 * l2 * theta.square().sum()

    return value


def _flat(model: nn.Module) -> Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def _load(model: nn.Module, theta: Tensor) -> None:
    with torch.no_grad():
        for parameter, piece in zip(
            model.parameters(), torch.split(theta, [p.numel() for p in model.parameters()]), strict=True
        ):
            parameter.copy_(piece.view(parameter.shape))


def flat_hessian(model: nn.Module, x: Tensor, y: Tensor, l2: float) -> Tensor:
    """The dense Hessian of the objective at the model's parameters (P x P; P is at most a few thousand)."""
    return torch.func.hessian(_flat_objective(model, x, y, l2))(_flat(model))


def newton_polish(model: nn.Module, x: Tensor, y: Tensor, l2: float, steps: int = 6) -> None:
    """A few exact Newton steps from near the optimum, each accepted only if it lowers the objective."""
    objective_fn = _flat_objective(model, x, y, l2)
    theta = _flat(model)
    value = objective_fn(theta)
    for _ in range(steps):
        gradient = torch.func.grad(objective_fn)(theta)
        if float(gradient.norm()) < 1e-12:
            break
        try:
            candidate = theta - torch.linalg.solve(torch.func.hessian(objective_fn)(theta), gradient)
        except torch.linalg.LinAlgError:
            break  # a singular Hessian (an MLP's flat directions): leave the rest to L-BFGS
        new_value = objective_fn(candidate)
        if not bool(new_value <= value):
            break  # not a descent step (indefinite Hessian far from a minimum): keep what we have
        theta, value = candidate, new_value
    _load(model, theta)


def chord_newton(model: nn.Module, x: Tensor, y: Tensor, l2: float, cholesky: Tensor, steps: int = 50) -> None:
    """Newton steps with a fixed (base-model) Hessian factor: cheap, and fast to converge after a small change."""
    gradient_fn = torch.func.grad(_flat_objective(model, x, y, l2))
    theta = _flat(model)
    for _ in range(steps):
        gradient = gradient_fn(theta)
        if not bool(torch.isfinite(gradient).all()) or float(gradient.norm()) < 1e-13:
            break
        theta = theta - torch.cholesky_solve(gradient[:, None], cholesky)[:, 0]
    _load(model, theta)


def gradient_norm(model: nn.Module, x: Tensor, y: Tensor, l2: float) -> float:
    """‖∇ objective‖ at the model's parameters: how close to the optimum influence functions assume."""
    grads = torch.autograd.grad(objective(model, x, y, l2), list(model.parameters()))
    return float(torch.cat([g.reshape(-1) for g in grads]).norm())


def digits_data(spec: DigitsSpec) -> tuple[Tensor, Tensor, Tensor, Tensor, np.ndarray | None]:
    """Scaled digits (pixels / 16) split by a seeded permutation; training labels flipped if asked."""
    digits = load_digits()
    order = np.random.default_rng(spec.seed).permutation(len(digits.target))
    train, test = order[: spec.n_train], order[spec.n_train : spec.n_train + spec.n_test]
    x = torch.as_tensor(digits.data / 16.0, dtype=torch.float64)
    y = digits.target.astype(np.int64)
    y_train, flipped = y[train], None
    if spec.flip_fraction > 0:
        y_train, flipped = flip_labels(y_train, spec.flip_fraction, NUM_CLASSES, seed=spec.seed)
    return x[train], torch.as_tensor(y_train), x[test], torch.as_tensor(y[test]), flipped


def build_problem(spec: DigitsSpec) -> DigitsProblem:
    """Load the data and train the model to a tight optimum."""
    x_train, y_train, x_test, y_test, flipped = digits_data(spec)
    model = make_model(spec)
    norm = fit(model, x_train, y_train, spec.l2, max_iter=10_000)
    with torch.no_grad():
        accuracy = float((model(x_test).argmax(1) == y_test).double().mean())
    info = {"gradient_norm": norm, "test_accuracy": accuracy, "num_params": sum(p.numel() for p in model.parameters())}
    return DigitsProblem(spec, model.eval(), x_train, y_train, x_test, y_test, flipped, info)


def timed_retraining(fn: Callable[[], np.ndarray]) -> tuple[np.ndarray, float]:
    """Run a retraining ground-truth computation and report its wall time alongside."""
    import time

    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start
