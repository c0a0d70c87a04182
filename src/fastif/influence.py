"""The facade: influence of training examples on test examples in a few lines.

    >>> inf = Influence(adapter, train, solver=CG(damping=1e-3))
    >>> scores = inf.scores(test)            # [n_test, n_train]; positive = helpful
    >>> top = inf.top_k(test, k=10)          # most helpful and most harmful training points per test point
    >>> fast = inf.candidate_scores(test, num_candidates=100)   # FastIF: score only the 100 nearest (kNN)

``scores[i, j] = ∇L(test_i)ᵀ (H + damping·I)⁻¹ ∇L(train_j)``, with H the Hessian of the training objective (mean
training loss + L2 term). Positive = helpful: upweighting training point j lowers test i's loss, and removing it
is predicted to raise that loss by ``scores[i, j] / n``. This is the negative of Koh & Liang's ``I_up,loss``.

Every caller (pipeline, applications, benchmarks) goes through :meth:`Influence.candidate_scores`: the one
candidates → s_test → scores path. With ``frozen="auto"`` (the default) the model's constant bottom is computed once
per example (:mod:`fastif.model.frozen`) and every gradient, HVP and score runs on the top alone, with the same numbers.
"""

from __future__ import annotations

import contextlib
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from functools import cached_property
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor

from .candidates import CandidateConfig, CandidateIndex, compute_features
from .data import Dataset, as_dataset
from .errors import DataError
from .gradient_store import GradientStore, GradientStoreConfig, build_store
from .grads import dataset_grads, mean_loss_grad
from .hvp import Hessian, HessianKind, HVPMethod
from .model.adapter import MeasuredAdapter, ModelAdapter
from .model.frozen import (
    DEFAULT_BUDGET_BYTES,
    Encoded,
    FrozenAdapter,
    FrozenMode,
    encode_prefix,
    find_split,
)
from .recall import RecallEstimate, estimate_recall
from .runner import Problem, Runner, RunnerConfig
from .scores import ScoreConfig, score_matrix
from .solvers import CG, Solver, SolveResult
from .solvers.kfac import KFAC
from .store import Store
from .store.artifacts import cached_encoding, has_encoding
from .store.kfac import fit_stored


@dataclass
class TopK:
    """The ``k`` most helpful and most harmful training points per test point: indices into the training set."""

    helpful_indices: Tensor  # [n_test, k], highest score first
    helpful_scores: Tensor
    harmful_indices: Tensor  # [n_test, k], most negative score first
    harmful_scores: Tensor


CandidateMethod = Literal["all", "features", "gradients"]
FEATURES_ENTRY = "train_features"


@dataclass
class CandidateScores:
    """Each test point's scored candidates: ``indices`` [n, K] into the training set (a point retrieved on both
    sides may appear twice; :meth:`top_k` counts it once), their exact ``scores`` [n, K], the ``solve`` that made
    s_test (with its diagnostics), how the candidates were found (``method``) and, for gradient retrieval, per row
    the estimated recall of the exact top-k on each side (``recall[i]["helpful"|"harmful"]``); ``timings`` holds
    the seconds spent finding candidates, solving s_test (test gradients included) and scoring."""

    indices: Tensor
    scores: Tensor
    solve: SolveResult
    method: str
    recall: list[dict[str, RecallEstimate]] | None = None
    timings: dict[str, float] = field(default_factory=dict)

    def top_k(self, k: int) -> TopK:
        """The ``k`` most helpful and most harmful of each row's (distinct) candidates."""
        pairs = [(self.indices[i], self.scores[i]) for i in range(self.indices.shape[0])]
        rows = [_distinct(*pair) for pair in pairs] if self.method == "gradients" else pairs  # only retrieval repeats
        _check_k(k, min(len(indices) for indices, _ in rows), "top_k")
        tops = [_row_top_k(indices, scores, k) for indices, scores in rows]
        return TopK(*(torch.stack([top[part] for top in tops]) for part in range(4)))


@dataclass
class _Prepared:
    """A test set as the working adapter sees it (activations on the frozen path) and its kNN features if known."""

    data: Dataset
    features: Tensor | None


class Influence:
    """Influence of the training set ``train`` on test examples, for the model behind ``adapter``.

    ``solver`` picks how ``H⁻¹`` is applied (default: :class:`~fastif.solvers.CG` without damping); it is fitted
    once, lazily, on the Hessian over all of ``train``. ``candidates`` configures the FAISS index over the
    adapter's features that ``candidate_scores(..., num_candidates=K)`` uses to score only the K nearest training
    points. ``frozen`` picks the frozen-bottom path (:mod:`fastif.model.frozen`): ``"auto"`` takes it where a splitter
    knows the architecture and a layer below the selection exists, ``"on"`` insists (ModelError otherwise),
    ``"off"`` never; its activation cache moves to a memmap under ``cache_folder`` past ``cache_budget_bytes``.
    ``hessian_data`` (default: ``train``) is the set whose objective's Hessian is inverted, as captum's and
    kronfluence's users can choose, e.g. a subsample of a large training set. ``cache``, a
    :class:`~fastif.store.Store` opened for this model and training set, keeps the frozen path's training
    activations and features as entries named after the split, so a later run skips the pass.
    ``hessian_kind="gauss-newton"`` inverts the Gauss-Newton matrix (PSD by construction, so no damping is needed
    to make it invertible on a non-convex model) instead of the Hessian. ``measurement(outputs, batch) -> [B]``
    replaces the test loss by another function of the model's outputs (a margin, one class's logit): the scores
    then predict the change of that measurement.
    """

    def __init__(
        self,
        adapter: ModelAdapter,
        train: Any,
        solver: Solver | None = None,
        score: ScoreConfig | None = None,
        hessian_batch_size: int = 64,
        hvp_method: HVPMethod = "double-backward",
        candidates: CandidateConfig | None = None,
        frozen: FrozenMode = "auto",
        cache_budget_bytes: int = DEFAULT_BUDGET_BYTES,
        cache_folder: str | Path | None = None,
        hessian_data: Any = None,
        cache: Store | None = None,
        hessian_kind: HessianKind = "hessian",
        measurement: Callable[[Any, Any], Tensor] | None = None,
    ) -> None:
        self.adapter = adapter
        self.train = as_dataset(train)
        if len(self.train) == 0:
            raise DataError("the training set is empty; influence needs at least one training example")
        self.solver = solver or CG()
        self.score_config = score or ScoreConfig()
        self.flat = adapter.flat_params()
        self.hessian_batch_size, self.hvp_method, self.hessian_kind = hessian_batch_size, hvp_method, hessian_kind
        self.measurement = measurement
        self.candidate_config = candidates or CandidateConfig()
        self.index: CandidateIndex | None = None
        self.split = find_split(adapter, frozen)
        first_token = self.split is not None and self.split.first_token_only
        if self.score_config.method == "auto" and first_token and not self.score_config.casts:
            # a first-token head is so small that materialising its per-example gradients costs more than one
            # JVP pass per test point (the numbers are the same: tests/test_frozen.py)
            self.score_config = replace(self.score_config, method="jvp")
        self.cache_budget_bytes, self.cache_folder = cache_budget_bytes, cache_folder
        self.hessian_data = None if hessian_data is None else _non_empty(as_dataset(hessian_data), "Hessian")
        self._fitted = False
        self._runner: Runner | None = None
        self.cache = cache
        self.gradients: GradientStore | None = None

    # ------------------------------------------------------------------------------------------ frozen path

    def _encode(self, data: Dataset, folder: str | Path | None = None) -> Encoded:
        assert self.split is not None
        return encode_prefix(
            self.adapter, data, self.split, self.score_config.batch_size, self.cache_budget_bytes, folder
        )

    @cached_property
    def _train_encoded(self) -> Encoded | None:
        """The training set's bottom activations and features (one pass, or the cache's), on the frozen path."""
        if self.split is None:
            return None
        if self.cache is None:
            return self._encode(self.train, self.cache_folder)
        return cached_encoding(self.cache, self.split, self.train, lambda: self._encode(self.train, self.cache_folder))

    @cached_property
    def work_adapter(self) -> ModelAdapter:
        """The adapter every gradient, HVP and score runs on: the top alone on the frozen path, else ``adapter``."""
        encoded = self._train_encoded
        if self.split is None or encoded is None:
            return self.adapter
        return FrozenAdapter(self.adapter, self.split, encoded.layer_returns_tuple)

    @property
    def train_view(self) -> Dataset:
        """The training set as :attr:`work_adapter` reads it (with cached activations on the frozen path)."""
        encoded = self._train_encoded
        return self.train if encoded is None else encoded.data

    @cached_property
    def train_features(self) -> Tensor:
        """kNN features [n, d] of every training point (from the frozen path's one pass when it runs; from, or
        saved to, ``cache`` otherwise)."""
        encoded = self._train_encoded
        if encoded is not None:
            return encoded.features
        compute = lambda: compute_features(self.adapter, self.train, self.score_config.batch_size)  # noqa: E731
        if self.cache is None:
            return compute()
        return self.cache.get_or_compute(FEATURES_ENTRY, compute, {"n": len(self.train)})

    def cached_training_pass(self) -> bool:
        """Run the one pass over the training set now (activations on the frozen path, else kNN features), from
        ``cache`` where it holds it; True if it was loaded rather than computed."""
        loaded = self.training_pass_cached()
        self.train_features  # noqa: B018
        return loaded

    def training_pass_cached(self) -> bool:
        """Whether ``cache`` already holds the training pass (activations on the frozen path, else kNN features)."""
        if self.cache is None:
            return False
        if self.split is not None:
            return has_encoding(self.cache, self.split)
        return self.cache.has(FEATURES_ENTRY)

    def prepare(self, test: Any) -> _Prepared:
        """``test`` as the working adapter reads it, with its features when the frozen pass computed them."""
        test = _non_empty(as_dataset(test), "test")
        if self.split is None:
            return _Prepared(test, None)
        self.work_adapter  # noqa: B018 (the training pass fixes the layer output type first)
        encoded = self._encode(test)
        return _Prepared(encoded.data, encoded.features)

    @cached_property
    def hessian(self) -> Hessian:
        """The objective's Hessian over ``hessian_data`` (default: the training set) at the current parameters."""
        data = self.train_view if self.hessian_data is None else self.prepare(self.hessian_data).data
        return Hessian(self.work_adapter, data, self.flat, self.hessian_batch_size, self.hvp_method, self.hessian_kind)

    # ------------------------------------------------------------------------------------------ s_test

    def fit(self) -> Influence:
        """Fit the solver on the training Hessian (runs once; later calls are free). With ``cache``, K-FAC and
        EK-FAC factors (and the preconditioner of PCG or LiSSA) are kept there shard by shard, so a later run
        reloads them."""
        if not self._fitted:
            solver, hessian = self.solver, self.hessian
            preconditioner = solver.unfitted_preconditioner()
            if self.cache is not None and isinstance(solver, KFAC):
                fit_stored(solver, hessian, self.cache)
            elif self.cache is not None and preconditioner is not None:
                solver.fit(hessian, fit_stored(preconditioner, hessian, self.cache))
            else:
                solver.fit(hessian)
            self._fitted = True
        return self

    def use_solver(self, solver: Solver) -> Influence:
        """Solve s_test with ``solver`` from now on (fitted lazily on the same Hessian), keeping the frozen path's
        encoded training set, the kNN index and the gradient store: one accurate and one fast solver can then
        share a single training pass. A solver already fitted on this facade's Hessian is not fitted again."""
        fitted_here = solver.hessian is not None and solver.hessian is self.__dict__.get("hessian")
        self.solver, self._fitted = solver, fitted_here
        return self

    def test_grads(self, test: Any) -> Tensor:
        """Per-example loss gradients [n_test, P] of the test examples."""
        return self._grads(self.prepare(test).data)

    @cached_property
    def test_adapter(self) -> ModelAdapter:
        """The adapter whose per-example "loss" is differentiated on the test side: the measurement, if given."""
        if self.measurement is None:
            return self.work_adapter
        return MeasuredAdapter(self.work_adapter, self.measurement)

    def _grads(self, data: Dataset, group: bool = False) -> Tensor:
        config = self.score_config
        if group:
            return mean_loss_grad(self.test_adapter, self.flat, data, config.batch_size)[None].detach()
        return dataset_grads(self.test_adapter, self.flat, data, None, config.batch_size, config.chunk_size)

    def solve(self, test: Any, group: bool = False) -> SolveResult:
        """``(H + damping·I)⁻¹ ∇L`` per test example [n_test, P] (or for the group's mean loss, [1, P]) and the
        solver's diagnostics."""
        return self._solve(self.prepare(test).data, group)

    def _solve(self, data: Dataset, group: bool) -> SolveResult:
        gradients = self._grads(data, group)
        _check_finite(gradients, "test-loss gradient", lambda rows: self._locate(data, rows, group))
        if self._runner is not None:
            result = self._runner.solve(self.solver.config, gradients)
        else:
            result = self.fit().solver.solve(gradients)
        _check_finite(result.x, "s_test")
        return result

    def _locate(self, data: Dataset, rows: list[int], group: bool) -> str:
        """Where NaN/Inf first appears for test ``rows`` (all of a group): a module's output, the loss or backward."""
        indices = list(range(len(data))) if group else rows
        return self.work_adapter.locate_nonfinite(self.flat, data.batch(indices))

    @contextlib.contextmanager
    def parallel(self, config: RunnerConfig) -> Iterator[Influence]:
        """Within this block, s_test solves run on a :class:`~fastif.runner.Runner` (LiSSA chains spread over
        local processes or torchrun ranks) over this influence's working problem (the frozen path's head)."""
        hessian = self.hessian

        def build(_device: torch.device) -> Problem:
            return Problem(self.work_adapter, hessian.data, self.hessian_batch_size, self.hvp_method)

        with Runner(build, config) as runner:
            self._runner = runner
            try:
                yield self
            finally:
                self._runner = None

    def s_test(self, test: Any, group: bool = False) -> Tensor:
        """``(H + damping·I)⁻¹ ∇L`` per test example [n_test, P], or for the group's mean loss [1, P]."""
        return self.solve(test, group).x

    # ------------------------------------------------------------------------------------------ scores

    def scores(self, test: Any, train_indices: Sequence[int] | None = None, group: bool = False) -> Tensor:
        """Scores [n_test, n] (or [1, n] with ``group``) of training points ``train_indices`` (default: all)."""
        _check_indices(train_indices, len(self.train))
        return self.score_s_test(self.s_test(test, group), train_indices)

    def score_s_test(self, s_test: Tensor, train_indices: Sequence[int] | None = None) -> Tensor:
        """Scores [k, n] of the training points ``train_indices`` (default: all) against given s_test rows."""
        return score_matrix(self.work_adapter, self.flat, s_test, self.train_view, train_indices, self.score_config)

    def build_index(self, index: CandidateIndex | None = None) -> CandidateIndex:
        """The kNN index over the training features (built once; pass a saved ``index`` to reuse one)."""
        if index is not None:
            self.index = index
        if self.index is None:
            self.index = CandidateIndex.build(self.train_features, self.candidate_config)
        return self.index

    def nearest(self, test: Any, k: int, group: bool = False) -> Tensor:
        """Indices [n_test, k] of each test point's k nearest training points (or [1, k] for the group's mean)."""
        return self._nearest(self.prepare(test), k, group)

    def _nearest(self, prepared: _Prepared, k: int, group: bool) -> Tensor:
        features = prepared.features
        if features is None:
            features = compute_features(self.work_adapter, prepared.data, self.score_config.batch_size)
        index = self.build_index()
        if group:
            return torch.as_tensor(index.search_mean(features, k))[None]
        return torch.as_tensor(index.search(features, k)[1])

    def candidate_scores(
        self,
        test: Any,
        num_candidates: int | None = None,
        group: bool = False,
        train_indices: Sequence[int] | None = None,
        method: CandidateMethod | None = None,
        recall_k: int = 10,
    ) -> CandidateScores:
        """FastIF's path, written once: candidates → s_test → exact scores of each test point's candidates.

        ``method`` (default: ``"features"`` with ``num_candidates``, else ``"all"``): ``"all"`` scores every point
        of ``train_indices`` (default: the whole training set); ``"features"`` the ``num_candidates`` nearest in
        feature space (FAISS; for a ``group``, nearest its mean feature); ``"gradients"`` retrieves, from the
        gradient store (:meth:`use_gradient_store`), half of ``num_candidates`` with the largest and half with the
        most negative projected score, reranks them exactly and estimates the recall of the exact top-``recall_k``.
        """
        method = method or ("all" if num_candidates is None else "features")
        if method not in ("all", "features", "gradients"):
            raise DataError(f"method must be 'all', 'features' or 'gradients', got {method!r}")
        if method != "all" and train_indices is not None:
            raise DataError("give either train_indices (scores them all) or num_candidates, not both")
        timings: dict[str, float] = {}
        with _timed(timings, "prepare"):
            prepared = self.prepare(test)
        if method == "all":
            return self._score_all(prepared, group, train_indices, timings)
        if num_candidates is None:
            raise DataError(f"method={method!r} needs num_candidates, the number of training points to score")
        _check_k(num_candidates, len(self.train), "num_candidates")
        if method == "gradients":
            return self._retrieve_and_rerank(prepared, num_candidates, group, recall_k, timings)
        with _timed(timings, "candidates"):
            neighbours = self._nearest(prepared, num_candidates, group)
        with _timed(timings, "s_test"):
            result = self._solve(prepared.data, group)
        with _timed(timings, "scores"):
            rows = [self.score_s_test(result.x[i : i + 1], row.tolist()) for i, row in enumerate(neighbours)]
        return CandidateScores(neighbours.long(), torch.cat(rows), result, "features", timings=timings)

    def _score_all(
        self, prepared: _Prepared, group: bool, train_indices: Sequence[int] | None, timings: dict[str, float]
    ) -> CandidateScores:
        _check_indices(train_indices, len(self.train))
        pool = list(range(len(self.train))) if train_indices is None else [int(i) for i in train_indices]
        with _timed(timings, "s_test"):
            result = self._solve(prepared.data, group)
        with _timed(timings, "scores"):
            scores = self.score_s_test(result.x, pool)
        indices = torch.as_tensor(pool, dtype=torch.long).expand(scores.shape[0], -1)
        return CandidateScores(indices.contiguous(), scores, result, "all", timings=timings)

    def use_gradient_store(self, store: GradientStore) -> Influence:
        """Retrieve ``method="gradients"`` candidates from ``store`` (built by :func:`fastif.gradient_store.
        build_store` over :attr:`work_adapter` and :attr:`train_view`, see :meth:`build_gradient_store`)."""
        if store.n != len(self.train):
            raise DataError(f"the gradient store holds {store.n} points but the training set has {len(self.train)}")
        self.gradients = store
        return self

    def build_gradient_store(self, folder: str | Path, config: GradientStoreConfig | None = None, **options: Any):
        """Build (or resume) the training set's gradient store in ``folder`` on the working path, open it and use
        it for retrieval; ``options`` go to :func:`~fastif.gradient_store.build_store`. Returns its BuildReport."""
        report = build_store(self.work_adapter, self.train_view, folder, config, **options)
        fingerprint = options.get("fingerprint")
        self.use_gradient_store(
            GradientStore.open(folder, self.work_adapter, self.train_view, config, fingerprint=fingerprint)
        )
        return report

    def _retrieve_and_rerank(
        self, prepared: _Prepared, num_candidates: int, group: bool, recall_k: int, timings: dict[str, float]
    ) -> CandidateScores:
        if self.gradients is None:
            raise DataError("method='gradients' needs a gradient store: call build_gradient_store(folder) first")
        store = self.gradients
        per_side = max(1, -(-num_candidates // 2))
        _check_k(recall_k, per_side, "recall_k (at most num_candidates / 2)")
        with _timed(timings, "s_test"):
            result = self._solve(prepared.data, group)
        with _timed(timings, "candidates"):
            found = store.search(result.x, per_side)
        rows, recall = [], []
        for i in range(result.x.shape[0]):
            helpful, harmful = found.helpful[i], found.harmful[i]
            with _timed(timings, "scores"):
                exact = self.score_s_test(result.x[i : i + 1], [*helpful.tolist(), *harmful.tolist()])[0]
            rows.append((torch.as_tensor(np.concatenate([helpful, harmful])), exact))
            sides = {"helpful": (helpful, exact[:per_side], True), "harmful": (harmful, exact[per_side:], False)}
            with _timed(timings, "recall"):
                recall.append(
                    {
                        side: estimate_recall(
                            found.scores[i], ids, values.double().numpy(), recall_k, scale=store.norms, largest=largest
                        )
                        for side, (ids, values, largest) in sides.items()
                    }
                )
        indices = torch.stack([row[0] for row in rows]).long()
        scores = torch.stack([row[1] for row in rows])
        return CandidateScores(indices, scores, result, "gradients", recall, timings)

    def top_k(
        self,
        test: Any,
        k: int = 10,
        train_indices: Sequence[int] | None = None,
        group: bool = False,
        num_candidates: int | None = None,
    ) -> TopK:
        """The ``k`` most helpful (largest) and most harmful (most negative) training points per test point,
        among the candidates of :meth:`candidate_scores` (FastIF's kNN with ``num_candidates``; else all)."""
        _check_count(k, "k")
        return self.candidate_scores(test, num_candidates, group, train_indices).top_k(k)

    # ------------------------------------------------------------------------------------------ self-influence

    def self_influence(self, indices: Sequence[int] | None = None, chunk: int | None = None) -> Tensor:
        """``∇L(z)ᵀ (H + damping·I)⁻¹ ∇L(z)`` per training point [n] (default: all): large = suspicious label.

        Solves ``chunk`` gradients at a time (default: the score batch size), so memory stays [chunk, P].
        """
        _check_indices(indices, len(self.train))
        order = list(range(len(self.train))) if indices is None else [int(i) for i in indices]
        step = self.score_config.batch_size if chunk is None else chunk
        if step < 1:
            raise DataError(f"chunk must be a positive number of training points, got {step}")
        if self.solver.iterative and len(order) > step:
            warnings.warn(
                f"self_influence with {type(self.solver).__name__} runs one iterative solve (Hessian-vector products "
                f"over the whole Hessian data at every step) per chunk: {-(-len(order) // step)} chunks of {step} "
                "training points; Arnoldi, EK-FAC or Exact fit once, then solve every point without Hessian products",
                RuntimeWarning,
                stacklevel=2,
            )
        self.fit()
        return torch.cat([self._self_influence_chunk(order[i : i + step]) for i in range(0, len(order), step)])

    def _self_influence_chunk(self, indices: list[int]) -> Tensor:
        """Self-influence of one chunk of training points: their gradients, one batched solve, row-wise dots."""
        gradients = dataset_grads(
            self.work_adapter, self.flat, self.train_view, indices, len(indices), self.score_config.chunk_size
        )
        return (gradients * self.solver.solve(gradients).x).sum(dim=1)


@contextlib.contextmanager
def _timed(timings: dict[str, float], name: str) -> Iterator[None]:
    """Add the block's wall time to ``timings[name]``."""
    start = time.perf_counter()
    try:
        yield
    finally:
        timings[name] = timings.get(name, 0.0) + time.perf_counter() - start


def _distinct(indices: Tensor, scores: Tensor) -> tuple[Tensor, Tensor]:
    """A row's candidates with repeated training indices dropped (first occurrence kept)."""
    seen: dict[int, int] = {}
    for position, index in enumerate(indices.tolist()):
        seen.setdefault(index, position)
    keep = torch.tensor(list(seen.values()), dtype=torch.long)
    return indices[keep], scores[keep]


def _row_top_k(indices: Tensor, scores: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    helpful_scores, helpful = scores.topk(k, largest=True)
    harmful_scores, harmful = scores.topk(k, largest=False)
    return indices[helpful], helpful_scores, indices[harmful], harmful_scores


def _check_finite(values: Tensor, what: str, locate: Callable[[list[int]], str] | None = None) -> None:
    """Refuse NaN/Inf in gradients or solver output, naming the rows (and, where ``locate`` can tell, the module
    where NaN first appears), instead of returning meaningless scores."""
    bad = (~torch.isfinite(values)).reshape(values.shape[0], -1).any(dim=1).nonzero().flatten().tolist()
    if bad:
        where = locate(bad[:10]) if locate is not None else "check the model's numerical stability"
        raise DataError(f"non-finite {what} for test row(s) {bad[:10]}: the loss or its gradient is NaN/Inf; {where}")


def _check_count(k: Any, name: str) -> None:
    if isinstance(k, bool) or not isinstance(k, int):
        raise DataError(f"{name} must be a whole number of training points, got {k!r}")


def _check_k(k: int, pool: int, name: str = "k") -> None:
    _check_count(k, name)
    if not 0 < k <= pool:
        raise DataError(f"{name} must lie in [1, {pool}] (the number of training points available), got {k}")


def _non_empty(data: Dataset, role: str) -> Dataset:
    if len(data) == 0:
        raise DataError(f"the {role} set is empty; give at least one {role} example")
    return data


def _check_indices(indices: Sequence[int] | None, n: int) -> None:
    if indices is None:
        return
    if len(indices) == 0:
        raise DataError("train_indices is empty; give at least one training index (or None for all)")
    if min(indices) < 0 or max(indices) >= n:
        raise DataError(f"train_indices must lie in [0, {n - 1}] for a training set of {n} examples")
