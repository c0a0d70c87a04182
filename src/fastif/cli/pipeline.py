"""The pipeline's commands: ``demo``, ``influence``, ``index``, ``train``, ``bench`` and ``example``."""

from __future__ import annotations

import argparse
import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..errors import ConfigError, OutputError
from ..files import atomic_dir, cache_dir, check_fresh, check_writable
from .causal_lm import add_causal_lm_options
from .options import (
    CANDIDATES,
    DATA,
    GLOBAL,
    INDEX,
    MODEL,
    OUTPUT,
    PARAMETERS,
    SCORING,
    SOLVER,
    TRAIN,
    _add_options,
    _pipeline_config,
    _positive,
    _seed,
)

DEMO_FOLDER = "fastif-results/demo"
DEMO_DEFAULTS = {"output.folder": DEMO_FOLDER}


def _example(args: argparse.Namespace) -> int:
    from ..config import save_config
    from ..files import atomic_write_json
    from ..recipes.tabular import TabularConfig, format_tabular, run_tabular

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
        line += _describe_lissa_depth(s_test) + " (norm traces in influence.json)"
    if "relative_residual" in s_test:
        line += f"; {_describe_residual(s_test)}"
    if s_test.get("converged") is False:  # the pipeline's one "did not settle" note on stderr already quoted them
        return line
    return "\n".join([line, *(f"note: {' '.join(text.split())}" for text in s_test.get("warnings", []))])


def _describe_lissa_depth(s_test: dict[str, Any]) -> str:
    """Whether LiSSA settled; in the automatic mode, the attempts it ran and whether they met the residual target."""
    if "attempts" not in s_test:
        return "; settled" if s_test.get("converged") else "; not settled: raise --depth (or --damping)"
    last, target = s_test["attempts"][-1], s_test["target_residual"]
    line = (
        f"; automatic depth: {len(s_test['attempts'])} attempt(s), {s_test['steps']:,} steps (last: depth "
        f"{last['depth']}, batch {last['batch_size']})"
    )
    if s_test.get("converged"):
        return f"{line}, residual target {target:g} met"
    return f"{line}, residual target {target:g} not met: raise --max-steps (or --damping)"


def _describe_residual(s_test: dict[str, Any]) -> str:
    """The solve's relative residual and the matrix it was measured on (the full H, or the Hessian's sample)."""
    residual, examples = s_test["relative_residual"], s_test["residual_examples"]
    shown = "not finite" if residual is None else f"{residual:.2g}"  # the report writes NaN and Inf as null
    if s_test.get("residual_scope") == "sample":
        return f"relative residual {shown} on a {examples:,}-example sample of H (not the full H solved)"
    return f"relative residual {shown} on the full H ({examples:,} examples)"


def _check_outputs(config: Any, index: bool, results: bool = True) -> None:
    """Refuse an unwritable results folder (and index folder, when the index is used), or one holding a finished run
    (unless --overwrite) when ``results`` will be written, before any model or index work; an ``--index-dir``
    holding other files than a fastif store is refused before anything is written into it."""
    from ..pipeline.output import REPORT_FILE

    check_writable(config.output.folder)
    if results:
        check_fresh(config.output.folder, REPORT_FILE, config.output.overwrite)
    if index and config.output.index_folder is not None:
        _check_index_folder(check_writable(config.output.index_folder, "--index-dir"))
    elif index:
        check_writable(cache_dir("indexes"), "index cache", "set FASTIF_CACHE to a writable folder")


def _check_index_folder(folder: Path) -> None:
    """Refuse a non-empty ``--index-dir`` without a store manifest (e.g. a results folder)."""
    from ..store.store import LOCK_FILE, MANIFEST_FILE

    if not folder.is_dir() or (folder / MANIFEST_FILE).is_file():
        return
    others = sorted(path.name for path in folder.iterdir() if path.name != LOCK_FILE)
    if others:
        raise OutputError(
            f"{folder} is not empty and is not a fastif index store (it holds {', '.join(others[:3])}"
            f"{', ...' if len(others) > 3 else ''}); choose another --index-dir"
        )


def _print_plan(plan: str | None) -> None:
    """Print a "plan:" line, if there is one, before the slow step it announces."""
    if plan:
        print(plan, flush=True)


def _load_model(pipeline: Any) -> None:
    """Load the pipeline's model, saying first when that means training it (minutes), then what was loaded."""
    _print_plan(pipeline.recipe.load_plan(pipeline.config.model))
    print(_describe_model(pipeline.loaded.info, pipeline.loaded.label_names), flush=True)


def _explain(args: argparse.Namespace, defaults: dict[str, Any] | None = None, intro: str = "") -> int:
    """Shared body of ``demo`` and ``influence``: load, index, explain, print, write."""
    from ..pipeline import Pipeline, format_timings, print_report, with_overrides, write_results
    from ..pipeline.plan import pass_plan, query_plan

    start = time.perf_counter()
    config = _pipeline_config(args, defaults)
    if defaults is DEMO_DEFAULTS and Path(config.output.folder) == Path(DEMO_FOLDER):
        config = with_overrides(config, {"output.overwrite": True})  # a rerun of the demo replaces its own results
    _check_outputs(config, index=config.candidates.count is not None)
    if intro:
        print(intro)
    pipeline = Pipeline(config)
    _load_model(pipeline)
    print(pass_plan(pipeline), flush=True)
    for line in pipeline.prepare():  # the one-off stages, reported before the slow part
        print(line, flush=True)
    print(query_plan(pipeline), flush=True)
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
        "predicted MNLI test pairs, fastif scores the training pairs (on the frozen-bottom path: every pair, where "
        "that is cheaper than FastIF's kNN) with a fast LiSSA s_test.\n"
        "score > 0 = helpful (removing the pair is predicted to raise the test loss), < 0 = harmful."
    )
    return _explain(args, DEMO_DEFAULTS, intro)


def _influence(args: argparse.Namespace) -> int:
    if args.task == "causal-lm":
        from .causal_lm import run_causal_lm

        return run_causal_lm(args)
    lm_only = [flag for flag, name in (("--prompt", "prompt"), ("--completion", "completion"), ("--queries", "queries"))
               if getattr(args, name) is not None]  # fmt: skip
    if lm_only:
        raise ConfigError(f"{', '.join(lm_only)} need --task causal-lm (a causal language model)")
    return _explain(args)


def _index(args: argparse.Namespace) -> int:
    from ..config import save_config
    from ..pipeline import Pipeline
    from ..pipeline.output import describe_index

    config = _pipeline_config(args)
    _check_outputs(config, index=True, results=False)
    pipeline = Pipeline(config)
    _load_model(pipeline)
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
    atomic_dir(target, lambda tmp: shutil.copytree(source, tmp, dirs_exist_ok=True))


def _train(args: argparse.Namespace) -> int:
    from ..recipes.nli import train_nli_classifier
    from ..recipes.nli.model import training_plan

    config = _pipeline_config(args)
    if args.output is not None:
        _check_copy_target(args.output)
    _print_plan(training_plan(config.model.recipe))
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
    from ..files import atomic_write_json
    from ..pipeline.bench import format_bench, run_bench

    config = _pipeline_config(args)
    if args.output is not None:
        check_writable(args.output)
    results = run_bench(config, examples=args.examples, steps=args.steps)
    print(format_bench(results))
    if args.output is not None:
        print(f"wrote {atomic_write_json(args.output / 'bench.json', results)}")
    return 0


def add_pipeline_commands(commands: argparse._SubParsersAction) -> None:
    """Register the pipeline's commands on the main parser's subcommands."""
    demo = commands.add_parser("demo", help="explain a few NLI predictions by their training pairs (offline)")
    _add_options(
        demo, MODEL, DATA, PARAMETERS, INDEX, CANDIDATES, SOLVER, SCORING, OUTPUT, GLOBAL, defaults=DEMO_DEFAULTS
    )
    demo.set_defaults(handler=_demo)

    influence = commands.add_parser("influence", help="top helpful and harmful training examples of test examples")
    _add_options(influence, MODEL, DATA, PARAMETERS, INDEX, CANDIDATES, SOLVER, SCORING, OUTPUT, GLOBAL)
    add_causal_lm_options(influence)
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
    bench.add_argument(
        "--examples", type=_positive, default=256, help="training pairs to time on (default: %(default)s)"
    )
    bench.add_argument("--steps", type=_positive, default=20, help="LiSSA steps to time (default: %(default)s)")
    bench.add_argument("--output", type=Path, default=None, help="also write bench.json to this folder")
    bench.set_defaults(handler=_bench)

    from ..recipes.tabular import TabularConfig
    from ..solvers import SOLVERS

    tabular = TabularConfig()
    example = commands.add_parser("example", help="influence on a scikit-learn dataset (logistic regression)")
    example.add_argument(
        "--dataset", default=tabular.dataset, help="breast_cancer, digits, wine or iris (default: %(default)s)"
    )
    example.add_argument(
        "--solver",
        default=tabular.solver,
        choices=tuple(sorted(SOLVERS)),
        help="inverse-HVP solver (default: %(default)s)",
    )
    example.add_argument(
        "-k",
        "--top-k",
        dest="k",
        type=_positive,
        default=tabular.k,
        help="helpful and harmful points shown per test point (default: %(default)s)",
    )
    example.add_argument("--output", type=Path, default=None, help="also write the results to this folder")
    example.add_argument("--seed", type=_seed, default=tabular.seed, help="random seed (default: %(default)s)")
    example.add_argument("--debug", action="store_true", help="show tracebacks")
    example.set_defaults(handler=_example)
