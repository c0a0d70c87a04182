"""The command line's option tables: every pipeline option is a field of
:class:`~fastif.pipeline.PipelineConfig`, set by one :class:`_Option` (flags, dotted config key, help, type)."""

from __future__ import annotations

import argparse
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..config import SHOWN_CHARS
from ..errors import ConfigError
from ..solvers import SOLVERS
from ..solvers.lissa import AUTO_BATCH, AUTO_REPEATS, AUTO_START_DEPTH, AUTO_TAIL

EXIT_USAGE = 2
KEY_PREFIX = "cfg:"


class _Parser(argparse.ArgumentParser):
    """argparse that reports bad arguments as a one-line FastIF-style error with exit code 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(EXIT_USAGE, f"fastif: error: {shorten(message)} (see '{self.prog} --help')\n")


def shorten(message: str) -> str:
    """``message`` in one line, each overlong word (an echoed value) cut to about :data:`SHOWN_CHARS` characters."""
    words = message.split()
    return " ".join(
        word if len(word) <= SHOWN_CHARS else f"{word[:SHOWN_CHARS]}... ({len(word)} characters)" for word in words
    )


# ---------------------------------------------------------------------------------------------- option table


def _text_list(value: str) -> tuple[str, ...]:
    """``"a,b , c"`` -> ``("a", "b", "c")``."""
    return tuple(part.strip() for part in value.split(",") if part.strip())


def _int_list(value: str) -> tuple[int, ...]:
    """``"3,17"`` -> ``(3, 17)``."""
    try:
        return tuple(int(part) for part in _text_list(value))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {value!r}") from None


def _optional_text(value: str) -> str | None:
    """A text option where ``none`` means unset."""
    return None if value.lower() == "none" else value


def _count_or_all(value: str) -> int | None:
    """A positive count, or ``all`` (unset)."""
    if value.lower() == "all":
        return None
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer or 'all', got {value!r}") from None


@dataclass(frozen=True)
class _Option:
    """A command-line option that sets one config key (dotted path into PipelineConfig)."""

    flags: tuple[str, ...]
    key: str
    help: str
    type: Callable[[str], Any] | None = str
    choices: tuple[Any, ...] | None = None
    const: Any = None  # a flag without a value that sets the key to ``const``

    def add(self, parser: argparse.ArgumentParser, default: Any = None) -> None:
        """Add this option to ``parser``; it stays absent from the namespace unless given. Its help ends with
        ``default`` (the config's value, when it has one) and the config key it sets."""
        unset = default is None or default == () or self.const is not None  # the help's prose says what happens
        shown = "" if unset else f" (default: {_shown_default(default)})"
        help_text = f"{self.help}{shown} [{self.key}]".replace("%", "%%")
        common = {"dest": KEY_PREFIX + self.key, "default": argparse.SUPPRESS, "help": help_text}
        if self.const is not None:
            parser.add_argument(*self.flags, action="store_const", const=self.const, **common)
        else:
            metavar = None if self.choices else self.key.rpartition(".")[2].upper()
            parser.add_argument(*self.flags, type=self.type, choices=self.choices, metavar=metavar, **common)


MODEL = (
    "model",
    (
        _Option(
            ("--model",),
            "model.model",
            "'embedded' (MiniLM fine-tuned on the bundled MNLI split, trained once and cached), a "
            "folder written by 'fastif train', a local Hugging Face sequence-classification checkpoint, or a hub "
            "name (online)",
        ),
        _Option(("--labels",), "model.recipe.num_labels", "embedded model: 3-class NLI or 2-class", int, (2, 3)),
    ),
)
DATA = (
    "data",
    (
        _Option(
            ("--train",),
            "data.train",
            "training set: a bundled set (mnli_train, hans_train, ...), a JSONL/CSV/TSV file, or "
            "hf:NAME[:CONFIG][@SPLIT]",
        ),
        _Option(("--test",), "data.test", "test set, as --train"),
        _Option(("--text-column", "--premise-column"), "data.text_column", "column of the (first) text"),
        _Option(
            ("--text-pair-column", "--hypothesis-column"),
            "data.text_pair_column",
            "column of the second text ('none': single text)",
            _optional_text,
        ),
        _Option(("--label-column",), "data.label_column", "column of the label (a name or an id)"),
        _Option(("--id-column",), "data.id_column", "column of the example id ('none': row numbers)", _optional_text),
        _Option(
            ("--label-names",),
            "data.label_names",
            "label names in id order, comma-separated (default: the model's)",
            _text_list,
        ),
        _Option(("--max-length",), "data.max_length", "truncate pairs to this many tokens", int),
        _Option(("--train-size",), "data.train_size", "use only the first N training examples", int),
    ),
)
PARAMETERS = (
    "parameters",
    (
        _Option(
            ("--params",),
            "parameters.include",
            "parameters influence is taken over: names, module prefixes or globs, comma-separated "
            "(default: the top --top-layers encoder layers + pooler + classifier)",
            _text_list,
        ),
        _Option(
            ("--top-layers",), "parameters.top_layers", "encoder layers (from the top) in the default selection", int
        ),
        _Option(("--l2",), "parameters.l2", "L2 term of the training objective (default: the recipe's, else 0)", float),
        _Option(
            ("--frozen",),
            "parameters.frozen",
            "frozen-bottom path: compute the layers below the selection once, run influence on the top alone",
            str,
            ("auto", "on", "off"),
        ),
    ),
)
INDEX = (
    "kNN index",
    (
        _Option(
            ("--features",),
            "candidates.feature_module",
            "module whose input is the kNN feature (default: the model's head)",
        ),
        _Option(
            ("--index-type",),
            "candidates.faiss.index",
            "FAISS index: exact or approximate",
            str,
            ("flat", "ivf", "hnsw"),
        ),
        _Option(("--metric",), "candidates.faiss.metric", "kNN distance", str, ("l2", "ip", "cosine")),
    ),
)
CANDIDATES = (
    "candidates",
    (
        _Option(
            ("--candidates",), "candidates.count", "score only the K nearest training points, or 'all'", _count_or_all
        ),
        _Option(
            ("--candidate-method",),
            "candidates.method",
            "how candidates are found: FastIF's feature kNN, all points, or auto (all where the frozen head is cheap)",
            str,
            ("auto", "features", "all"),
        ),
    ),
)
SOLVER = (
    "s_test solver",
    (
        _Option(("--solver",), "solver.method", "inverse-HVP solver", str, tuple(sorted(SOLVERS))),
        _Option(
            ("--damping",), "solver.damping", "damping added to the Hessian (absolute; default: the recipe's)", float
        ),
        _Option(
            ("--depth",),
            "solver.depth",
            "LiSSA steps per chain (default: automatic, doubled from "
            f"{AUTO_START_DEPTH} until the relative residual on the full H is at most --target-residual; a set depth "
            "is the fixed mode, e.g. FastIF's fast s_test: --depth 500 --lissa-batch 1 --tail-average 0.5)",
            int,
        ),
        _Option(
            ("--repeats",),
            "solver.repeats",
            f"LiSSA chains averaged (default: {AUTO_REPEATS} when automatic, one per worker at a set --depth)",
            int,
        ),
        _Option(
            ("--lissa-batch",),
            "solver.batch_size",
            f"LiSSA minibatch size (default: {AUTO_BATCH} doubling with the depth when automatic, 1 at a set --depth)",
            int,
        ),
        _Option(
            ("--tail-average",),
            "solver.tail_average",
            f"fraction of each LiSSA chain's last iterates averaged (default: {AUTO_TAIL} when automatic, 0 = the "
            "last iterate at a set --depth)",
            float,
        ),
        _Option(
            ("--target-residual",),
            "solver.target_residual",
            "automatic LiSSA stops at this relative residual on the full H",
            float,
        ),
        _Option(("--max-steps",), "solver.max_steps", "automatic LiSSA's steps over all chains and attempts", int),
        _Option(("--scale",), "solver.scale", "LiSSA scale (default: automatic, by power iteration)", float),
        _Option(
            ("--preconditioner",),
            "solver.preconditioner",
            "LiSSA or PCG preconditioner, fitted at --damping (default: none for LiSSA, ekfac for PCG)",
            str,
            ("ekfac", "kfac", "none"),
        ),
        _Option(("--rank",), "solver.rank", "Arnoldi: eigenpairs of H kept", int),
        _Option(
            ("--complement",),
            "solver.complement",
            "Arnoldi: divide the rest of each vector by --damping instead of dropping it",
            const=True,
        ),
        _Option(
            ("--workers",),
            "solver.workers",
            "processes for LiSSA's chains at a set --depth (default: one per CPU core; automatic LiSSA runs in one)",
            int,
        ),
    ),
)
SCORING = (
    "what to explain",
    (
        _Option(("-k", "--top-k"), "scoring.top_k", "helpful and harmful training points shown per test point", int),
        _Option(("--text", "--premise"), "scoring.text", "explain this text (with --text-pair, optional --label)"),
        _Option(("--text-pair", "--hypothesis"), "scoring.text_pair", "second text of the pair given with --text"),
        _Option(("--label",), "scoring.label", "gold label of the text (default: the model's prediction)"),
        _Option(
            ("--test-indices",), "scoring.test_indices", "explain these rows of the test set, e.g. 3,17", _int_list
        ),
        _Option(("--correct",), "scoring.correct", "otherwise: explain N correctly predicted test points", int),
        _Option(("--wrong",), "scoring.wrong", "otherwise: explain N wrongly predicted test points", int),
        _Option(("--group",), "scoring.group", "explain the test points' mean loss as one group", const=True),
    ),
)
OUTPUT = (
    "output",
    (
        _Option(("--output",), "output.folder", "results folder (a finished run there is kept unless --overwrite)"),
        _Option(
            ("--index-dir",),
            "output.index_folder",
            "index store folder (default: one under the cache root named by model, data and index settings, "
            "shared by every command)",
        ),
        _Option(
            ("--overwrite",),
            "output.overwrite",
            "replace a finished run in OUTPUT, and rebuild an index made for another model, data or config",
            const=True,
        ),
        _Option(("--no-progress",), "output.progress", "hide progress bars", const=False),
    ),
)
GLOBAL = (
    "run",
    (
        _Option(("--seed",), "seed", "random seed (LiSSA batches, picked test points)", int),
        _Option(("--device",), "device", "torch device: cpu, cuda or cuda:N", str),
    ),
)
TRAIN = (
    "training recipe",
    (
        _Option(
            ("--labels",),
            "model.recipe.num_labels",
            "3-class NLI or 2-class (entailment vs non-entailment)",
            int,
            (2, 3),
        ),
        _Option(("--base-model",), "model.recipe.base_model", "'minilm' (bundled), a checkpoint folder, or a hub name"),
        _Option(
            ("--train-size",), "model.recipe.train_size", "training pairs from the bundled MNLI split (<= 8001)", int
        ),
        _Option(("--epochs",), "model.recipe.epochs", "passes over the training pairs", int),
        _Option(("--lr",), "model.recipe.lr", "Adam learning rate", float),
        _Option(("--batch-size",), "model.recipe.batch_size", "training batch size", int),
        _Option(("--frozen-layers",), "model.recipe.frozen_layers", "lower encoder layers kept frozen", int),
        _Option(("--l2",), "model.recipe.l2", "L2 term of the training objective", float),
        _Option(("--seed",), "model.recipe.seed", "training seed", int),
        _Option(("--no-progress",), "output.progress", "hide progress bars", const=False),
    ),
)


def _flags_by_key() -> dict[str, str]:
    """Each config key's command-line flags (``solver.damping`` -> ``--damping``), for naming both in errors."""
    flags: dict[str, str] = {}
    for _title, options in (MODEL, DATA, PARAMETERS, INDEX, CANDIDATES, SOLVER, SCORING, OUTPUT, GLOBAL, TRAIN):
        for option in options:
            flags.setdefault(option.key, "/".join(option.flags))
    return flags


def _name_the_flag(error: ConfigError) -> ConfigError:
    """``error`` with its config key prefixed by the key's flag: "--damping (solver.damping) must be ..."."""
    flag = _flags_by_key().get(error.key or "")
    if flag is None:
        return error
    message = re.sub(rf"(?<![\w.-]){re.escape(str(error.key))}(?![\w.])", f"{flag} ({error.key})", str(error), count=1)
    return ConfigError(message.removeprefix("options: "), error.key)


def _shown_default(value: Any) -> str:
    """A config default as the command line would spell it (lists comma-separated)."""
    return ",".join(str(item) for item in value) if isinstance(value, (tuple, list)) else str(value)


def config_default(key: str, defaults: dict[str, Any] | None = None) -> Any:
    """The value a dotted config key has when the command line does not set it: the subcommand's default, else
    :class:`~fastif.pipeline.PipelineConfig`'s."""
    from ..pipeline import PipelineConfig

    if defaults and key in defaults:
        return defaults[key]
    value: Any = PipelineConfig()
    for part in key.split("."):
        value = getattr(value, part)
    return value


def _add_options(
    parser: argparse.ArgumentParser, *groups: tuple[str, tuple[_Option, ...]], defaults: dict[str, Any] | None = None
) -> None:
    """Add titled option groups (each help naming its default and config key) plus --config and --debug;
    ``defaults`` are the subcommand's own config defaults (e.g. the demo's output folder)."""
    for title, options in groups:
        group = parser.add_argument_group(title)
        for option in options:
            option.add(group, config_default(option.key, defaults))
    parser.add_argument("--config", type=Path, default=None, help="TOML/YAML/JSON file with any of these options")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")


def _pipeline_config(args: argparse.Namespace, defaults: dict[str, Any] | None = None) -> Any:
    """Defaults < subcommand defaults < ``--config`` file < command-line options."""
    from ..pipeline import PipelineConfig, load_pipeline_config, with_overrides

    try:
        config = with_overrides(PipelineConfig(), defaults or {})
        if args.config is not None:
            config = load_pipeline_config(args.config, config)
        given = {key.removeprefix(KEY_PREFIX): value for key, value in vars(args).items() if key.startswith(KEY_PREFIX)}
        return with_overrides(config, given)
    except ConfigError as error:
        raise _name_the_flag(error) from None


def _seed(value: str) -> int:
    """A random seed: an integer in [0, 2**32), as torch and numpy take."""
    try:
        number = int(value)
    except ValueError:
        number = -1
    if not 0 <= number < 2**32:
        raise argparse.ArgumentTypeError(f"expected an integer from 0 to 2**32 - 1, got {value!r}")
    return number


def _positive_number(value: str) -> float:
    """A finite number > 0 (a learning rate)."""
    try:
        number = float(value)
    except ValueError:
        number = 0.0
    if not 0 < number < float("inf"):
        raise argparse.ArgumentTypeError(f"expected a finite number > 0, got {value!r}")
    return number


def _positive(value: str) -> int:
    """An integer >= 1."""
    try:
        number = int(value)
    except ValueError:
        number = 0
    if number < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value!r}")
    return number
