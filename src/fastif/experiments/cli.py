"""``fastif experiment correct|augment``: the command-line side of the fine-tuning experiments.

The main CLI registers these with :func:`add_experiment_commands` (``fastif experiment ...``); handlers follow its
conventions (``handler`` default, ``--debug``, FastIFError -> one-line message, exit code 2).
"""

from __future__ import annotations

import argparse
import shlex
import sys
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .config import ExperimentConfig


def add_experiment_commands(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``experiment correct`` and ``experiment augment`` on the main parser's subcommands."""
    experiment = subparsers.add_parser(
        "experiment", help="FastIF's applications: correct model errors (MNLI -> HANS) or fine-tune on unseen data"
    )
    commands = experiment.add_subparsers(dest="experiment", required=True, parser_class=type(experiment))
    helps = {
        "correct": "fine-tune on the model's own training points that influence chosen anchors (MNLI -> HANS)",
        "augment": "fine-tune on unseen points (HANS train, or an ANLI pool) that influence chosen anchors",
    }
    for name, text in helps.items():
        command = commands.add_parser(name, help=text, description=text)
        _add_options(command)
        command.set_defaults(handler=run_experiment_command, experiment=name)
    return experiment


def _add_options(parser: argparse.ArgumentParser) -> None:
    """Options shared by both experiments; explicit options override ``--config``, which overrides defaults."""
    parser.add_argument("--task", choices=("hans", "anli"), default=None, help="HANS (2-class) or ANLI (3-class)")
    parser.add_argument("--config", type=Path, default=None, help="ExperimentConfig JSON (e.g. a saved config.json)")
    seeds = parser.add_mutually_exclusive_group()
    seeds.add_argument("--seed", type=int, default=None, help="run a single seed")
    seeds.add_argument("--seeds", type=int, nargs="+", default=None, help="run these seeds (default 0 1 2 3 4)")
    parser.add_argument("--steps", type=int, default=None, help="SGD steps per run (default 10)")
    parser.add_argument("--groups", nargs="+", default=None, help="HANS heuristics / ANLI rounds to anchor on")
    parser.add_argument("--lr", type=float, default=None, help="SGD learning rate (default 1e-4)")
    parser.add_argument("--quick", action="store_true", help="seconds-long smoke setting (1 seed, tiny sizes)")
    parser.add_argument("--output", type=Path, default=None, help="results folder (default experiment-results/...)")
    parser.add_argument(
        "--cache-dir", type=Path, default=None, help="encodings cache (default ~/.cache/fastif/experiments)"
    )
    parser.add_argument("--no-cache", action="store_true", help="recompute the frozen bottom's encodings")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")


def config_from_args(args: argparse.Namespace) -> ExperimentConfig:
    """The ExperimentConfig the arguments ask for: defaults or --quick, then --config, then explicit options."""
    from .config import default_config, load_experiment_config, quick_config

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

    from ..files import check_writable
    from .finetune import run_experiment
    from .head import experiments_cache_dir
    from .report import markdown_table, write_results

    config = config_from_args(args)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    output = args.output or Path("experiment-results") / f"{config.experiment}_{config.task}"
    command = "fastif " + shlex.join(sys.argv[1:]) if sys.argv[1:2] == ["experiment"] else None
    cache_dir = None if args.no_cache else args.cache_dir or experiments_cache_dir()
    check_writable(output)
    if cache_dir is not None:
        check_writable(cache_dir, "--cache-dir", "pass a writable --cache-dir, or --no-cache")
    factory = getattr(args, "factory", None)  # tests inject a small model here
    results = run_experiment(config, factory=factory, progress=_progress, cache_dir=cache_dir)
    write_results(results, config, output, command)
    print(markdown_table(results, command))
    print(f"wrote {output}")
    return 0


def _progress(message: str) -> None:
    print(f"[experiment] {message}", file=sys.stderr, flush=True)
