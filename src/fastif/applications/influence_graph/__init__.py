"""The influence-graph application (:mod:`.run`): test groups scored against their kNN candidates, stored as a run
that :mod:`fastif.report` draws."""

from __future__ import annotations

from .run import compute_run, group_test_points, label_name

__all__ = ["compute_run", "group_test_points", "label_name"]
