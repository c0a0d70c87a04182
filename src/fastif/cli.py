"""The ``fastif`` command line. User errors print one line naming the problem and the fix, and exit with code 2;
``--debug`` shows the traceback instead."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from .errors import FastIFError

EXIT_USAGE = 2


class _Parser(argparse.ArgumentParser):
    """argparse that reports bad arguments as a one-line FastIF-style error with exit code 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(EXIT_USAGE, f"fastif: error: {message} (see 'fastif {self.prog.split()[-1]} --help')\n")


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--output", type=Path, default=None, help="results folder (written atomically)")
    parser.add_argument("--seed", type=int, default=0, help="random seed")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")


def _example(args: argparse.Namespace) -> int:
    from .config import save_config
    from .files import atomic_write_json
    from .tabular import TabularConfig, format_tabular, run_tabular

    config = TabularConfig(dataset=args.dataset, solver=args.solver, k=args.k, seed=args.seed)
    report = run_tabular(config)
    print(format_tabular(report))
    if args.output is not None:
        atomic_write_json(args.output / "tabular_influence.json", report)
        save_config(config, args.output / "tabular_config.json")
        print(f"\nwrote {args.output / 'tabular_influence.json'}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every subcommand."""
    parser = _Parser(
        prog="fastif",
        description="Fast influence functions: which training examples made my model "
        "predict this? Scores: positive = helpful.",
    )
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    example = commands.add_parser("example", help="influence on a scikit-learn dataset (logistic regression)")
    example.add_argument("--dataset", default="breast_cancer", help="breast_cancer, digits, wine or iris")
    example.add_argument("--solver", default="cg", help="exact, cg, lissa, arnoldi or identity")
    example.add_argument("--k", type=int, default=5, help="helpful and harmful points to show per test point")
    _add_common(example)
    example.set_defaults(handler=_example)
    return parser


def run(argv: Sequence[str] | None) -> int:
    """Parse ``argv`` and run the chosen subcommand; returns the exit code."""
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except FastIFError as error:
        if args.debug:
            raise
        print(f"fastif: error: {error}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("fastif: interrupted; finished results were kept and the run can be resumed", file=sys.stderr)
        return 130


def main() -> None:
    """Console entry point."""
    sys.exit(run(sys.argv[1:]))


if __name__ == "__main__":
    main()
