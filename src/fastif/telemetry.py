"""Run telemetry: wall seconds per named stage, and the machine context (load, cores, threads, versions) that
timings on shared machines need."""

from __future__ import annotations

import os
import platform
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch


class StageClock:
    """Wall seconds per named stage (rounded to 10 ms), for results files."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        """Time the enclosed block under ``name``."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = round(time.perf_counter() - start, 2)


def machine_info() -> dict[str, Any]:
    """Load average, core count and torch threads: the context that timings on shared machines need."""
    return {
        "loadavg_1_5_15": list(os.getloadavg()),
        "cpu_count": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
    }


def environment() -> dict[str, Any]:
    """Where and under what load a run ran (CPU count, torch threads, load average, versions, platform)."""
    return {
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "loadavg": list(os.getloadavg()),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
    }
