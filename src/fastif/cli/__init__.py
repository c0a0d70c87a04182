"""The ``fastif`` command line. User errors print one line naming the problem and the fix, and exit with code 2;
``--debug`` shows the traceback instead. Ctrl-C and SIGTERM stop a run cleanly (workers closed, store locks released,
no temporary files left, finished work kept), print one line and exit with 128 + the signal number (130, 143).

Every pipeline option is a field of :class:`~fastif.pipeline.PipelineConfig`: ``--config FILE`` (TOML, YAML or
JSON) sets any of them, and options given on the command line override the file. The commands live in
:mod:`.pipeline` (demo, influence, index, train, bench, example) and :mod:`.applications` (experiment, report).
"""

from __future__ import annotations

import argparse
import signal
import sys
import warnings
from collections.abc import Callable, Sequence

from .. import progress
from ..config import shown
from ..errors import FastIFError
from .applications import add_experiment_commands, add_report_command
from .options import EXIT_USAGE, KEY_PREFIX, _Parser, shorten
from .pipeline import add_pipeline_commands
from .store import add_store_commands

EXIT_INTERRUPTED = 128  # plus the signal number, as shells report a process killed by it: 130 SIGINT, 143 SIGTERM


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every subcommand."""
    from .. import __version__

    parser = _Parser(
        prog="fastif",
        description="Fast influence functions: which training examples made my model "
        "predict this? Scores: positive = helpful.",
    )
    parser.add_argument("--version", action="version", version=f"fastif {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    add_pipeline_commands(commands)
    add_store_commands(commands)
    add_experiment_commands(commands)
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


def _note(message: Warning | str, *_details: object, **_more: object) -> None:
    """Print a warning as one ``fastif: note:`` line instead of Python's two-line warning block."""
    print(f"fastif: note: {shorten(str(message))}", file=sys.stderr)


def run_command(command: Callable[[], int], debug: bool = False) -> int:
    """Run a command the CLI's way: a FastIFError prints one line and gives 2 (``debug`` re-raises it), as does an
    OSError about a path the user gave (a name too long, a folder where a file belongs); a warning prints one
    ``fastif: note:`` line; Ctrl-C or SIGTERM print one line and give 128 + the signal number."""
    try:
        with warnings.catch_warnings():
            if not debug:
                warnings.showwarning = _note
            return command()
    except FastIFError as error:
        if debug:
            raise
        print(f"fastif: error: {shorten(str(error))}", file=sys.stderr)
        return EXIT_USAGE
    except OSError as error:
        if debug or error.filename is None:
            raise
        print(f"fastif: error: cannot use {shown(error.filename)}: {error.strerror}; check the path", file=sys.stderr)
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
    """Parse ``argv`` and run the chosen subcommand; returns the exit code. A bare ``fastif`` prints the help."""
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv:
        parser.print_help()
        return EXIT_USAGE
    args = parser.parse_args(argv)
    bars = getattr(args, KEY_PREFIX + "output.progress", True)  # --no-progress hides them
    with progress.reporting(progress.BarReporter() if bars else progress.SilentReporter()):
        return run_command(lambda: args.handler(args), args.debug)


def main() -> None:
    """Console entry point; SIGTERM stops the run as Ctrl-C does."""
    stop_on_sigterm()
    sys.exit(run(sys.argv[1:]))
