"""FastIF end to end: model → features → kNN index (built once, saved) → fast s_test → candidate scores → top-k.

:class:`Pipeline` runs the stages of a :class:`~fastif.pipeline.config.PipelineConfig` lazily and times each one.
The kNN index (and the frozen path's training pass) lives in a :class:`~fastif.store.Store` under the cache root,
named by the model's and the training set's fingerprints and the index settings, so any later command on the same
model and data reuses it; an ``--index-dir`` store made for another model or data is refused (or rebuilt with
``overwrite``). s_test is LiSSA in its automatic mode by default (depth grown until the residual target is met); a
fixed depth runs ``repeats`` chains in parallel worker processes through :mod:`fastif.runner` when there is more
than one worker.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .. import progress
from ..candidates import MANIFEST_FILE, CandidateIndex, compute_features
from ..config import DEFAULT_DAMPING, config_to_dict, save_config
from ..data import Dataset, iter_batches, length_order
from ..errors import ConfigError, DataError, StoreError
from ..files import jsonable
from ..fingerprint import fingerprint_parameters
from ..gradient_store import BuildReport, GradientStore, ShardDone
from ..influence import CandidateScores, Influence
from ..model.adapter import AdapterConfig, HFClassifierAdapter
from ..model.hf import top_layer_parameters
from ..model.predict import dataset_labels
from ..runner import RunnerConfig, usable_cores
from ..scores import ScoreConfig
from ..solvers import SOLVERS, solver_from_config
from ..solvers.kfac import EKFACConfig, KFACConfig
from ..solvers.lissa import first_attempt
from ..store import Store
from ..store.artifacts import index_cache_folder
from .config import ParameterConfig, PipelineConfig, SolverStageConfig
from .output import describe_index, write_results
from .recipe import LoadedModel, Recipe, find_recipe

SEMANTICS = (
    "score = ∇L(test)ᵀ (H + damping·I)⁻¹ ∇L(train) over the selected parameters; positive = helpful: removing "
    "the training point is predicted to raise the test loss (against its gold label) by score / n"
)
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


def build_adapter(loaded: LoadedModel, config: ParameterConfig, feature_module: str | None) -> HFClassifierAdapter:
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


def solver_config(config: SolverStageConfig, seed: int, repeats: int | None) -> Any:
    """The typed config of the solver ``config.method`` names (from the registry), taking each of its fields
    that the stage has (damping, depth, batch size, ...; unset ones stay unset, for LiSSA to choose), the run's
    seed, and LiSSA's ``repeats``."""
    config_class = SOLVERS[config.method].config_class
    stage = {**dataclasses.asdict(config), "seed": seed, "repeats": repeats}
    stage["preconditioner"] = _preconditioner_config(config, seed)
    fields = {field.name for field in dataclasses.fields(config_class)}
    return config_class(**{name: value for name, value in stage.items() if name in fields})


def _preconditioner_config(config: SolverStageConfig, seed: int) -> EKFACConfig | KFACConfig | None:
    """The factor config ``solver.preconditioner`` names, at the stage's damping and the run's seed."""
    if config.preconditioner in (None, "none"):
        return None
    factors = EKFACConfig if config.preconditioner == "ekfac" else KFACConfig
    return factors(damping=config.damping or 0.0, seed=seed)


def _recall_json(recall: dict[str, Any]) -> dict[str, Any]:
    """A row's recall estimates (helpful, harmful) as JSON."""
    return {side: dataclasses.asdict(estimate) for side, estimate in recall.items()}


def _describe_split(influence: Influence) -> dict[str, Any] | None:
    """The frozen path as JSON: where the model is cut and what the cache holds (None when it does not run)."""
    split = influence.split
    if split is None:
        return None
    return {"layers": split.layers, "first_layer": split.first, "first_token_only": split.first_token_only}


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
        """Add the wall time of the enclosed block, less that of stages nested in it, to ``timings[name]``; with
        ``output.progress`` on, its long tasks show bars with an ETA."""
        start = time.perf_counter()
        self._nested.append(0.0)
        reporter = progress.BarReporter() if self.config.output.progress else progress.SilentReporter()
        try:
            with progress.reporting(reporter):
                yield
        finally:
            elapsed, inner = time.perf_counter() - start, self._nested.pop()
            self.timings[name] = self.timings.get(name, 0.0) + elapsed - inner
            if self._nested:
                self._nested[-1] += elapsed

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

    def features(self, data: Dataset) -> Tensor:
        """kNN features [n, d] of every example (from the frozen path's pass where it runs)."""
        prepared = self.influence.prepare(data)
        if prepared.features is not None:
            return prepared.features
        return compute_features(self.adapter, data, self.config.candidates.batch_size)

    # ------------------------------------------------------------------------------------------ index

    @cached_property
    def store_identity(self) -> dict[str, Any]:
        """What the index store's contents depend on: the model's and the training set's fingerprints and the
        index's settings."""
        config = self.config
        return {
            "model_fingerprint": fingerprint_parameters(dict(self.loaded.model.state_dict())),
            "data_fingerprint": self.train.fingerprint(),
            "config": {
                "feature_module": self.adapter.feature_name,
                "faiss": config_to_dict(config.candidates.faiss),
                "parameters": list(self.adapter.names),
            },
        }

    @cached_property
    def index_folder(self) -> Path:
        """``--index-dir`` when given, else a folder under the cache root named by :attr:`store_identity`'s digest,
        so every command on the same model, data and index settings reuses one index and one training pass."""
        given = self.config.output.index_folder
        return Path(given) if given else index_cache_folder(self.store_identity)

    def open_store(self) -> Store:
        """The index store for this model and training set; with ``overwrite``, a mismatched one is emptied."""
        identity, folder = self.store_identity, self.index_folder
        try:
            return Store.open(folder, **identity)
        except StoreError:
            if not self.config.output.overwrite:
                raise
            return Store.open(folder, overwrite=True, **identity)

    @cached_property
    def influence(self) -> Influence:
        """The facade every influence step goes through: solver, score settings, the frozen path and the index."""
        stage, scoring = self.config.solver, self.config.scoring
        _, repeats = self.parallelism()
        solver = solver_from_config(solver_config(stage, self.config.seed, repeats))
        return Influence(
            self.adapter,
            self.train,
            solver,
            ScoreConfig(method=scoring.method, batch_size=scoring.batch_size),
            hessian_batch_size=stage.hessian_batch_size,
            candidates=self.config.candidates.faiss,
            frozen=self.config.parameters.frozen,
        )

    @cached_property
    def training_pass(self) -> dict[str, Any]:
        """The one pass over the training set (activations on the frozen path, else kNN features): loaded from the
        store when it holds it, else computed and saved there. Returns what ran, for the report."""
        influence = self.influence
        with self.stage("index"), self.open_store() as store:
            influence.cache = store
            try:
                loaded = influence.cached_training_pass()
            finally:
                influence.cache = None
        return {"folder": str(store.folder), "loaded": loaded, "split": _describe_split(influence)}

    @cached_property
    def index(self) -> CandidateIndex:
        """The FAISS index over the training features: loaded from the store when it holds one, else built, saved."""
        influence, info = self.influence, self.training_pass
        with self.stage("index"), self.open_store() as store:
            folder = store.folder / FAISS_FOLDER
            try:
                index = CandidateIndex.load(folder)
                index.check_features(influence.train_features)
                index_loaded = True
            except StoreError as error:
                if (folder / MANIFEST_FILE).exists():
                    warnings.warn(f"{error}; rebuilt the index", RuntimeWarning, stacklevel=2)
                index = CandidateIndex.build(influence.train_features, self.config.candidates.faiss)
                index.save(folder)
                save_config(self.config.candidates, folder / "knn_config.json")
                index_loaded = False
        influence.build_index(index)
        self.index_info = {
            "folder": info["folder"],
            "features_loaded": info["loaded"],
            "index_loaded": index_loaded,
            "n": index.n,
            "d": index.d,
            "feature_module": self.adapter.feature_name,
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

    @property
    def store_folder(self) -> Path:
        """The gradient store's folder: ``candidates.store``, default ``<output>/gradients``."""
        folder = self.config.candidates.store
        return Path(folder) if folder else Path(self.config.output.folder) / "gradients"

    def build_gradient_store(self, on_shard: Callable[[ShardDone], None] | None = None) -> BuildReport:
        """Build (or resume) the training set's gradient store on the frozen path, and use it for retrieval."""
        influence = self.influence
        if influence.split is not None:
            self.training_pass  # noqa: B018 (the store is built on the head, from the cached activations)
        with self.stage("store"):
            return influence.build_gradient_store(
                self.store_folder, self.config.candidates.gradients, overwrite=self.config.output.overwrite,
                on_shard=on_shard, fingerprint=self.train.fingerprint(),
            )  # fmt: skip

    def open_gradient_store(self) -> GradientStore:
        """Open the finished gradient store (refusing one of another model, data or projection) and use it."""
        influence = self.influence
        if influence.split is not None:
            self.training_pass  # noqa: B018
        with self.stage("store"):
            store = GradientStore.open(
                self.store_folder, influence.work_adapter, influence.train_view, self.config.candidates.gradients,
                fingerprint=self.train.fingerprint(),
            )  # fmt: skip
        influence.use_gradient_store(store)
        return store

    def parallelism(self) -> tuple[int, int | None]:
        """(worker processes, LiSSA repeats): repeats default to the number of workers; LiSSA's automatic mode runs
        in this process (the runner does not split its attempts) with its own chain count unless one is set."""
        stage = self.config.solver
        if stage.method == "lissa" and stage.depth is None:
            return 1, stage.repeats
        workers = stage.workers or usable_cores()
        repeats = stage.repeats or workers
        if stage.method != "lissa" or self.device.type != "cpu":
            workers = 1
        return min(workers, repeats), repeats

    @property
    def lissa_chains(self) -> int:
        """How many chains LiSSA runs: the set or per-worker count, else the solver's own choice."""
        return first_attempt(self.influence.solver.config, len(self.train))[2]

    @property
    def candidate_method(self) -> str:
        """The candidate method: ``auto`` scores every training point where the frozen head reads one cached
        vector per example (cheaper than the kNN query), and takes FastIF's feature kNN otherwise."""
        config = self.config.candidates
        if config.count is None:
            return "all"
        if config.method != "auto":
            return config.method
        split = self.influence.split
        return "all" if split is not None and split.first_token_only else "features"

    def prepare(self) -> list[str]:
        """Run the one-off stages now (the frozen path's training pass, the kNN index where it is used) and say in
        a line each what ran, so a command can report them before the slow part."""
        lines, method = self.prepare_frozen(), self.candidate_method
        if method == "features":
            self.index  # noqa: B018
            lines.append(describe_index(self.index_info))
        elif method == "all" and self.config.candidates.count is not None:
            lines.append(
                f"candidates: all {len(self.train)} training points are scored (the frozen head reads one cached "
                "vector per example, which costs less than the kNN query); candidates.method=features for FastIF's kNN"
            )
        return lines

    def prepare_frozen(self) -> list[str]:
        """The frozen path's training pass (loaded or computed), as a line for the user; none without it."""
        lines, influence = [], self.influence
        if influence.split is not None:
            info = self.training_pass
            split, how = info["split"], "reused" if info["loaded"] else "computed"
            cached = "the first token" if split["first_token_only"] else f"the input of layer {split['first_layer']}"
            lines.append(
                f"frozen path: {cached} of every training point {how} ({self.timings.get('index', 0.0):.1f} s); "
                "gradients, HVPs and scores run on the top alone"
            )
        return lines

    def candidate_scores(self, test: Dataset) -> tuple[CandidateScores, dict[str, Any]]:
        """The facade's candidates → s_test → scores for ``test`` and how s_test ran (workers, warnings).

        The solver's warnings (e.g. a chain that has not settled) go into the run info, so the CLI can print them
        after the tables instead of in the middle of a progress bar.
        """
        influence, method = self.influence, self.candidate_method
        if influence.split is not None:
            self.training_pass  # noqa: B018 (the frozen path's activations: loaded or computed once)
        if method == "features":
            self.index  # noqa: B018
        workers, _ = self.parallelism()
        count = None if method == "all" else self.config.candidates.count
        if count is not None and count > len(self.train):
            raise DataError(
                f"candidates.count={count} exceeds the {len(self.train)} training points; lower --candidates"
            )
        run: dict[str, Any] = {"method": self.config.solver.method, "workers": workers, "candidates": method}
        run["repeats"] = self.lissa_chains if self.config.solver.method == "lissa" else None
        parallel = influence.parallel(RunnerConfig(backend="processes", workers=workers)) if workers > 1 else None
        with warnings.catch_warnings(record=True) as caught, parallel or contextlib.nullcontext():
            warnings.simplefilter("always")
            result = influence.candidate_scores(
                test, count, self.config.scoring.group, method=method, recall_k=self.config.scoring.top_k
            )
        for name, seconds in result.timings.items():
            self.timings[name] = self.timings.get(name, 0.0) + seconds
        notes = list(dict.fromkeys(str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)))
        if result.solve.info.get("converged") is False:  # the API user sees it too, not only the report
            warnings.warn(
                f"s_test ({run['method']}) did not settle, so the scores are approximate: "
                f"{' '.join(notes) or 'see s_test.converged in the report'}",
                RuntimeWarning,
                stacklevel=2,
            )
        return result, {**run, "warnings": notes}  # the solver's own notes, each once

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
        scored, run = self.candidate_scores(test)
        top_k = self.config.scoring.top_k
        if top_k > scored.indices.shape[1]:
            raise DataError(
                f"scoring.top_k={top_k} exceeds the {scored.indices.shape[1]} scored training points per test point"
            )
        top = scored.top_k(top_k)
        queries = [{"group": described}] if self.config.scoring.group else [{"test": item} for item in described]
        explained = [
            {
                **query,
                "candidates": int(scored.indices.shape[1]),
                "helpful": self._rows(top.helpful_indices[i], top.helpful_scores[i]),
                "harmful": self._rows(top.harmful_indices[i], top.harmful_scores[i]),
                **({"recall": _recall_json(scored.recall[i])} if scored.recall else {}),
            }
            for i, query in enumerate(queries)
        ]
        return self.report(explained, {**run, **jsonable(scored.solve.info)})

    def report(self, explained: list[dict[str, Any]], s_test: dict[str, Any]) -> dict[str, Any]:
        """The JSON-ready results of a run: semantics, model, parameters, index, s_test diagnostics and times."""
        from .. import __version__

        return {
            "fastif_version": __version__,
            "semantics": SEMANTICS,
            "model": {**self.loaded.info, "labels": list(self.loaded.label_names)},
            "parameters": {"count": self.adapter.num_params, "include": list(self.adapter.config.include)},
            "train": {"source": self.config.data.train, "size": len(self.train)},
            "frozen": self.training_pass["split"] if "training_pass" in self.__dict__ else None,
            "index": self.index_info,
            "s_test": s_test,
            "timings": dict(self.timings),
            "explained": explained,
        }


def run_pipeline(config: PipelineConfig) -> tuple[dict[str, Any], list[Path]]:
    """Explain the configured test points and write JSON, CSV and config into ``config.output.folder``."""
    report = Pipeline(config).explain()
    return report, write_results(report, config, config.output.folder)
