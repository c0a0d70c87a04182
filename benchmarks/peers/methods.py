"""Every measured method on a digits problem, each returning fastif's convention and scale.

A method gives ``scores(problem) -> [n_test, n_train]`` and ``self_influence(problem) -> [n_train]`` with
``score = ∇L(test)ᵀ (H_mean + (l2 + damping)·I)⁻¹ ∇L(train)``, positive = helpful. The peers' own conventions are
mapped here (and documented in docs/evaluation.md):

* captum sums the loss over the Hessian set and takes ``hessian_reg`` as its diagonal shift, so it gets
  ``hessian_reg = n·(l2 + damping)`` and its scores are multiplied by ``n``; TracInCP with one checkpoint and
  learning rate 1 is plain gradient similarity (fastif's ``Identity``).
* dattri takes the mean loss we give it and adds ``regularization`` (CG, Arnoldi) to the Hessian; its LiSSA fixed
  point is ``(H + damping·scaling)⁻¹``, so it gets ``damping = (l2 + damping) / scaling``.
* kronfluence's EK-FAC approximates the Gauss-Newton matrix of the mean loss and adds ``damping_factor``.

Peers are imported lazily: a missing peer only removes its methods.
"""

from __future__ import annotations

import copy
import importlib.util
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from fastif import CG, Arnoldi, Exact, Identity, Influence, LiSSA, ScoreConfig, Solver

from .digits_problems import DigitsProblem


@dataclass(frozen=True)
class Settings:
    """Shared solver budgets: every pair of counterparts gets the same numbers."""

    cg_iterations: int = 100
    cg_tolerance: float = 1e-6  # fastif's relative residual; dattri ignores its tol and runs every iteration
    lissa_depth: int = 500
    lissa_batch: int = 32
    lissa_scale: float = 30.0
    arnoldi_rank: int = 50
    arnoldi_iterations: int = 100


@dataclass(frozen=True)
class Method:
    """A named method: its library, its fastif counterpart, and its two runners."""

    name: str
    library: str
    counterpart: str
    scores: Callable[[DigitsProblem], np.ndarray]
    self_influence: Callable[[DigitsProblem], np.ndarray]
    iterative: bool = False  # one iterative solve per vector: self-influence would need n_train solves


def shift(problem: DigitsProblem) -> float:
    """The total diagonal shift l2 + damping that every method adds to the mean-loss Hessian."""
    return problem.spec.l2 + problem.spec.damping


# ---------------------------------------------------------------------------------------------- fastif


def fastif_solver(kind: str, problem: DigitsProblem, settings: Settings) -> Solver:
    """fastif's solver of ``kind`` with the problem's damping and the shared budgets."""
    damping = problem.spec.damping
    if kind == "exact":
        return Exact(damping=damping)
    if kind == "cg":
        return CG(damping=damping, max_iterations=settings.cg_iterations, tolerance=settings.cg_tolerance)
    if kind == "lissa":
        return LiSSA(
            damping=damping, depth=settings.lissa_depth, batch_size=settings.lissa_batch, scale=settings.lissa_scale
        )
    if kind == "arnoldi":
        return Arnoldi(damping=damping, rank=settings.arnoldi_rank, iterations=settings.arnoldi_iterations)
    if kind == "identity":
        return Identity()
    raise ValueError(f"unknown fastif solver {kind!r}")


def fastif_influence(kind: str, problem: DigitsProblem, settings: Settings) -> Influence:
    """The facade over all parameters: whole-set score batches, Hessian batches of 250 (the problems are small)."""
    n = len(problem.y_train)
    score = ScoreConfig(method="grad", batch_size=n, chunk_size=n)
    return Influence(problem.adapter(), problem.train, fastif_solver(kind, problem, settings), score, 250)


def fastif_method(kind: str, label: str, counterpart: str, settings: Settings) -> Method:
    """A fastif method: ``Influence.scores`` and ``Influence.self_influence``."""
    return Method(
        f"fastif {label}",
        "fastif",
        counterpart,
        lambda p: fastif_influence(kind, p, settings).scores(p.test).numpy(),
        lambda p: fastif_influence(kind, p, settings).self_influence().numpy(),
        iterative=kind in ("cg", "lissa"),
    )


# ---------------------------------------------------------------------------------------------- captum


def _captum_model(problem: DigitsProblem) -> nn.Module:
    return copy.deepcopy(problem.model)


def _no_checkpoint(model: nn.Module, path: str) -> float:
    """captum loads a checkpoint per run; ours is already in the model. Learning rate 1."""
    return 1.0


def _captum_loss(reduction: str) -> nn.Module:
    return nn.CrossEntropyLoss(reduction=reduction)


def captum_influence(kind: str, problem: DigitsProblem, settings: Settings):
    """captum's NaiveInfluenceFunction / ArnoldiInfluenceFunction / TracInCP on the trained model."""
    from captum.influence import NaiveInfluenceFunction, TracInCP
    from captum.influence._core.arnoldi_influence_function import ArnoldiInfluenceFunction

    n = len(problem.y_train)
    train = TensorDataset(problem.x_train, problem.y_train)
    common = {"checkpoints_load_func": _no_checkpoint, "batch_size": n}
    if kind == "tracincp":
        loss = _captum_loss("sum")
        model = _captum_model(problem)
        return TracInCP(model, train, ["final"], loss_fn=loss, sample_wise_grads_per_batch=True, **common)
    reg = n * shift(problem)
    if kind == "naive":
        return NaiveInfluenceFunction(
            _captum_model(problem),
            train,
            "final",
            loss_fn=_captum_loss("none"),
            projection_dim=problem.num_params,
            hessian_reg=reg,
            hessian_inverse_tol=0.0,
            **common,
        )
    return ArnoldiInfluenceFunction(
        _captum_model(problem),
        train,
        "final",
        loss_fn=_captum_loss("none"),
        projection_dim=settings.arnoldi_rank,
        arnoldi_dim=settings.arnoldi_iterations,
        hessian_reg=reg,
        hessian_inverse_tol=0.0,
        **common,
    )


def captum_method(kind: str, label: str, counterpart: str, settings: Settings) -> Method:
    """A captum method, rescaled by n for the influence-function classes (sum-loss Hessian)."""

    def factor(problem: DigitsProblem) -> float:
        return 1.0 if kind == "tracincp" else float(len(problem.y_train))

    def scores(problem: DigitsProblem) -> np.ndarray:
        influence = captum_influence(kind, problem, settings)
        return influence.influence((problem.x_test, problem.y_test)).double().numpy() * factor(problem)

    def self_influence(problem: DigitsProblem) -> np.ndarray:
        influence = captum_influence(kind, problem, settings)
        return influence.self_influence().double().numpy() * factor(problem)

    return Method(f"captum {label}", "captum", counterpart, scores, self_influence)


# ---------------------------------------------------------------------------------------------- dattri


def dattri_attributor(kind: str, problem: DigitsProblem, settings: Settings):
    """dattri's IFAttributor{CG,LiSSA,Arnoldi} on the mean cross-entropy, cached on the whole training set."""
    from dattri.algorithm.influence_function import IFAttributorArnoldi, IFAttributorCG, IFAttributorLiSSA
    from dattri.task import AttributionTask

    model = copy.deepcopy(problem.model)

    def loss_func(params: dict[str, Tensor], data: tuple[Tensor, Tensor]) -> Tensor:
        x, y = data  # dattri's LiSSA collate casts inputs to float32: cast back to the model's dtype
        logits = torch.func.functional_call(model, params, (x.to(problem.x_train.dtype),))
        return nn.functional.cross_entropy(logits, y.long())

    task = AttributionTask(loss_func=loss_func, model=model, checkpoints=model.state_dict())
    reg = shift(problem)
    if kind == "cg":
        attributor = IFAttributorCG(
            task, max_iter=settings.cg_iterations, tol=settings.cg_tolerance, regularization=reg
        )
    elif kind == "lissa":
        attributor = IFAttributorLiSSA(
            task,
            batch_size=settings.lissa_batch,
            recursion_depth=settings.lissa_depth,
            damping=reg / settings.lissa_scale,
            scaling=settings.lissa_scale,
        )
    else:
        attributor = IFAttributorArnoldi(
            task, proj_dim=settings.arnoldi_rank, max_iter=settings.arnoldi_iterations, regularization=reg
        )
    attributor.cache(_loader(problem.x_train, problem.y_train))
    return attributor


@contextmanager
def default_dtype(dtype: torch.dtype) -> Iterator[None]:
    """Run with torch's default dtype set to the model's (dattri's Arnoldi draws its start vector in it)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def _loader(x: Tensor, y: Tensor) -> DataLoader:
    """One batch holding every example: dattri solves once per (train batch, test batch) pair."""
    return DataLoader(TensorDataset(x, y), batch_size=len(y), shuffle=False)


def dattri_method(kind: str, label: str, counterpart: str, settings: Settings) -> Method:
    """A dattri method; its [n_train, n_test] output is transposed."""

    def scores(problem: DigitsProblem) -> np.ndarray:
        with default_dtype(problem.x_train.dtype):
            attributor = dattri_attributor(kind, problem, settings)
            train, test = _loader(problem.x_train, problem.y_train), _loader(problem.x_test, problem.y_test)
            return attributor.attribute(train, test).T.detach().double().numpy()

    def self_influence(problem: DigitsProblem) -> np.ndarray:
        with default_dtype(problem.x_train.dtype):
            attributor = dattri_attributor(kind, problem, settings)
            return attributor.self_attribute(_loader(problem.x_train, problem.y_train)).detach().double().numpy()

    return Method(f"dattri {label}", "dattri", counterpart, scores, self_influence, iterative=kind in ("cg", "lissa"))


# ---------------------------------------------------------------------------------------------- kronfluence


def kronfluence_task():
    """kronfluence's Task for classification: summed CE, labels sampled from the model for the true Fisher."""
    from kronfluence.task import Task

    class ClassificationTask(Task):
        def compute_train_loss(self, batch: tuple[Tensor, Tensor], model: nn.Module, sample: bool = False) -> Tensor:
            x, y = batch
            logits = model(x)
            if sample:
                with torch.no_grad():
                    y = torch.multinomial(torch.softmax(logits.detach(), dim=-1), 1).flatten()
            return nn.functional.cross_entropy(logits, y, reduction="sum")

        def compute_measurement(self, batch: tuple[Tensor, Tensor], model: nn.Module) -> Tensor:
            x, y = batch
            return nn.functional.cross_entropy(model(x), y, reduction="sum")

    return ClassificationTask()


def kronfluence_analyzer(problem: DigitsProblem, output_dir: str):
    """An EK-FAC analyzer with float64 factors, fitted on the whole training set."""
    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.arguments import FactorArguments

    task = kronfluence_task()
    model = prepare_model(copy.deepcopy(problem.model), task)
    analyzer = Analyzer("digits", model, task, cpu=True, disable_tqdm=True, output_dir=output_dir)
    f64 = torch.float64
    factor_args = FactorArguments(
        strategy="ekfac",
        activation_covariance_dtype=f64,
        gradient_covariance_dtype=f64,
        per_sample_gradient_dtype=f64,
        lambda_dtype=f64,
    )
    train = TensorDataset(problem.x_train, problem.y_train)
    analyzer.fit_all_factors(
        "ekfac", train, per_device_batch_size=len(train), factor_args=factor_args, overwrite_output_dir=True
    )
    return analyzer


def kronfluence_score_args(problem: DigitsProblem):
    """Score arguments: float64 throughout, damping = l2 + damping."""
    from kronfluence.arguments import ScoreArguments

    f64 = torch.float64
    return ScoreArguments(
        damping_factor=shift(problem), per_sample_gradient_dtype=f64, precondition_dtype=f64, score_dtype=f64
    )


def kronfluence_method(settings: Settings) -> Method:
    """kronfluence EK-FAC: factors, then pairwise or self scores (its files go to a temporary folder)."""

    def scores(problem: DigitsProblem) -> np.ndarray:
        with tempfile.TemporaryDirectory() as folder:
            analyzer = kronfluence_analyzer(problem, folder)
            train, test = TensorDataset(problem.x_train, problem.y_train), TensorDataset(problem.x_test, problem.y_test)
            analyzer.compute_pairwise_scores(
                "pairwise",
                "ekfac",
                test,
                train,
                per_device_query_batch_size=len(test),
                per_device_train_batch_size=len(train),
                score_args=kronfluence_score_args(problem),
                overwrite_output_dir=True,
            )
            return analyzer.load_pairwise_scores("pairwise")["all_modules"].double().numpy()

    def self_influence(problem: DigitsProblem) -> np.ndarray:
        with tempfile.TemporaryDirectory() as folder:
            analyzer = kronfluence_analyzer(problem, folder)
            train = TensorDataset(problem.x_train, problem.y_train)
            analyzer.compute_self_scores(
                "self",
                "ekfac",
                train,
                per_device_train_batch_size=len(train),
                score_args=kronfluence_score_args(problem),
                overwrite_output_dir=True,
            )
            return analyzer.load_self_scores("self")["all_modules"].double().numpy()

    return Method("kronfluence EK-FAC", "kronfluence", "fastif Exact", scores, self_influence)


# ---------------------------------------------------------------------------------------------- registry


def installed(package: str) -> bool:
    """Whether a peer library can be imported."""
    return importlib.util.find_spec(package) is not None


def all_methods(settings: Settings) -> list[Method]:
    """fastif's methods followed by every installed peer's, each peer naming its fastif counterpart."""
    methods = [
        fastif_method("exact", "Exact", "fastif Exact", settings),
        fastif_method("cg", "CG", "fastif CG", settings),
        fastif_method("lissa", "LiSSA", "fastif LiSSA", settings),
        fastif_method("arnoldi", "Arnoldi", "fastif Arnoldi", settings),
        fastif_method("identity", "Identity", "fastif Identity", settings),
    ]
    if installed("captum"):
        methods += [
            captum_method("naive", "NaiveInfluenceFunction", "fastif Exact", settings),
            captum_method("arnoldi", "ArnoldiInfluenceFunction", "fastif Arnoldi", settings),
            captum_method("tracincp", "TracInCP", "fastif Identity", settings),
        ]
    if installed("kronfluence"):
        methods.append(kronfluence_method(settings))
    if installed("dattri"):
        methods += [
            dattri_method("cg", "CG", "fastif CG", settings),
            dattri_method("lissa", "LiSSA", "fastif LiSSA", settings),
            dattri_method("arnoldi", "Arnoldi", "fastif Arnoldi", settings),
        ]
    return methods
