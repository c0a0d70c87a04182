"""The applications' commands: ``experiment correct|augment|simulatability|influence-graph`` and ``report``.

Each command registers its options in one function here and its handler runs the NLI recipe's driver
(:mod:`fastif.recipes.nli.apps`); results go to ``--output`` (default ``fastif-results/<command>``), and a folder
that already holds a finished run is refused before any work unless ``--overwrite``.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

from ..applications.simulatability import SimulatabilityConfig, format_headline, write_simulatability
from ..applications.simulatability.config import RESULTS_FILE as SIMULATABILITY_FILE
from ..errors import DataError
from ..files import cache_dir, check_fresh, check_writable
from .options import _positive, _positive_number, _seed

RESULTS_ROOT = Path("fastif-results")
"""Where the applications write by default: ``fastif-results/<command>`` (never the repository's benchmarks/)."""
OVERWRITE_HELP = "replace a finished run in --output (by default it is kept and the command refuses to start)"

FINETUNE_HELP = {
    "correct": "fine-tune on the model's own training points that influence chosen anchors (MNLI -> HANS)",
    "augment": "fine-tune on unseen points (HANS train, or an ANLI pool) that influence chosen anchors",
}


def add_experiment_commands(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``experiment`` with its four applications on the main parser's subcommands."""
    experiment = subparsers.add_parser("experiment", help="run one of the FastIF applications")
    commands = experiment.add_subparsers(dest="experiment", required=True, parser_class=type(experiment))
    for name, text in FINETUNE_HELP.items():
        command = commands.add_parser(name, help=text, description=text)
        _finetune_options(command)
        command.set_defaults(handler=run_experiment_command, experiment=name)
    _simulatability_options(
        commands.add_parser(
            "simulatability",
            help="simulatability: does one top helpful/harmful training example, as one SGD step, move a simulator?",
            description="FastIF application 1 on the bundled MNLI model: writes simulatability.json and .png.",
        )
    )
    _graph_options(
        commands.add_parser(
            "influence-graph",
            help="influence graph of HANS heuristics + MNLI test points vs MNLI training points (2-class model)",
            description="Writes influence_run.json and its report (PNG/SVG, HTML explorer, graph_stats.json).",
        )
    )
    return experiment


# ---------------------------------------------------------------------------------------------- correct / augment


def _finetune_options(parser: argparse.ArgumentParser) -> None:
    """Options shared by both experiments; explicit options override ``--config``, which overrides defaults."""
    parser.add_argument("--task", choices=("hans", "anli"), default=None, help="HANS (2-class) or ANLI (3-class)")
    parser.add_argument("--config", type=Path, default=None, help="ExperimentConfig JSON (e.g. a saved config.json)")
    seeds = parser.add_mutually_exclusive_group()
    seeds.add_argument("--seed", type=_seed, default=None, help="run a single seed")
    seeds.add_argument("--seeds", type=_seed, nargs="+", default=None, help="run these seeds (default 0 1 2 3 4)")
    parser.add_argument("--steps", type=_positive, default=None, help="SGD steps per run (default 10)")
    parser.add_argument("--groups", nargs="+", default=None, help="HANS heuristics / ANLI rounds to anchor on")
    parser.add_argument("--lr", type=_positive_number, default=None, help="SGD learning rate (default 1e-4)")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="smallest setting (1 seed, tiny sizes); the first run also trains and caches the 2-class model",
    )
    parser.add_argument(
        "--output", type=Path, default=None, help="results folder (default fastif-results/EXPERIMENT_TASK)"
    )
    parser.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
    parser.add_argument(
        "--cache-dir",
        type=Path,
        default=None,
        help="frozen-bottom activations cache (default $FASTIF_CACHE/experiments)",
    )
    parser.add_argument("--no-cache", action="store_true", help="recompute the frozen bottom's encodings")
    parser.add_argument("--threads", type=_positive, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")


def experiment_config_from_args(args: argparse.Namespace) -> Any:
    """The ExperimentConfig the arguments ask for: defaults or --quick, then --config, then explicit options."""
    from ..recipes.nli.apps import default_config, load_experiment_config, quick_config

    if args.config is not None:
        config = load_experiment_config(args.config)
        config = replace(config, experiment=args.experiment, task=args.task or config.task)
    else:
        task = args.task or "hans"
        config = (quick_config if args.quick else default_config)(args.experiment, task)
    overrides = {
        "seeds": (args.seed,) if args.seed is not None else tuple(args.seeds) if args.seeds else None,
        "steps": args.steps,
        "groups": tuple(args.groups) if args.groups else None,
        "lr": args.lr,
    }
    return replace(config, **{key: value for key, value in overrides.items() if value is not None})


def run_experiment_command(args: argparse.Namespace) -> int:
    """Run the experiment, print its table, and write results, config, table and plot to ``--output``."""
    import torch

    from ..applications.finetune.summary import RESULTS_FILE, markdown_table, write_results
    from ..recipes.nli import apps

    config = experiment_config_from_args(args)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    output = args.output or RESULTS_ROOT / f"{config.experiment}_{config.task}"
    command = "fastif " + shlex.join(sys.argv[1:]) if sys.argv[1:2] == ["experiment"] else None
    cache = None if args.no_cache else args.cache_dir or cache_dir("experiments")
    check_writable(output)
    check_fresh(output, RESULTS_FILE, args.overwrite)
    if cache is not None:
        check_writable(cache, "--cache-dir", "pass a writable --cache-dir, or --no-cache")
    factory = getattr(args, "factory", None)  # tests inject a small model here
    results = apps.run_nli_experiment(config, factory=factory, progress=_progress, cache_dir=cache)
    write_results(results, config, output, command)
    print(markdown_table(results, command))
    print(f"wrote {output}")
    return 0


def _progress(message: str) -> None:
    print(f"[experiment] {message}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------- simulatability


def _simulatability_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--quick",
        action="store_true",
        help="small sizes for a smoke run (the first run also trains and caches the task model)",
    )
    parser.add_argument("--n-test", type=_positive, default=None, help="correct and wrong test points each (default 8)")
    parser.add_argument(
        "--candidates", type=_positive, default=None, help="kNN candidates per test point (default 160)"
    )
    parser.add_argument("--solver", choices=("lissa", "identity"), default=None, help="inverse-HVP (default lissa)")
    parser.add_argument("--output", type=Path, default=RESULTS_ROOT / "simulatability", help="results folder")
    parser.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
    parser.add_argument("--seed", type=_seed, default=0, help="random seed")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    parser.set_defaults(handler=_simulatability_command)


def simulatability_config_from_args(args: argparse.Namespace) -> SimulatabilityConfig:
    """The simulatability config the command-line options ask for."""
    overrides: dict[str, Any] = {"seed": args.seed}
    if args.n_test is not None:
        overrides.update(n_correct=args.n_test, n_wrong=args.n_test)
    if args.candidates is not None:
        overrides["candidates"] = args.candidates
    if args.solver is not None:
        overrides["solver"] = args.solver
    base = SimulatabilityConfig.quick() if args.quick else SimulatabilityConfig()
    return replace(base, **overrides)


def _simulatability_command(args: argparse.Namespace) -> int:
    """CLI handler: run the experiment, write its files and print the headline numbers."""
    from ..recipes.nli import apps

    config = apps.nli_simulatability_config(simulatability_config_from_args(args))
    check_writable(args.output)
    check_fresh(args.output, SIMULATABILITY_FILE, args.overwrite)
    result = apps.run_nli_simulatability(config, log=lambda message: print(message, flush=True))
    paths = write_simulatability(result, args.output, config)
    print(format_headline(result))
    print(f"wrote {paths['results']} and {paths['figure']}")
    return 0


# ---------------------------------------------------------------------------------------------- influence graph


def _graph_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true", help="small sizes for a smoke run")
    parser.add_argument("--per-group", type=_positive, default=None, help="test points per group (default 10)")
    parser.add_argument(
        "--candidates", type=_positive, default=None, help="kNN candidates per test point (default 100)"
    )
    parser.add_argument("--select", choices=("wrong", "any"), default=None, help="test points (default: wrong)")
    parser.add_argument("--output", type=Path, default=RESULTS_ROOT / "influence-graph", help="run folder")
    parser.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
    parser.add_argument("--no-screenshot", action="store_true", help="skip the headless-Chromium screenshot")
    parser.add_argument("--seed", type=_seed, default=0, help="random seed")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    parser.set_defaults(handler=_graph_command)


def _graph_command(args: argparse.Namespace) -> int:
    """CLI handler: build the run, write it and its report, and optionally a browser screenshot."""
    from ..recipes.nli import apps
    from ..report.from_run import RUN_FILE, report_run, summary_lines, write_run
    from ..report.screenshot import screenshot_explorer

    overrides: dict[str, Any] = {"seed": args.seed}
    for name in ("per_group", "candidates", "select"):
        if getattr(args, name) is not None:
            overrides[name] = getattr(args, name)
    config = replace(apps.NLIGraphConfig.quick() if args.quick else apps.NLIGraphConfig(), **overrides)
    check_writable(args.output)
    check_fresh(args.output, RUN_FILE, args.overwrite)
    run = apps.build_nli_run(config, log=lambda message: print(message, flush=True))
    write_run(run, args.output)
    paths = report_run(args.output, args.output, config.top, "FastIF influence explorer: HANS + MNLI")
    if not args.no_screenshot:
        shot = screenshot_explorer(paths["html"], args.output / apps.SCREENSHOT_FILE)
        print(f"wrote {shot}" if shot else "no screenshot: needs playwright and chromium (or set FASTIF_BROWSER)")
    print("\n".join(summary_lines(json.loads(paths["stats"].read_text(encoding="utf-8")))))
    print(f"wrote {args.output}")
    return 0


# ---------------------------------------------------------------------------------------------- report
def add_report_command(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``report RUN_DIR``: the figure, explorer and statistics of a finished run folder."""
    parser = subparsers.add_parser(
        "report",
        help="draw a finished run (its influence_run.json, graph.json or influence.json) as a PNG/SVG figure, an "
        "HTML explorer and graph_stats.json",
        description="Reads the first of RUN_DIR/influence_run.json ('fastif experiment influence-graph'), "
        "RUN_DIR/graph.json (a saved graph) and RUN_DIR/influence.json ('fastif demo' or 'fastif influence') and "
        "writes influence_graph.png/.svg, influence_explorer.html, graph.json and graph_stats.json (needs the "
        "report extra: pip install 'fastif[report]').",
    )
    parser.add_argument("run_dir", type=Path, help="folder of a finished run")
    parser.add_argument("--output", type=Path, default=None, help="where to write the report (default RUN_DIR/report)")
    parser.add_argument(
        "-k",
        "--top-k",
        dest="top",
        type=int,
        default=5,
        help="helpful and harmful edges drawn per test point, of a run's candidates (default: %(default)s)",
    )
    parser.add_argument(
        "--title", default="FastIF influence explorer", help="title of the HTML page (default: %(default)s)"
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    parser.set_defaults(handler=_report_command)
    return parser


def _report_command(args: argparse.Namespace) -> int:
    """CLI handler: write the report and print where it went with the headline statistics."""
    from ..report.from_run import report_run, summary_lines

    if args.top < 1:
        raise DataError(f"--top-k must be at least 1 (edges drawn per test point and sign), got {args.top}")
    paths = report_run(args.run_dir, args.output, args.top, args.title)
    print("\n".join(summary_lines(json.loads(paths["stats"].read_text(encoding="utf-8")))))
    for name in ("png", "svg", "html", "stats"):
        print(f"wrote {paths[name]}")
    return 0
