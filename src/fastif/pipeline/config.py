"""Typed stage configs of the end-to-end pipeline, composed into one :class:`PipelineConfig`.

One frozen dataclass per stage (model, data, parameters, candidates, solver, scoring, output). A whole config
loads from a TOML, YAML or JSON file with one table per stage; unknown keys and wrong types raise a
:class:`~fastif.errors.ConfigError` naming the file, the table and the key, so a typo never falls back silently.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from ..candidates import CandidateConfig
from ..config import check_number, config_from_dict, config_to_dict
from ..errors import ConfigError
from ..gradient_store import GradientStoreConfig
from ..model.frozen import FrozenMode
from ..model.hf import L2_EXCLUDE
from ..scores import ScoreMethod
from ..solvers import SOLVERS, LiSSAConfig
from .recipe import find_recipe

EMBEDDED_MODEL = "embedded"


@dataclass(frozen=True)
class ModelConfig:
    """Which recipe and classifier to explain.

    ``recipe_name`` names a recipe of the ``fastif.recipes`` entry points (or ``module:attribute``); ``model`` is
    ``"embedded"`` (the recipe's own model, trained once and cached), a folder written by ``fastif train``, any
    local HF sequence-classification checkpoint, or a hub name (online). ``recipe`` holds the recipe's training
    options (a table in config files), typed by the recipe.
    """

    recipe_name: str = "nli"
    model: str = EMBEDDED_MODEL
    recipe: Any = None

    def __post_init__(self) -> None:
        """Type the recipe's options (defaults when unset) with the recipe's own config class."""
        object.__setattr__(self, "recipe", find_recipe(self.recipe_name).options(self.recipe))


@dataclass(frozen=True)
class DataConfig:
    """Where the training and test examples come from and how their columns map to (text, text pair, label).

    ``train`` / ``test`` are a set the recipe bundles (the NLI recipe's ``mnli_train``, ``mnli_test``,
    ``hans_eval``, ...), a JSONL/CSV/TSV file, or ``hf:NAME[:CONFIG][@SPLIT]`` (Hugging Face ``datasets``,
    online). ``text_pair_column=None`` makes single-text examples. ``label_names=()`` takes the model's
    ``id2label``. A recipe may cut its own training split to the points its model was trained on;
    ``train_size`` cuts any training set further.
    """

    train: str = "mnli_train"
    test: str = "mnli_test"
    text_column: str = "premise"
    text_pair_column: str | None = "hypothesis"
    label_column: str = "label"
    id_column: str | None = "id"
    label_names: tuple[str, ...] = ()
    max_length: int = 128
    train_size: int | None = None

    def __post_init__(self) -> None:
        """Refuse sizes that cannot work."""
        check_number("data.max_length", self.max_length, integer=True, minimum=2)
        check_number("data.train_size", self.train_size, integer=True, minimum=1, optional=True)


@dataclass(frozen=True)
class ParameterConfig:
    """Which parameters influence is taken over, and the training objective's L2 term (adapter stage).

    With ``include`` empty: the last ``top_layers`` encoder layers plus everything outside the embeddings and the
    encoder (pooler, classifier). The default 0 keeps the pooler and classifier (149k parameters on MiniLM), which
    fits the demo's time budget on 2 CPU cores; FastIF took BERT's top two layers too (``top_layers=2``).
    ``l2=None`` takes the recipe's L2 for a fastif-trained model and 0 otherwise. ``frozen`` picks the frozen-bottom
    path (:mod:`fastif.model.frozen`): ``"auto"`` computes the layers below the selection once per example and runs
    every influence step on the top alone (same numbers), where the architecture has a splitter.
    """

    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    top_layers: int = 0
    l2: float | None = None
    l2_exclude: tuple[str, ...] = L2_EXCLUDE
    frozen: FrozenMode = "auto"

    def __post_init__(self) -> None:
        """Refuse a negative layer count, a negative or infinite L2 term, or an unknown frozen mode."""
        check_number("parameters.top_layers", self.top_layers, integer=True, minimum=0)
        if self.frozen not in ("auto", "on", "off"):
            raise ConfigError(f"parameters.frozen must be 'auto', 'on' or 'off', got {self.frozen!r}")
        check_number("parameters.l2", self.l2, minimum=0, optional=True)


@dataclass(frozen=True)
class CandidatesConfig:
    """The candidate stage: which ``count`` training points are scored exactly (``None`` = all of them).

    ``method``: ``"features"`` is FastIF's kNN in feature space; ``"all"`` scores every training point;
    ``"auto"`` (default) scores all of them where the frozen head reads one cached vector per example (there that
    costs less than the kNN query) and takes ``"features"`` otherwise; ``"gradients"`` retrieves them from the
    gradient store (``store``: folder, default ``<output>/gradients``; built once by ``fastif store build``) by
    projected influence, reranks them exactly and estimates the recall of the exact top-k. Features are the input of
    ``feature_module`` at the position the model classifies from; the default, ``None``, finds the head (BERT's
    ``classifier``, GPT-2's and Llama's ``score``): for BERT the pooled [CLS] vector. Features (and predictions)
    are computed ``batch_size`` examples at a time; ``faiss`` holds the index type and its parameters.
    """

    count: int | None = 100
    method: Literal["auto", "features", "all", "gradients"] = "auto"
    feature_module: str | None = None
    batch_size: int = 64
    faiss: CandidateConfig = field(default_factory=CandidateConfig)
    store: str | None = None
    gradients: GradientStoreConfig = field(default_factory=GradientStoreConfig)

    def __post_init__(self) -> None:
        """Refuse a non-positive count or batch size, or an unknown method."""
        if self.method not in ("auto", "features", "all", "gradients"):
            raise ConfigError(
                f"candidates.method must be 'auto', 'features', 'all' or 'gradients', got {self.method!r}"
            )
        check_number("candidates.count", self.count, integer=True, minimum=1, optional=True)
        check_number("candidates.batch_size", self.batch_size, integer=True, minimum=1)


def _lissa_default(name: str) -> Any:
    """:class:`LiSSAConfig`'s default for field ``name``: the stage takes the API's LiSSA defaults, never a copy."""
    return next(field.default for field in dataclasses.fields(LiSSAConfig) if field.name == name)


@dataclass(frozen=True)
class SolverStageConfig:
    """How s_test = (H + damping·I)⁻¹ ∇L(test) is solved; LiSSA is FastIF's fast s_test.

    LiSSA's options default to ``LiSSAConfig()``'s: the **automatic mode** (``depth=None``) runs attempts of doubling
    depth (and batch size, when unset) until the relative residual on the full H is at most ``target_residual``,
    within ``max_steps``; ``batch_size`` / ``tail_average`` left unset are the mode's choice (see
    :class:`~fastif.solvers.LiSSAConfig`). A set ``depth`` is the **fixed mode**: ``repeats`` chains (default: one
    per worker, run in parallel by ``fastif.runner``) of ``depth`` steps at ``batch_size``; FastIF's fast s_test as
    the pipeline ran it before is ``depth=500, batch_size=1, tail_average=0.5`` (plus ``scale_samples=4,
    power_iterations=10``). ``scale=None`` estimates the top batch-Hessian eigenvalue by power iteration
    (``scale_samples`` batches × ``power_iterations``) so the recursion contracts. ``workers`` = processes for the
    fixed mode's chains (``None`` = one per usable CPU core); the automatic mode runs in one process. CG / Arnoldi
    use full-data HVPs in batches of ``hessian_batch_size``. ``damping=None`` takes the recipe's damping.
    ``preconditioner`` (``"ekfac"``, ``"kfac"`` or ``"none"``; LiSSA and PCG only) is fitted at the solver's damping
    and seed; unset, LiSSA runs without one and PCG with EK-FAC. Arnoldi keeps ``rank`` eigenpairs; ``complement``
    divides the rest of each vector by the damping instead of dropping it (:class:`~fastif.solvers.ArnoldiConfig`).
    """

    method: str = "lissa"
    damping: float | None = None
    depth: int | None = _lissa_default("depth")
    repeats: int | None = None
    batch_size: int | None = _lissa_default("batch_size")
    scale: float | None = None
    scale_samples: int = _lissa_default("scale_samples")
    power_iterations: int = _lissa_default("power_iterations")
    tail_average: float | None = _lissa_default("tail_average")
    target_residual: float = _lissa_default("target_residual")
    max_steps: int = _lissa_default("max_steps")
    workers: int | None = None
    max_iterations: int = 100
    rank: int = 20
    complement: bool = False
    hessian_batch_size: int = 32
    preconditioner: Literal["ekfac", "kfac", "none"] | None = None

    def __post_init__(self) -> None:
        """Refuse an unknown solver, non-positive sizes, a negative or non-finite damping, a non-positive scale or
        residual target, a tail outside [0, 1), and a preconditioner the solver cannot take."""
        if self.method not in SOLVERS:
            raise ConfigError(f"solver.method must be one of {sorted(SOLVERS)}, got {self.method!r}")
        check_stage_preconditioner(self.method, self.preconditioner)
        sizes = ("scale_samples", "power_iterations", "max_steps", "max_iterations", "rank", "hessian_batch_size")
        for name in sizes:
            check_number(f"solver.{name}", getattr(self, name), integer=True, minimum=1)
        for name in ("depth", "batch_size", "repeats", "workers"):
            check_number(f"solver.{name}", getattr(self, name), integer=True, minimum=1, optional=True)
        check_number("solver.damping", self.damping, minimum=0, optional=True)
        check_number("solver.scale", self.scale, above=0, optional=True)
        check_number("solver.tail_average", self.tail_average, minimum=0, below=1, optional=True)
        check_number("solver.target_residual", self.target_residual, above=0)


PRECONDITIONED = {"lissa": ("ekfac", "kfac", "none"), "pcg": ("ekfac", "kfac")}
"""The solvers that take ``solver.preconditioner``, and the values each accepts."""


def check_stage_preconditioner(method: str, preconditioner: str | None) -> None:
    """Refuse ``solver.preconditioner`` for a solver that has none, or a value it cannot take."""
    if preconditioner is None:
        return
    accepted = PRECONDITIONED.get(method)
    if accepted is None:
        raise ConfigError(
            f"solver.preconditioner applies to {' and '.join(PRECONDITIONED)} only, not {method!r}; remove it",
            "solver.preconditioner",
        )
    if preconditioner not in accepted:
        raise ConfigError(
            f"solver.preconditioner for {method} must be one of {list(accepted)}, got {preconditioner!r}",
            "solver.preconditioner",
        )


@dataclass(frozen=True)
class ScoringConfig:
    """Which test points are explained and how many training points are shown for each.

    Test points are, in order of precedence: ``text`` (+ ``text_pair``, ``label``) given as text, the rows of
    the test set at ``test_indices``, or ``correct`` correctly and ``wrong`` wrongly predicted points picked at
    random (``seed``) among the first ``pool`` test points. A text without ``label`` is explained against the
    model's prediction. ``group`` explains the mean loss of all of them, with candidates near their mean feature.
    """

    top_k: int = 5
    group: bool = False
    method: ScoreMethod = "auto"
    batch_size: int = 256
    test_indices: tuple[int, ...] = ()
    correct: int = 2
    wrong: int = 2
    pool: int = 100
    text: str | None = None
    text_pair: str | None = None
    label: str | None = None

    def __post_init__(self) -> None:
        """Refuse sizes that select nothing."""
        for name in ("top_k", "batch_size", "pool"):
            check_number(f"scoring.{name}", getattr(self, name), integer=True, minimum=1)
        for name in ("correct", "wrong"):
            check_number(f"scoring.{name}", getattr(self, name), integer=True, minimum=0)
        if self.correct + self.wrong == 0:
            raise ConfigError("scoring.correct and scoring.wrong must not both be 0", "scoring.correct")
        for index in self.test_indices:
            check_number("scoring.test_indices", index, integer=True, minimum=0)


@dataclass(frozen=True)
class OutputConfig:
    """Where results go: ``folder`` gets JSON, CSV and the config. The kNN index and the frozen path's training
    pass live in ``index_folder``, by default a folder under the cache root named by the fingerprints of model,
    data and index settings, which every command reuses; ``overwrite`` replaces a finished run's results and an
    ``index_folder`` store made for another model, data or index config (instead of refusing them)."""

    folder: str = "fastif-results/influence"
    index_folder: str | None = None
    overwrite: bool = False
    progress: bool = True


@dataclass(frozen=True)
class PipelineConfig:
    """Every stage's config, plus the random ``seed`` and the torch ``device`` the model runs on."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    parameters: ParameterConfig = field(default_factory=ParameterConfig)
    candidates: CandidatesConfig = field(default_factory=CandidatesConfig)
    solver: SolverStageConfig = field(default_factory=SolverStageConfig)
    scoring: ScoringConfig = field(default_factory=ScoringConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    seed: int = 0
    device: str = "cpu"

    def __post_init__(self) -> None:
        """Refuse a seed that torch and numpy cannot take (they need 0 <= seed < 2**32)."""
        check_number("seed", self.seed, integer=True, minimum=0, below=2**32)


def _check_keys(cls: type, data: Any, source: str, table: str = "") -> None:
    """Refuse unknown keys in ``data`` and in its nested stage tables, naming the table and the key."""
    where = f"{source}: [{table}]" if table else f"{source}:"
    if not isinstance(data, dict):
        raise ConfigError(f"{where} expected a table of options, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key, value in data.items():
        if key == "type":
            continue
        if key not in fields:
            raise ConfigError(f"{where} unknown option {key!r}; valid options are {sorted(fields)}")
        nested = fields[key].default_factory
        if dataclasses.is_dataclass(nested):
            _check_keys(nested, value, source, f"{table}.{key}" if table else key)


def config_from_mapping(data: Any, source: str = "config") -> PipelineConfig:
    """Build a PipelineConfig from nested dicts (one table per stage), refusing unknown keys and wrong types."""
    _check_keys(PipelineConfig, data, source)
    try:
        return config_from_dict(PipelineConfig, data, "")
    except ConfigError as error:
        raise ConfigError(f"{source}: {error}", error.key) from None


def _parse(path: Path) -> Any:
    """The raw content of a TOML, YAML or JSON file; ConfigError with the parser's message in one line."""
    suffix = path.suffix.lower()
    if suffix not in (".toml", ".yaml", ".yml", ".json"):
        raise ConfigError(f"config file {path}: unknown format {suffix or '(none)'!r}; use .toml, .yaml, .yml or .json")
    try:
        text = path.read_text(encoding="utf-8-sig")  # a byte-order mark (Notepad, Excel) is dropped
    except OSError as error:
        raise ConfigError(f"cannot read config file {path}: {error.strerror or error}") from None
    except UnicodeDecodeError as error:
        raise ConfigError(
            f"config file {path} is not UTF-8 text ({error.reason} at byte {error.start}); save it as UTF-8"
        ) from None
    try:
        if suffix == ".toml":
            if sys.version_info >= (3, 11):
                import tomllib
            else:  # pragma: no cover - Python 3.10
                import tomli as tomllib
            return tomllib.loads(text)
        if suffix == ".json":
            return json.loads(text)
        import yaml

        return yaml.safe_load(text) or {}
    except Exception as error:  # each parser has its own error class; all mean "malformed file"
        message = " ".join(str(error).split())
        raise ConfigError(f"config file {path} is malformed: {message}") from None


def _merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """``base`` with ``update``'s values, tables merged key by key."""
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def load_pipeline_config(path: str | Path, base: PipelineConfig | None = None) -> PipelineConfig:
    """Read a PipelineConfig from a TOML, YAML or JSON file with tables ``[model]``, ``[data]``, ``[solver]``...;
    options the file leaves out keep their values in ``base`` (default: the defaults)."""
    path = Path(path)
    data = _parse(path)
    _check_keys(PipelineConfig, data, str(path))
    return config_from_mapping(_merge(config_to_dict(base or PipelineConfig()), data), str(path))


def with_overrides(config: PipelineConfig, overrides: dict[str, Any]) -> PipelineConfig:
    """A copy of ``config`` with dotted keys (``"solver.depth"``) set, type-checked like a config file."""
    data = config_to_dict(config)
    for dotted, value in overrides.items():
        *tables, key = dotted.split(".")
        table = data
        for name in tables:
            table = table[name]
        if key not in table:
            raise ConfigError(f"unknown option {dotted!r}")
        table[key] = list(value) if isinstance(value, tuple) else value
    return config_from_mapping(data, "options")
