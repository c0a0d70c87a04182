"""Shared helpers for the peer benchmarks: timing, machine load, versions, result files and markdown tables.

Every time here is wall-clock seconds on a shared CPU machine, so each result file records the load averages
before and after the run, and the runners interleave fastif and peer methods to expose both to the same load.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

from fastif.files import atomic_write_json, atomic_write_text

RESULTS = Path(__file__).resolve().parent / "results"
PACKAGES = ("fastif", "torch", "captum", "kronfluence", "dattri", "transformers", "faiss-cpu")


@dataclass
class Timing:
    """Wall times of repeated runs of one method and the last run's output."""

    seconds: list[float] = field(default_factory=list)
    output: Any = None

    @property
    def median(self) -> float:
        """Median wall time: robust to one run hit by a neighbour's burst of load."""
        return statistics.median(self.seconds)


def timed(fn: Callable[[], Any], timing: Timing) -> Timing:
    """Run ``fn`` once, append its wall time to ``timing`` and keep its output."""
    start = time.perf_counter()
    timing.output = fn()
    timing.seconds.append(time.perf_counter() - start)
    return timing


def interleaved(methods: dict[str, Callable[[], Any]], repeats: int, log: Callable[[str], None] = print) -> dict:
    """Time every method ``repeats`` times, round-robin (m1, m2, ..., m1, m2, ...), so all see the same load."""
    timings = {name: Timing() for name in methods}
    for round_ in range(repeats):
        for name, fn in methods.items():
            timed(fn, timings[name])
            log(f"  round {round_ + 1}/{repeats} {name}: {timings[name].seconds[-1]:.2f}s  load {load_average()}")
    return timings


def load_average() -> list[float]:
    """The 1, 5 and 15 minute load averages (``uptime``'s numbers)."""
    return [round(x, 2) for x in os.getloadavg()]


def uptime() -> str:
    """``uptime``'s line, or the load averages when the command is missing."""
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return f"load average: {load_average()}"


def provenance(module: str, argv: Sequence[str] | None, started: str, load_before: list[float]) -> dict[str, Any]:
    """What every results file records: the command line, the uptime and load before and after, machine, versions."""
    return {
        "command": f"python -m {module} " + " ".join(sys.argv[1:] if argv is None else argv),
        "uptime_before": started,
        "uptime_after": uptime(),
        "load_before": load_before,
        "load_after": load_average(),
        "machine": machine(),
        "versions": versions(),
    }


def versions(packages: Sequence[str] = PACKAGES) -> dict[str, str | None]:
    """Installed versions of the measured libraries (None if missing)."""
    found: dict[str, str | None] = {}
    for name in packages:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = None
    return found


def machine() -> dict[str, Any]:
    """What the numbers were measured on: CPU count, torch threads, platform, Python."""
    return {
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "processor": platform.processor() or platform.machine(),
    }


def write_results(name: str, payload: dict[str, Any], table: str) -> tuple[Path, Path]:
    """Write ``results/<name>.json`` and ``results/<name>.md`` atomically; return both paths."""
    json_path, md_path = RESULTS / f"{name}.json", RESULTS / f"{name}.md"
    RESULTS.mkdir(parents=True, exist_ok=True)
    atomic_write_json(json_path, json.loads(json.dumps(payload, default=_jsonable)))
    atomic_write_text(md_path, table)
    return json_path, md_path


def _jsonable(value: Any) -> Any:
    """JSON fallback for tensors, NumPy values and paths."""
    if hasattr(value, "tolist"):
        return value.tolist()
    return str(value)


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub markdown table; floats get 3 significant digits, None prints as an em dash."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(_cell(value) for value in row) + " |" for row in rows]
    return "\n".join(lines)


def _cell(value: Any) -> str:
    """Format one table cell."""
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:.3g}"
    return str(value)


def set_threads(threads: int) -> None:
    """Pin torch's intra-op threads (on a loaded 2-core machine 1 thread beats 2: less oversubscription)."""
    torch.set_num_threads(threads)
