"""Task (c) methods: each finds the top-10 helpful and harmful training points for every test point.

Every runner returns a :class:`Found`: per-stage wall times, the training points it scored per test point, their
scores (fastif's sign and scale) and the top-10 indices. ``fraction`` < 1 means the method ran on a random subset
of the training set and :attr:`Found.extrapolated_seconds` scales the stages that grow with it linearly to 8,000.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from fastif import CG, Influence, LiSSA, ScoreConfig
from fastif.model.adapter import additive_attention_mask
from fastif.model.predict import model_inputs

from .nli_setup import TRACKED_MODULES, Examples, LogitsModel, NLIProblem, fresh_model, pad_collate, tuple_loader

PARAMETER_NAMES = [f"{module}.{kind}" for module in TRACKED_MODULES for kind in ("weight", "bias")]


@dataclass(frozen=True)
class NLISettings:
    """Budgets: fastif's LiSSA and kNN, and the peers' solver and subset sizes."""

    k: int = 10
    candidates: int = 100
    lissa_depth: int = 300
    lissa_scale: float = 25.0
    tail_average: float = 0.5
    batch_size: int = 64
    subset: int = 256  # training points the per-point-expensive peers score (then extrapolated)
    hessian_pool: int = 128  # training points in the peers' Hessian batch (dattri, captum Arnoldi)
    cg_iterations: int = 10
    arnoldi_rank: int = 20
    arnoldi_iterations: int = 40


@dataclass
class Found:
    """What a method found, and how long each stage took."""

    name: str
    stages: dict[str, float] = field(default_factory=dict)
    scaling_stages: tuple[str, ...] = ()  # stages whose cost grows with the number of training points scored
    fraction: float = 1.0  # share of the training set scored
    scored: list[np.ndarray] = field(default_factory=list)  # per test point: training indices scored
    scores: list[np.ndarray] = field(default_factory=list)  # per test point: their scores
    helpful: np.ndarray | None = None
    harmful: np.ndarray | None = None

    @property
    def seconds(self) -> float:
        """Measured wall time."""
        return sum(self.stages.values())

    @property
    def extrapolated_seconds(self) -> float:
        """Wall time for the whole training set: scaling stages divided by ``fraction``."""
        return sum(t / self.fraction if s in self.scaling_stages else t for s, t in self.stages.items())

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        """Time a block into ``stages[name]``."""
        start = time.perf_counter()
        yield
        self.stages[name] = self.stages.get(name, 0.0) + time.perf_counter() - start

    def finish(self, k: int) -> Found:
        """Pick the top-k helpful (largest) and harmful (smallest) of each test point's scored points."""
        pairs = list(zip(self.scored, self.scores, strict=True))
        self.helpful = np.stack([idx[np.argsort(-s, kind="stable")[:k]] for idx, s in pairs])
        self.harmful = np.stack([idx[np.argsort(s, kind="stable")[:k]] for idx, s in pairs])
        return self


def full_rows(matrix: Tensor | np.ndarray, indices: np.ndarray) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Per-test (indices, scores) lists from a dense [n_test, len(indices)] score matrix."""
    array = matrix.detach().double().numpy() if isinstance(matrix, Tensor) else np.asarray(matrix, dtype=np.float64)
    return [indices] * array.shape[0], list(array)


def random_subset(problem: NLIProblem, size: int, seed: int = 1) -> np.ndarray:
    """A sorted random subset of training indices (random, not the shortest: extrapolation stays unbiased)."""
    n = len(problem.train)
    return np.sort(np.random.default_rng(seed).choice(n, size=min(size, n), replace=False))


# ---------------------------------------------------------------------------------------------- fastif


def fastif_lissa(problem: NLIProblem, settings: NLISettings) -> LiSSA:
    """fastif's fast s_test: batch-1 LiSSA with tail averaging."""
    return LiSSA(
        damping=problem.spec.damping,
        depth=settings.lissa_depth,
        batch_size=1,
        scale=settings.lissa_scale,
        tail_average=settings.tail_average,
    )


def fastif_influence(problem: NLIProblem, settings: NLISettings, frozen: str = "off", **options: Any) -> Influence:
    """fastif on the HF model through the facade: fast LiSSA s_test, scores in batches of ``batch_size``;
    ``frozen="on"`` takes the core frozen-bottom path (the cached [CLS] vector feeds pooler + classifier)."""
    solver = options.pop("solver", None) or fastif_lissa(problem, settings)
    score = options.pop("score", None) or ScoreConfig(batch_size=settings.batch_size)
    return Influence(problem.adapter(), problem.train, solver, score, frozen=frozen, **options)


def facade_pipeline(found: Found, influence: Influence, test: Any, settings: NLISettings, count: int | None) -> Found:
    """One timed call of the facade's one path, ``Influence.candidate_scores`` (kNN with ``count``, else all)."""
    if count is not None or influence.split is not None:
        with found.stage("one-off pass (activations or features of every training point)"):
            influence.train_features  # noqa: B018
            if count is not None:
                influence.build_index()
    result = influence.candidate_scores(test, count)
    for stage, seconds in result.timings.items():
        found.stages[stage] = found.stages.get(stage, 0.0) + seconds
    found.scored = list(result.indices.numpy())
    found.scores = list(result.scores.detach().double().numpy())
    return found.finish(settings.k)


def fastif_knn(problem: NLIProblem, settings: NLISettings) -> Found:
    """FastIF's pipeline on the whole model: FAISS index over the classifier's input, LiSSA, JVP of K candidates."""
    influence = fastif_influence(problem, settings)
    return facade_pipeline(Found("fastif kNN + LiSSA + JVP"), influence, problem.test, settings, settings.candidates)


def fastif_full(problem: NLIProblem, settings: NLISettings) -> Found:
    """fastif without kNN: the same s_test, then per-example gradients of every training point (one pass)."""
    found = Found("fastif full scan + LiSSA", scaling_stages=("scores",))
    influence = fastif_influence(problem, settings, score=ScoreConfig("grad", settings.batch_size))
    return facade_pipeline(found, influence, problem.test, settings, None)


def fastif_head_knn(problem: NLIProblem, settings: NLISettings) -> Found:
    """FastIF's pipeline on the core frozen path: kNN over the pooled features, batch-1 LiSSA, JVP candidate
    scores, all on the cached [CLS] vectors."""
    influence = fastif_influence(problem, settings, frozen="on")
    found = Found("fastif frozen path + kNN + LiSSA")
    return facade_pipeline(found, influence, problem.test, settings, settings.candidates)


def fastif_head_full(problem: NLIProblem, settings: NLISettings) -> Found:
    """No kNN, no stochastic solver: CG on the frozen head's full Hessian, then every training point's score."""
    solver = CG(damping=problem.spec.damping, tolerance=1e-6, max_iterations=200)
    influence = fastif_influence(
        problem, settings, frozen="on", solver=solver, score=ScoreConfig("grad", 1024, 256),
        hessian_batch_size=len(problem.train),
    )  # fmt: skip
    return facade_pipeline(Found("fastif frozen path + full scan + CG"), influence, problem.test, settings, None)


# ---------------------------------------------------------------------------------------------- kronfluence


def kronfluence_task():
    """kronfluence's Task for the NLI classifier: summed CE (labels sampled for the true Fisher), tracked modules."""
    from kronfluence.task import Task

    class NLITask(Task):
        def compute_train_loss(self, batch: dict[str, Tensor], model: nn.Module, sample: bool = False) -> Tensor:
            logits = model(**model_inputs(batch)).logits
            labels = batch["labels"]
            if sample:
                with torch.no_grad():
                    labels = torch.multinomial(torch.softmax(logits.detach(), dim=-1), 1).flatten()
            return nn.functional.cross_entropy(logits, labels, reduction="sum")

        def compute_measurement(self, batch: dict[str, Tensor], model: nn.Module) -> Tensor:
            logits = model(**model_inputs(batch)).logits
            return nn.functional.cross_entropy(logits, batch["labels"], reduction="sum")

        def get_influence_tracked_modules(self) -> list[str]:
            return list(TRACKED_MODULES)

        def get_attention_mask(self, batch: dict[str, Tensor]) -> Tensor:
            return batch["attention_mask"]

    return NLITask()


def kronfluence_ekfac(problem: NLIProblem, settings: NLISettings) -> Found:
    """kronfluence EK-FAC over all training points: factors (two passes), then pairwise scores (one pass)."""
    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.arguments import FactorArguments, ScoreArguments
    from kronfluence.utils.dataset import DataLoaderKwargs

    found = Found("kronfluence EK-FAC")
    task = kronfluence_task()
    train, test = Examples(problem.train), Examples(problem.test)
    with tempfile.TemporaryDirectory() as folder:
        model = prepare_model(fresh_model(problem), task)
        analyzer = Analyzer("nli", model, task, cpu=True, disable_tqdm=True, output_dir=folder)
        analyzer.set_dataloader_kwargs(DataLoaderKwargs(collate_fn=pad_collate))
        with found.stage("factors (covariance, eigendecomposition, lambda)"):
            analyzer.fit_all_factors(
                "ekfac", train, per_device_batch_size=settings.batch_size, factor_args=FactorArguments("ekfac")
            )
        with found.stage("pairwise scores (all points)"):
            analyzer.compute_pairwise_scores(
                "pairwise",
                "ekfac",
                test,
                train,
                per_device_query_batch_size=len(test),
                per_device_train_batch_size=settings.batch_size,
                score_args=ScoreArguments(damping_factor=problem.shift),
            )
            matrix = analyzer.load_pairwise_scores("pairwise")["all_modules"]
    found.scored, found.scores = full_rows(matrix, np.arange(len(problem.train)))
    return found.finish(settings.k)


# ---------------------------------------------------------------------------------------------- captum


def _no_checkpoint(model: nn.Module, path: str) -> float:
    return 1.0


def captum_tracincp(problem: NLIProblem, settings: NLISettings) -> Found:
    """captum TracInCP (final checkpoint, learning rate 1: gradient similarity) on a random subset."""
    from captum.influence import TracInCP

    subset = random_subset(problem, settings.subset)
    found = Found("captum TracInCP", scaling_stages=("scores (per-example gradients)",))
    found.fraction = len(subset) / len(problem.train)
    with found.stage("scores (per-example gradients)"):
        tracin = TracInCP(
            LogitsModel(fresh_model(problem)),
            tuple_loader(problem.train, subset, settings.batch_size),
            ["final"],
            checkpoints_load_func=_no_checkpoint,
            layers=[f"model.{name}" for name in TRACKED_MODULES],
            loss_fn=nn.CrossEntropyLoss(reduction="sum"),
            sample_wise_grads_per_batch=True,
        )
        matrix = tracin.influence(tuple(next(iter(tuple_loader(problem.test, None, len(problem.test))))))
    found.scored, found.scores = full_rows(matrix, subset)
    return found.finish(settings.k)


def captum_arnoldi(problem: NLIProblem, settings: NLISettings) -> Found:
    """captum ArnoldiInfluenceFunction: Arnoldi on a Hessian pool, then influence embeddings of a random subset."""
    from captum.influence._core.arnoldi_influence_function import ArnoldiInfluenceFunction

    subset = random_subset(problem, settings.subset)
    pool = random_subset(problem, settings.hessian_pool, seed=2)
    found = Found("captum ArnoldiInfluenceFunction", scaling_stages=("scores (per-example gradients)",))
    found.fraction = len(subset) / len(problem.train)
    with found.stage("Arnoldi (Hessian pool)"):
        influence = ArnoldiInfluenceFunction(
            LogitsModel(fresh_model(problem)),
            tuple_loader(problem.train, subset, settings.batch_size),
            "final",
            checkpoints_load_func=_no_checkpoint,
            layers=[f"model.{name}" for name in TRACKED_MODULES],
            loss_fn=nn.CrossEntropyLoss(reduction="sum"),
            sample_wise_grads_per_batch=True,
            hessian_dataset=tuple_loader(problem.train, pool, settings.batch_size),
            projection_dim=settings.arnoldi_rank,
            arnoldi_dim=settings.arnoldi_iterations,
            hessian_reg=len(pool) * problem.shift,  # summed-loss Hessian over the pool
        )
    with found.stage("scores (per-example gradients)"):
        matrix = influence.influence(tuple(next(iter(tuple_loader(problem.test, None, len(problem.test))))))
    found.scored, found.scores = full_rows(matrix * len(pool), subset)  # back to a mean-loss Hessian's scale
    return found.finish(settings.k)


# ---------------------------------------------------------------------------------------------- dattri


def dattri_task(problem: NLIProblem):
    """dattri's AttributionTask on the HF model: mean CE, 4-D float attention mask (vmap-safe), long ids restored."""
    from dattri.task import AttributionTask

    model = fresh_model(problem)
    dtype = next(model.parameters()).dtype

    def loss_func(params: dict[str, Tensor], data: tuple[Tensor, ...]) -> Tensor:
        input_ids, attention_mask, token_type_ids, labels = data  # dattri's LiSSA casts these to float
        inputs = {
            "input_ids": input_ids.long(),
            "attention_mask": additive_attention_mask(attention_mask, dtype),
            "token_type_ids": token_type_ids.long(),
        }
        logits = torch.func.functional_call(model, params, args=(), kwargs=inputs).logits
        return nn.functional.cross_entropy(logits, labels.long())

    return AttributionTask(loss_func=loss_func, model=model, checkpoints=model.state_dict())


def dattri_attributor(kind: str, problem: NLIProblem, settings: NLISettings):
    """dattri's IFAttributor{CG,LiSSA,Arnoldi} over the pooler + classifier, cached on one Hessian-pool batch."""
    from dattri.algorithm.influence_function import IFAttributorArnoldi, IFAttributorCG, IFAttributorLiSSA

    task = dattri_task(problem)
    if kind == "cg":
        attributor = IFAttributorCG(
            task, PARAMETER_NAMES, max_iter=settings.cg_iterations, regularization=problem.shift
        )
    elif kind == "lissa":
        attributor = IFAttributorLiSSA(
            task,
            PARAMETER_NAMES,
            batch_size=1,
            recursion_depth=settings.lissa_depth,
            damping=problem.shift / settings.lissa_scale,
            scaling=settings.lissa_scale,
        )
    else:
        attributor = IFAttributorArnoldi(
            task,
            PARAMETER_NAMES,
            proj_dim=settings.arnoldi_rank,
            max_iter=settings.arnoldi_iterations,
            regularization=problem.shift,
        )
    pool = random_subset(problem, settings.hessian_pool, seed=2)
    attributor.cache(tuple_loader(problem.train, pool, len(pool)))  # dattri needs the pool as one batch
    if kind == "arnoldi":  # its projector runs the Arnoldi iteration lazily, on first use: run it now
        size = sum(dict(task.model.named_parameters())[name].numel() for name in PARAMETER_NAMES)
        attributor.arnoldi_projectors[0](torch.zeros(1, size))
    return attributor


def dattri_method(kind: str, label: str) -> Callable[[NLIProblem, NLISettings], Found]:
    """A dattri runner on a random subset scored in one training batch (dattri re-solves per training batch)."""

    def run(problem: NLIProblem, settings: NLISettings) -> Found:
        subset = random_subset(problem, settings.subset)
        scaling = "scores (gradients; CG/LiSSA re-solve per training batch)"
        found = Found(f"dattri {label}", scaling_stages=(scaling,))
        found.fraction = len(subset) / len(problem.train)
        with found.stage("cache (Hessian pool; Arnoldi: the iteration)"):
            attributor = dattri_attributor(kind, problem, settings)
        with found.stage(scaling):
            matrix = attributor.attribute(
                tuple_loader(problem.train, subset, len(subset)), tuple_loader(problem.test, None, len(problem.test))
            )
        found.scored, found.scores = full_rows(matrix.T, subset)
        return found.finish(settings.k)

    return run


RUNNERS: dict[str, Callable[[NLIProblem, NLISettings], Found]] = {
    "fastif kNN + LiSSA + JVP": fastif_knn,
    "fastif frozen path + kNN + LiSSA": fastif_head_knn,
    "fastif frozen path + full scan + CG": fastif_head_full,
    "kronfluence EK-FAC": kronfluence_ekfac,
    "fastif full scan + LiSSA": fastif_full,
    "captum TracInCP": captum_tracincp,
    "captum ArnoldiInfluenceFunction": captum_arnoldi,
    "dattri CG": dattri_method("cg", "CG"),
    "dattri LiSSA": dattri_method("lissa", "LiSSA"),
    "dattri Arnoldi": dattri_method("arnoldi", "Arnoldi"),
}
