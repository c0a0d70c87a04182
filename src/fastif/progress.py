"""Progress of long stages, without I/O in the math: a stage announces its work with :func:`task` and advances it;
whoever runs the stages (the CLI) chooses how that is shown by installing a reporter with :func:`reporting`.

The default reporter shows nothing, so the library stays silent unless asked::

    with reporting(BarReporter()):
        influence.top_k(test, k=10)   # bars with a rate and an ETA for the training pass, s_test and scores
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from typing import Protocol

from tqdm.auto import tqdm

Advance = Callable[[int], None]
"""Called with the number of units just finished."""


class Reporter(Protocol):
    """Shows tasks: ``task(name, total, unit)`` is a context manager yielding the task's :data:`Advance`."""

    def task(self, name: str, total: int | None, unit: str) -> contextlib.AbstractContextManager[Advance]: ...


class SilentReporter:
    """Shows nothing (the default)."""

    @contextlib.contextmanager
    def task(self, name: str, total: int | None, unit: str) -> Iterator[Advance]:
        yield lambda _done: None


class BarReporter:
    """A tqdm bar on stderr per running task, with its rate and ETA; removed when the task ends."""

    @contextlib.contextmanager
    def task(self, name: str, total: int | None, unit: str) -> Iterator[Advance]:
        with tqdm(total=total, desc=name, unit=unit, leave=False, file=sys.stderr, dynamic_ncols=True) as bar:
            yield bar.update


_REPORTER: ContextVar[Reporter | None] = ContextVar("fastif_progress", default=None)
_SILENT = SilentReporter()


@contextlib.contextmanager
def task(name: str, total: int | None = None, unit: str = "it") -> Iterator[Advance]:
    """Announce a task of ``total`` units to the current reporter; yields the function that advances it."""
    with (_REPORTER.get() or _SILENT).task(name, total, unit) as advance:
        yield advance


@contextlib.contextmanager
def reporting(reporter: Reporter) -> Iterator[None]:
    """Show the tasks run inside the block with ``reporter``."""
    token = _REPORTER.set(reporter)
    try:
        yield
    finally:
        _REPORTER.reset(token)
