"""FastIF end to end: model → features → kNN index (built once, saved) → fast s_test → candidate scores → top-k.

:class:`Pipeline` runs the stages of a :class:`~fastif.pipeline.config.PipelineConfig` lazily and times each one.
The kNN index lives in a :class:`~fastif.store.Store` whose manifest holds the model's and the training set's
fingerprints, so a later run reuses it and an index made for another model or data is refused (or rebuilt with
``overwrite``). s_test is LiSSA at batch size 1 averaged over ``repeats`` chains, run in parallel worker processes
through :mod:`fastif.runner` when there is more than one worker.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
import warnings
from collections.abc import Iterator, Sequence
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from ..candidates import CandidateIndex
from ..config import DEFAULT_DAMPING, config_to_dict, save_config
from ..data import Dataset, iter_batches, length_order
from ..errors import ConfigError, DataError, StoreError
from ..files import jsonable
from ..fingerprint import fingerprint_parameters
from ..grads import dataset_grads, mean_loss_grad
from ..hvp import Hessian
from ..influence import TopK, top_k_from_scores
from ..model.adapter import AdapterConfig, HFClassifierAdapter
from ..model.hf import top_layer_parameters
from ..model.predict import dataset_labels
from ..runner import Problem, Runner, RunnerConfig, usable_cores
from ..scores import ScoreConfig, score_matrix
from ..solvers import ArnoldiConfig, CGConfig, ExactConfig, IdentityConfig, LiSSAConfig, SolveResult, solver_from_config
from ..store import Store
from .config import ParameterConfig, PipelineConfig, SolverStageConfig
from .output import write_results
from .recipe import LoadedModel, Recipe, find_recipe

SEMANTICS = (
    "score = ∇L(test)ᵀ (H + damping·I)⁻¹ ∇L(train) over the selected parameters; positive = helpful: removing "
    "the training point is predicted to raise the test loss (against its gold label) by score / n"
)
FEATURES_ENTRY = "train_features"
FAISS_FOLDER = "faiss"


def resolve_device(name: str) -> torch.device:
    """The torch device called ``name``; ConfigError if it is malformed or absent on this machine."""
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"unknown device {name!r}; use 'cpu', 'cuda' or 'cuda:N'") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r} asked for but torch sees no GPU; use --device cpu")
    return device


def selected_parameters(model: torch.nn.Module, config: ParameterConfig) -> tuple[str, ...]:
    """``config.include``, or the top ``top_layers`` encoder layers plus everything outside embeddings and encoder."""
    return config.include or top_layer_parameters(model, config.top_layers)


def build_adapter(loaded: LoadedModel, config: ParameterConfig, feature_module: str) -> HFClassifierAdapter:
    """The HF adapter over the selected parameters, with the model's training L2 term unless ``config.l2`` is set."""
    l2 = config.l2 if config.l2 is not None else (loaded.l2 or 0.0)
    adapter_config = AdapterConfig(
        include=selected_parameters(loaded.model, config),
        exclude=config.exclude,
        l2=l2,
        l2_exclude=config.l2_exclude,
    )
    return HFClassifierAdapter(loaded.model, adapter_config, feature_module=feature_module)


def with_recipe_damping(config: PipelineConfig) -> PipelineConfig:
    """``config`` with ``solver.damping`` set to the recipe's damping when it is unset."""
    if config.solver.damping is not None:
        return config
    damping = getattr(find_recipe(config.model.recipe_name), "damping", DEFAULT_DAMPING)
    return dataclasses.replace(config, solver=dataclasses.replace(config.solver, damping=damping))


def solver_config(config: SolverStageConfig, seed: int, repeats: int) -> Any:
    """The typed config of the solver ``config.method`` names, with the stage's settings."""
    if config.method == "lissa":
        return LiSSAConfig(
            damping=config.damping,
            scale=config.scale,
            depth=config.depth,
            repeats=repeats,
            batch_size=config.batch_size,
            seed=seed,
            power_iterations=config.power_iterations,
            scale_samples=config.scale_samples,
            tail_average=config.tail_average,
        )
    if config.method == "cg":
        return CGConfig(damping=config.damping, max_iterations=config.max_iterations)
    if config.method == "arnoldi":
        return ArnoldiConfig(damping=config.damping, rank=config.rank, seed=seed)
    if config.method == "exact":
        return ExactConfig(damping=config.damping)
    return IdentityConfig()


class _ProgressHessian(Hessian):
    """A Hessian that ticks a progress bar on every HVP, so long solves show their progress."""

    def __init__(self, *args: Any, bar: tqdm, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.bar = bar

    def matvec(self, vectors: Tensor) -> Tensor:
        result = super().matvec(vectors)
        self.bar.update(1)
        return result

    def batch_matvec(self, vectors: Tensor, indices: Sequence[int]) -> Tensor:
        result = super().batch_matvec(vectors, indices)
        self.bar.update(1)
        return result


def _top_row(top: TopK, row: int) -> TopK:
    """Row ``row`` of a TopK, kept two-dimensional."""
    return TopK(*(getattr(top, name)[row : row + 1] for name in TopK.__dataclass_fields__))


class Pipeline:
    """Runs the stages of ``config`` on demand, caching each result and recording its wall time in ``timings``."""

    def __init__(self, config: PipelineConfig) -> None:
        self.config = with_recipe_damping(config)
        self.recipe: Recipe = find_recipe(config.model.recipe_name)
        self.device = resolve_device(config.device)
        self.timings: dict[str, float] = {}
        self._nested: list[float] = []
        self.index_info: dict[str, Any] = {}

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        """Add the wall time of the enclosed block, less that of stages nested in it, to ``timings[name]``."""
        start = time.perf_counter()
        self._nested.append(0.0)
        try:
            yield
        finally:
            elapsed, inner = time.perf_counter() - start, self._nested.pop()
            self.timings[name] = self.timings.get(name, 0.0) + elapsed - inner
            if self._nested:
                self._nested[-1] += elapsed

    def _bar(self, enabled: bool = True, **kwargs: Any) -> tqdm:
        """A tqdm bar that shows only when progress output is on (and ``enabled``)."""
        return tqdm(disable=not (enabled and self.config.output.progress), leave=False, **kwargs)

    # ------------------------------------------------------------------------------------------ model and data

    @cached_property
    def loaded(self) -> LoadedModel:
        """The classifier, its tokenizer and label scheme (training the embedded recipe if it is not cached)."""
        with self.stage("model"):
            return self.recipe.load_model(self.config.model, self.config.data, self.device, self.config.output.progress)

    @cached_property
    def train(self) -> Any:
        """The tokenised training set."""
        loaded = self.loaded
        with self.stage("data"):
            return self.recipe.load_data("train", loaded, self.config.data)

    @cached_property
    def adapter(self) -> Any:
        """The HF adapter over the selected parameters."""
        return build_adapter(self.loaded, self.config.parameters, self.config.candidates.feature_module)

    @cached_property
    def flat(self) -> Tensor:
        """The selected parameters' values as one flat vector."""
        return self.adapter.flat_params()

    @cached_property
    def test_set(self) -> Any:
        """The tokenised test set (for indices into it and for picking points to explain)."""
        loaded = self.loaded
        with self.stage("data"):
            return self.recipe.load_data("test", loaded, self.config.data)

    @torch.no_grad()
    def predict(self, data: Dataset) -> Tensor:
        """Class probabilities [n, C] of every example (length-sorted batches, so little padding)."""
        params = self.adapter.space.unflatten(self.flat)
        rows: dict[int, Tensor] = {}
        for chunk, batch in iter_batches(data, self.config.candidates.batch_size, length_order(data, range(len(data)))):
            logits = self.adapter.logits(params, self.adapter.to_device(batch))
            rows.update(zip(chunk, logits.softmax(-1).float().cpu(), strict=True))
        return torch.stack([rows[i] for i in range(len(data))])

    def features(self, data: Dataset, desc: str | None = None) -> Tensor:
        """kNN features [n, d] of every example, in length-sorted batches (with a progress bar when ``desc``)."""
        rows: dict[int, Tensor] = {}
        order = length_order(data, range(len(data)))
        bar = self._bar(desc is not None, total=len(data), desc=desc, unit="ex")
        for chunk, batch in iter_batches(data, self.config.candidates.batch_size, order):
            rows.update(zip(chunk, self.adapter.features(self.adapter.to_device(batch)).float().cpu(), strict=True))
            bar.update(len(chunk))
        bar.close()
        return torch.stack([rows[i] for i in range(len(data))])

    # ------------------------------------------------------------------------------------------ index

    def _open_store(self) -> Store:
        """The index store for this model and training set; with ``overwrite``, a mismatched one is emptied."""
        config = self.config
        identity = {
            "model_fingerprint": fingerprint_parameters(dict(self.loaded.model.state_dict())),
            "data_fingerprint": self.train.fingerprint(),
            "config": {
                "feature_module": config.candidates.feature_module,
                "faiss": config_to_dict(config.candidates.faiss),
            },
        }
        try:
            return Store.open(config.output.index_path, **identity)
        except StoreError:
            if not config.output.overwrite:
                raise
            return Store.open(config.output.index_path, overwrite=True, **identity)

    @cached_property
    def index(self) -> CandidateIndex:
        """The FAISS index over the training features: loaded from the store when it holds one, else built, saved."""
        train, module = self.train, self.config.candidates.feature_module
        with self.stage("index"), self._open_store() as store:
            features_loaded = store.has(FEATURES_ENTRY)
            if features_loaded:
                features = store.load(FEATURES_ENTRY)
            else:
                features = self.features(train, "training features")
                store.save(FEATURES_ENTRY, features, {"n": len(train), "feature_module": module})
            folder = store.folder / FAISS_FOLDER
            try:
                index = CandidateIndex.load(folder)
                index.check_features(features)
                index_loaded = True
            except StoreError:
                index = CandidateIndex.build(features, self.config.candidates.faiss)
                index.save(folder)
                save_config(self.config.candidates, folder / "knn_config.json")
                index_loaded = False
        self.index_info = {
            "folder": str(store.folder),
            "features_loaded": features_loaded,
            "index_loaded": index_loaded,
            "n": index.n,
            "d": index.d,
            "feature_module": module,
        }
        return index

    # ------------------------------------------------------------------------------------------ test points

    def _describe(
        self, data: Dataset, row: int, probabilities: Tensor, index: int | None, source: str
    ) -> dict[str, Any]:
        """A test point as JSON: the recipe's display columns, gold and predicted label, and whether it is right."""
        names = self.loaded.label_names
        predicted = int(probabilities.argmax())
        return {
            "source": source,
            "index": index,
            **self.recipe.describe(data, row),
            "predicted": names[predicted],
            "probability": float(probabilities[predicted]),
            "correct": predicted == int(dataset_labels(data)[row]),
        }

    def _text_point(self) -> tuple[Dataset, list[dict[str, Any]]]:
        """The test point given as text; without a label it is explained against the model's prediction."""
        scoring, loaded, data_config = self.config.scoring, self.loaded, self.config.data
        label = scoring.label
        if label is None:
            draft = self.recipe.text_example(loaded, data_config, scoring.text, scoring.text_pair, "0")
            label = loaded.label_names[int(self.predict(draft)[0].argmax())]
        data = self.recipe.text_example(loaded, data_config, scoring.text, scoring.text_pair, label)
        source = "text" if scoring.label is not None else "text (label = the model's prediction)"
        return data, [self._describe(data, 0, self.predict(data)[0], None, source)]

    def _indexed_points(self, indices: Sequence[int], source: str) -> tuple[Dataset, list[dict[str, Any]]]:
        """Rows ``indices`` of the test set."""
        test = self.test_set
        bad = [i for i in indices if not 0 <= i < len(test)]
        if bad:
            raise DataError(f"test index {bad[0]} is out of range: the test set has {len(test)} examples")
        data = test.subset(list(indices))
        probabilities = self.predict(data)
        rows = enumerate(zip(probabilities, indices, strict=True))
        return data, [self._describe(data, row, p, i, source) for row, (p, i) in rows]

    def _picked_points(self) -> tuple[Dataset, list[dict[str, Any]]]:
        """``correct`` correctly and ``wrong`` wrongly predicted points drawn at random from the first ``pool``."""
        scoring, test = self.config.scoring, self.test_set
        pool = test.subset(range(min(scoring.pool, len(test))))
        right = (self.predict(pool).argmax(-1) == pool.labels).numpy()
        rng = np.random.default_rng(self.config.seed)
        chosen = [
            int(i)
            for wanted, mask in ((scoring.correct, right), (scoring.wrong, ~right))
            for i in rng.permutation(np.flatnonzero(mask))[:wanted]
        ]
        if not chosen:
            raise DataError("no test point to explain: the pool holds none of the kinds asked for; raise scoring.pool")
        return self._indexed_points(chosen, "picked")

    def test_points(self) -> tuple[Dataset, list[dict[str, Any]]]:
        """The test points to explain (text, indices, or picked correct/wrong predictions) and their descriptions."""
        scoring = self.config.scoring
        with self.stage("test points"):
            if scoring.text is not None:
                return self._text_point()
            if scoring.test_indices:
                return self._indexed_points(scoring.test_indices, "index")
            return self._picked_points()

    # ------------------------------------------------------------------------------------------ s_test

    def _workers(self) -> tuple[int, int]:
        """(worker processes, LiSSA repeats): repeats default to the number of workers."""
        stage = self.config.solver
        workers = stage.workers or usable_cores()
        repeats = stage.repeats or workers
        if stage.method != "lissa" or self.device.type != "cpu":
            workers = 1
        return min(workers, repeats), repeats

    def solve(self, vectors: Tensor) -> tuple[SolveResult, dict[str, Any]]:
        """s_test for the rows of ``vectors`` and how it ran; parallel LiSSA chains when there are workers.

        The solver's warnings (e.g. a chain that has not settled) go into the returned run info, so the CLI can
        print them after the tables instead of in the middle of a progress bar.
        """
        workers, repeats = self._workers()
        typed = solver_config(self.config.solver, self.config.seed, repeats)
        run: dict[str, Any] = {"method": self.config.solver.method, "workers": workers}
        run["repeats"] = repeats if self.config.solver.method == "lissa" else None
        with self.stage("s_test"), warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            result = self._solve_parallel(typed, vectors, workers) if workers > 1 else self._solve_here(typed, vectors)
        return result, {**run, "warnings": [str(warning.message) for warning in caught]}

    def _solve_parallel(self, typed: Any, vectors: Tensor, workers: int) -> SolveResult:
        """LiSSA chains spread over ``workers`` local processes (``fastif.runner``)."""
        train, batch_size = self.train, self.config.solver.hessian_batch_size

        def build(_device: torch.device) -> Problem:
            return Problem(self.adapter, train, batch_size)

        with Runner(build, RunnerConfig(backend="processes", workers=workers)) as runner:
            return runner.solve(typed, vectors)

    def _solve_here(self, typed: Any, vectors: Tensor) -> SolveResult:
        """Any solver in this process, with a progress bar over its Hessian-vector products."""
        stage = self.config.solver
        total = None
        if stage.method == "lissa":
            total = stage.scale_samples * stage.power_iterations * (stage.scale is None) + typed.repeats * stage.depth
        bar = self._bar(total=total, desc="s_test", unit="hvp")
        hessian = _ProgressHessian(self.adapter, self.train, self.flat, stage.hessian_batch_size, bar=bar)
        try:
            return solver_from_config(typed).fit(hessian).solve(vectors)
        finally:
            bar.close()

    # ------------------------------------------------------------------------------------------ explain

    def _candidates(self, test: Dataset) -> list[list[int]] | None:
        """Each test point's k nearest training points (one list for a group), or None to score them all."""
        k, group = self.config.candidates.count, self.config.scoring.group
        if k is None:
            return None
        index = self.index
        if k > index.n:
            raise DataError(f"candidates.count={k} exceeds the {index.n} training points; lower --candidates")
        with self.stage("knn"):
            features = self.features(test)
            if group:
                return [index.search_mean(features, k).tolist()]
            return index.search(features, k)[1].tolist()

    def _score(self, s_test: Tensor, candidates: list[list[int]] | None) -> list[TopK]:
        """Top-k helpful and harmful training points per s_test row, among its candidates (or all points)."""
        scoring, train = self.config.scoring, self.train
        config = ScoreConfig(method=scoring.method, batch_size=scoring.batch_size)
        pool = len(train) if candidates is None else len(candidates[0])
        if scoring.top_k > pool:
            raise DataError(f"scoring.top_k={scoring.top_k} exceeds the {pool} scored training points per test point")
        with self.stage("scores"):
            if candidates is None:
                scores = score_matrix(self.adapter, self.flat, s_test, train, None, config)
                top = top_k_from_scores(scores, scoring.top_k)
                return [_top_row(top, i) for i in range(len(s_test))]
            results = []
            for row, indices in zip(self._bar(iterable=s_test, desc="scores", unit="test"), candidates, strict=True):
                order = sorted(indices, key=lambda j: train.lengths[j])  # similar lengths per batch: little padding
                scores = score_matrix(self.adapter, self.flat, row[None], train, order, config)
                results.append(top_k_from_scores(scores, scoring.top_k, order))
            return results

    def _rows(self, indices: Tensor, scores: Tensor) -> list[dict[str, Any]]:
        """Training points as JSON rows: rank, index, the recipe's display columns, and score."""
        pairs = zip(indices.tolist(), scores.tolist(), strict=True)
        return [
            {"rank": rank, "train_index": index, **self.recipe.describe(self.train, index), "score": score}
            for rank, (index, score) in enumerate(pairs, start=1)
        ]

    def explain(self, test: Dataset | None = None, described: list[dict[str, Any]] | None = None) -> dict:
        """Explain the test points (default: those of :meth:`test_points`) by their top helpful and harmful
        training points; returns the JSON-ready report (with s_test diagnostics, index info and stage times)."""
        if test is None:
            test, described = self.test_points()
        described = described or [{"index": i} for i in range(len(test))]
        group = self.config.scoring.group
        candidates = self._candidates(test)
        with self.stage("test gradients"):
            if group:
                vectors = mean_loss_grad(self.adapter, self.flat, test, self.config.scoring.batch_size)[None]
            else:
                vectors = dataset_grads(self.adapter, self.flat, test, batch_size=self.config.scoring.batch_size)
        result, run = self.solve(vectors.detach())  # a group's gradient can carry a graph to frozen parameters
        tops = self._score(result.x, candidates)
        queries = [{"group": described}] if group else [{"test": item} for item in described]
        explained = [
            {
                **query,
                "candidates": len(self.train) if candidates is None else len(candidates[i]),
                "helpful": self._rows(top.helpful_indices[0], top.helpful_scores[0]),
                "harmful": self._rows(top.harmful_indices[0], top.harmful_scores[0]),
            }
            for i, (query, top) in enumerate(zip(queries, tops, strict=True))
        ]
        return self.report(explained, {**run, **jsonable(result.info)})

    def report(self, explained: list[dict[str, Any]], s_test: dict[str, Any]) -> dict[str, Any]:
        """The JSON-ready results of a run: semantics, model, parameters, index, s_test diagnostics and times."""
        from .. import __version__

        return {
            "fastif_version": __version__,
            "semantics": SEMANTICS,
            "model": {**self.loaded.info, "labels": list(self.loaded.label_names)},
            "parameters": {"count": self.adapter.num_params, "include": list(self.adapter.config.include)},
            "train": {"source": self.config.data.train, "size": len(self.train)},
            "index": self.index_info,
            "s_test": s_test,
            "timings": dict(self.timings),
            "explained": explained,
        }


def run_pipeline(config: PipelineConfig) -> tuple[dict[str, Any], list[Path]]:
    """Explain the configured test points and write JSON, CSV and config into ``config.output.folder``."""
    report = Pipeline(config).explain()
    return report, write_results(report, config, config.output.folder)
