"""The ``fastif`` command line. User errors print one line naming the problem and the fix, and exit with code 2;
``--debug`` shows the traceback instead. Ctrl-C and SIGTERM stop a run cleanly (workers closed, store locks released,
no temporary files left, finished work kept), print one line and exit with 128 + the signal number (130, 143).

Every pipeline option is a field of :class:`~fastif.pipeline.PipelineConfig`: ``--config FILE`` (TOML, YAML or
JSON) sets any of them, and options given on the command line override the file.
"""

from __future__ import annotations

import argparse
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import ConfigError, FastIFError
from .experiments.cli import add_experiment_commands
from .files import check_writable
from .report.from_run import add_report_command
from .report.nli_graph import add_graph_command
from .simulatability import add_simulatability_command

EXIT_USAGE = 2
EXIT_INTERRUPTED = 128  # plus the signal number, as shells report a process killed by it: 130 SIGINT, 143 SIGTERM
DEMO_FOLDER = "fastif-results/demo"
KEY_PREFIX = "cfg:"


class _Parser(argparse.ArgumentParser):
    """argparse that reports bad arguments as a one-line FastIF-style error with exit code 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(EXIT_USAGE, f"fastif: error: {message} (see 'fastif {self.prog.split()[-1]} --help')\n")


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

    def add(self, parser: argparse.ArgumentParser) -> None:
        """Add this option to ``parser``; it stays absent from the namespace unless given."""
        common = {"dest": KEY_PREFIX + self.key, "default": argparse.SUPPRESS, "help": f"{self.help} [{self.key}]"}
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
            "'embedded' (default: MiniLM fine-tuned on the bundled MNLI split, trained once and cached), a "
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
        _Option(("--test",), "data.test", "test set, as --train (default mnli_test)"),
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
        _Option(
            ("--solver",), "solver.method", "inverse-HVP solver", str, ("lissa", "cg", "arnoldi", "exact", "identity")
        ),
        _Option(
            ("--damping",), "solver.damping", "damping added to the Hessian (absolute; default: the recipe's)", float
        ),
        _Option(("--depth",), "solver.depth", "LiSSA steps per chain", int),
        _Option(("--repeats",), "solver.repeats", "LiSSA chains averaged (default: one per worker)", int),
        _Option(("--lissa-batch",), "solver.batch_size", "LiSSA minibatch size (FastIF's fast s_test: 1)", int),
        _Option(("--scale",), "solver.scale", "LiSSA scale (default: automatic, by power iteration)", float),
        _Option(("--workers",), "solver.workers", "processes for LiSSA chains (default: one per CPU core)", int),
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
        _Option(
            ("--output",), "output.folder", "results folder (default fastif-results; the demo's fastif-results/demo)"
        ),
        _Option(("--index-dir",), "output.index_folder", "kNN index folder (default OUTPUT/index)"),
        _Option(
            ("--overwrite",), "output.overwrite", "rebuild an index made for another model, data or config", const=True
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
            ("--train-size",), "model.recipe.train_size", "training pairs from the bundled MNLI split (<= 8000)", int
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


def _add_options(parser: argparse.ArgumentParser, *groups: tuple[str, tuple[_Option, ...]]) -> None:
    """Add titled option groups (the config key of each option in brackets) plus --config and --debug."""
    for title, options in groups:
        group = parser.add_argument_group(title)
        for option in options:
            option.add(group)
    parser.add_argument("--config", type=Path, default=None, help="TOML/YAML/JSON file with any of these options")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")


def _pipeline_config(args: argparse.Namespace, defaults: dict[str, Any] | None = None) -> Any:
    """Defaults < subcommand defaults < ``--config`` file < command-line options."""
    from .pipeline import PipelineConfig, load_pipeline_config, with_overrides

    config = with_overrides(PipelineConfig(), defaults or {})
    if args.config is not None:
        config = load_pipeline_config(args.config, config)
    given = {key.removeprefix(KEY_PREFIX): value for key, value in vars(args).items() if key.startswith(KEY_PREFIX)}
    return with_overrides(config, given)


# ---------------------------------------------------------------------------------------------- commands


def _example(args: argparse.Namespace) -> int:
    from .config import save_config
    from .files import atomic_write_json
    from .recipes.tabular import TabularConfig, format_tabular, run_tabular

    config = TabularConfig(dataset=args.dataset, solver=args.solver, k=args.k, seed=args.seed)
    if args.output is not None:
        check_writable(args.output)
    report = run_tabular(config)
    print(format_tabular(report))
    if args.output is not None:
        atomic_write_json(args.output / "tabular_influence.json", report)
        save_config(config, args.output / "tabular_config.json")
        print(f"\nwrote {args.output / 'tabular_influence.json'}")
    return 0


def _describe_model(info: dict[str, Any], labels: Sequence[str]) -> str:
    """One line about the model: where it comes from, whether it was cached, its validation accuracy."""
    metrics = info.get("metrics") or {}
    line = f"model: {info['source']} ({len(labels)} labels: {', '.join(labels)})"
    if "from_cache" in info:
        line += ", cached" if info["from_cache"] else f", trained in {metrics.get('train_seconds', 0):.0f} s"
        line += f" at {info['path']}"
    if "validation_accuracy" in metrics:
        line += f"; validation accuracy {metrics['validation_accuracy']:.3f}"
    return line


def _describe_s_test(s_test: dict[str, Any]) -> str:
    """How s_test was solved, with LiSSA's scale and convergence diagnostics, and the solver's warnings."""
    line = f"s_test: {s_test['method']}"
    if s_test["method"] == "lissa":
        line += f", {s_test['repeats']} chain(s) on {s_test['workers']} worker(s), scale {s_test['scale']:.3g}"
        if s_test.get("top_eigenvalue") is not None:
            line += f" (top batch-Hessian eigenvalue ≈ {s_test['top_eigenvalue']:.3g})"
        growth = s_test.get("late_growth")
        if growth:
            line += f"; ‖h‖ grew {max(growth):+.1%} from the third to the last quarter of the chains"
        line += "; settled" if s_test.get("converged") else "; not settled: raise --depth (or --damping)"
        line += " (norm traces in influence.json)"
    return "\n".join([line, *(f"note: {' '.join(text.split())}" for text in s_test.get("warnings", []))])


def _check_outputs(config: Any, index: bool) -> None:
    """Refuse an unwritable results folder (and index folder, when the index is used) before any model or index work."""
    check_writable(config.output.folder)
    if index:
        check_writable(config.output.index_path, "--index-dir")


def _explain(args: argparse.Namespace, defaults: dict[str, Any] | None = None, intro: str = "") -> int:
    """Shared body of ``demo`` and ``influence``: load, index, explain, print, write."""
    from .pipeline import Pipeline, format_timings, print_report, write_results

    start = time.perf_counter()
    config = _pipeline_config(args, defaults)
    _check_outputs(config, index=config.candidates.count is not None)
    if intro:
        print(intro)
    pipeline = Pipeline(config)
    print(_describe_model(pipeline.loaded.info, pipeline.loaded.label_names), flush=True)
    for line in pipeline.prepare():  # the one-off stages, reported before the slow part
        print(line, flush=True)
    report = pipeline.explain()
    print()
    print_report(report)
    paths = write_results(report, config, config.output.folder)
    print(_describe_s_test(report["s_test"]))
    print(f"times: {format_timings(pipeline.timings)}; total {time.perf_counter() - start:.1f} s")
    print(f"wrote {', '.join(str(path) for path in paths)}")
    return 0


def _demo(args: argparse.Namespace) -> int:
    intro = (
        "fastif demo: which training pairs made MiniLM predict this? For a few correctly and a few wrongly "
        "predicted MNLI test pairs, FastIF scores the k nearest training pairs (FAISS) with a fast LiSSA s_test.\n"
        "score > 0 = helpful (removing the pair is predicted to raise the test loss), < 0 = harmful."
    )
    return _explain(args, {"output.folder": DEMO_FOLDER}, intro)


def _influence(args: argparse.Namespace) -> int:
    return _explain(args)


def _index(args: argparse.Namespace) -> int:
    from .config import save_config
    from .pipeline import Pipeline
    from .pipeline.output import describe_index

    config = _pipeline_config(args)
    _check_outputs(config, index=True)
    pipeline = Pipeline(config)
    print(_describe_model(pipeline.loaded.info, pipeline.loaded.label_names), flush=True)
    pipeline.index  # noqa: B018 - builds or loads the index
    print(describe_index(pipeline.index_info) + f" in {pipeline.timings['index']:.1f} s")
    path = save_config(config, Path(config.output.folder) / "pipeline_config.json")
    print(f"wrote {path}")
    return 0


def _check_copy_target(target: Path) -> None:
    """Refuse a ``train --output`` folder that cannot be written or is not empty, before training starts."""
    check_writable(target)
    if target.is_dir() and any(target.iterdir()):
        raise ConfigError(f"{target} exists and is not empty; choose another --output or remove it")


def _copy_model(source: Path, target: Path) -> None:
    """Copy a trained model folder to ``target`` through a temporary sibling, so ``target`` is never half-written."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        shutil.copytree(source, tmp, dirs_exist_ok=True)
        if target.exists():
            target.rmdir()
        tmp.rename(target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _train(args: argparse.Namespace) -> int:
    from .recipes.nli import train_nli_classifier

    config = _pipeline_config(args)
    if args.output is not None:
        _check_copy_target(args.output)
    trained = train_nli_classifier(config.model.recipe, progress=config.output.progress)
    labels = [trained.model.config.id2label[i] for i in range(trained.model.config.num_labels)]
    info = {"source": "embedded recipe", "path": str(trained.path), "from_cache": trained.from_cache}
    print(_describe_model({**info, "metrics": trained.metrics}, labels))
    print(f"validation loss {trained.metrics['validation_loss']:.3f} on {trained.metrics['num_validation']} pairs")
    if args.output is not None:
        _copy_model(trained.path, args.output)
        print(f"wrote {args.output} (use it with --model {args.output})")
    return 0


def _bench(args: argparse.Namespace) -> int:
    from .files import atomic_write_json
    from .pipeline.bench import format_bench, run_bench

    config = _pipeline_config(args)
    if args.output is not None:
        check_writable(args.output)
    results = run_bench(config, examples=args.examples, steps=args.steps)
    print(format_bench(results))
    if args.output is not None:
        print(f"wrote {atomic_write_json(args.output / 'bench.json', results)}")
    return 0


# ---------------------------------------------------------------------------------------------- parser


def _positive(value: str) -> int:
    """An integer >= 1."""
    try:
        number = int(value)
    except ValueError:
        number = 0
    if number < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value!r}")
    return number


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every subcommand."""
    parser = _Parser(
        prog="fastif",
        description="Fast influence functions: which training examples made my model "
        "predict this? Scores: positive = helpful.",
    )
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    demo = commands.add_parser("demo", help="explain a few NLI predictions by their training pairs (offline)")
    _add_options(demo, MODEL, DATA, PARAMETERS, INDEX, CANDIDATES, SOLVER, SCORING, OUTPUT, GLOBAL)
    demo.set_defaults(handler=_demo)

    influence = commands.add_parser("influence", help="top helpful and harmful training examples of test examples")
    _add_options(influence, MODEL, DATA, PARAMETERS, INDEX, CANDIDATES, SOLVER, SCORING, OUTPUT, GLOBAL)
    influence.set_defaults(handler=_influence)

    index = commands.add_parser("index", help="build (or check) the kNN index of a model's training set")
    _add_options(index, MODEL, DATA, INDEX, OUTPUT, GLOBAL)
    index.set_defaults(handler=_index)

    train = commands.add_parser("train", help="fine-tune the embedded MiniLM NLI classifier (cached)")
    _add_options(train, TRAIN)
    train.add_argument("--output", type=Path, default=None, help="also copy the trained model to this folder")
    train.set_defaults(handler=_train)

    bench = commands.add_parser("bench", help="time the main stages on the embedded MiniLM")
    _add_options(bench, PARAMETERS, CANDIDATES, SOLVER, GLOBAL)
    bench.add_argument("--examples", type=_positive, default=256, help="training pairs to time on")
    bench.add_argument("--steps", type=_positive, default=20, help="LiSSA steps to time")
    bench.add_argument("--output", type=Path, default=None, help="also write bench.json to this folder")
    bench.set_defaults(handler=_bench)

    example = commands.add_parser("example", help="influence on a scikit-learn dataset (logistic regression)")
    example.add_argument("--dataset", default="breast_cancer", help="breast_cancer, digits, wine or iris")
    example.add_argument("--solver", default="cg", help="exact, cg, lissa, arnoldi or identity")
    example.add_argument("--k", type=int, default=5, help="helpful and harmful points to show per test point")
    example.add_argument("--output", type=Path, default=None, help="results folder (written atomically)")
    example.add_argument("--seed", type=int, default=0, help="random seed")
    example.add_argument("--debug", action="store_true", help="show tracebacks")
    example.set_defaults(handler=_example)

    add_experiment_commands(commands)
    add_simulatability_command(commands)
    add_graph_command(commands)
    add_report_command(commands)
    return parser


class Interrupted(KeyboardInterrupt):
    """A stop signal (SIGTERM) raised as a KeyboardInterrupt, so the run unwinds exactly as on Ctrl-C."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _raise_interrupted(signum: int, _frame: object) -> None:
    """Signal handler: restore the default action, so a second SIGTERM kills at once, and unwind the run."""
    signal.signal(signum, signal.SIG_DFL)
    raise Interrupted(signum)


def stop_on_sigterm() -> None:
    """Make SIGTERM stop a run as Ctrl-C does: runners stop their workers, stores release their locks and half-written
    files are removed, while finished store entries stay for the rerun to load."""
    signal.signal(signal.SIGTERM, _raise_interrupted)


def run_command(command: Callable[[], int], debug: bool = False) -> int:
    """Run a command the CLI's way: a FastIFError prints one line and gives 2 (``debug`` re-raises it); Ctrl-C or
    SIGTERM print one line and give 128 + the signal number."""
    try:
        return command()
    except FastIFError as error:
        if debug:
            raise
        print(f"fastif: error: {' '.join(str(error).split())}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt as stop:
        signum = getattr(stop, "signum", signal.SIGINT)
        print(
            f"fastif: interrupted by {signal.Signals(signum).name}; finished work is kept, run the same command "
            "again to resume",
            file=sys.stderr,
        )
        return EXIT_INTERRUPTED + signum


def run(argv: Sequence[str] | None) -> int:
    """Parse ``argv`` and run the chosen subcommand; returns the exit code."""
    args = build_parser().parse_args(argv)
    return run_command(lambda: args.handler(args), args.debug)


def main() -> None:
    """Console entry point; SIGTERM stops the run as Ctrl-C does."""
    stop_on_sigterm()
    sys.exit(run(sys.argv[1:]))


if __name__ == "__main__":
    main()
