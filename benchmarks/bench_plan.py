"""How close the demo's "plan:" estimates come to the times it then measures (issue 17, item 1).

`fastif demo --no-progress` runs once as a subprocess on the cached embedded model (its ``models`` folder linked
into a fresh ``FASTIF_CACHE``, so the frozen-bottom pass is computed, not reused). From its output: the plan's
estimate of the pass against the pass's own measured time, the estimate of LiSSA's first attempt and of the scores
against the "times:" line. The automatic LiSSA's later attempts are not estimated (the plan says so), so the s_test
row reports its attempts beside the ratio. The model must be cached (``fastif demo`` once, or ``fastif train``).
The demo's whole output goes to ``--log``.

    python -m benchmarks.bench_plan --output benchmarks/results/plan_estimates.json
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from fastif.files import atomic_write_json, atomic_write_text
from fastif.recipes.nli import default_cache_dir
from fastif.telemetry import machine_info

from .bench_demo import stage_seconds, stage_times

DURATION = r"([\d.]+) (s|min)"


def seconds_after(pattern: str, text: str) -> float | None:
    """The duration (``12.3 s`` or ``4.5 min``) that follows ``pattern`` in ``text``, in seconds."""
    found = re.search(pattern + DURATION, text)
    if found is None:
        return None
    value, unit = float(found.group(1)), found.group(2)
    return value * 60 if unit == "min" else value


def ratio(estimate: float | None, measured: float | None) -> float | None:
    """estimate / measured, or None when either is missing or the measured time is 0."""
    return None if not estimate or not measured else round(estimate / measured, 2)


def estimates(output: str) -> dict[str, Any]:
    """The plan's estimates and the measured times in one demo run's output."""
    times = stage_times(output)
    pass_estimate = seconds_after(r"plan: frozen-bottom pass over [\d,]+ training points, about ", output)
    pass_measured = seconds_after(r"every training point computed \(", output)
    first_attempt = seconds_after(r"a first attempt of \d+ chain\(s\) × \d+ steps ≈ ", output)
    scores_estimate = seconds_after(r"scores of [\d,]+ training points per test point ≈ ", output)
    attempts = re.search(r"automatic depth: (\d+) attempt\(s\), ([\d,]+) steps", output)
    return {
        "frozen_pass": {
            "estimate_s": pass_estimate,
            "measured_s": pass_measured,
            "ratio": ratio(pass_estimate, pass_measured),
        },
        "s_test": {
            "first_attempt_estimate_s": first_attempt,
            "measured_s": stage_seconds(times, "s_test"),
            "attempts": None if attempts is None else int(attempts.group(1)),
            "steps": None if attempts is None else int(attempts.group(2).replace(",", "")),
        },
        "scores": {
            "estimate_s": scores_estimate,
            "measured_s": stage_seconds(times, "scores"),
            "ratio": ratio(scores_estimate, stage_seconds(times, "scores")),
        },
        "stage_times": times,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", default="benchmarks/results/plan_estimates.json")
    parser.add_argument("--log", default="benchmarks/results/demo/plan_run.log", help="the demo's full output")
    args = parser.parse_args()
    models = default_cache_dir()
    if not models.is_dir() or not any(models.iterdir()):
        sys.exit(f"no cached model under {models}: run `fastif demo` once first")
    with tempfile.TemporaryDirectory(prefix="fastif-plan-bench-") as scratch:
        cache = Path(scratch) / "cache"
        cache.mkdir()
        (cache / "models").symlink_to(models, target_is_directory=True)
        env = {**os.environ, "FASTIF_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
        workdir = Path(scratch) / "work"
        workdir.mkdir()
        before, start = machine_info(), time.perf_counter()
        done = subprocess.run(["fastif", "demo", "--no-progress"], cwd=workdir, env=env, capture_output=True, text=True)
        wall = time.perf_counter() - start
    if done.returncode != 0:
        sys.exit(f"fastif demo failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
    results = {
        "command": "python -m benchmarks.bench_plan " + " ".join(sys.argv[1:]),
        "demo_command": "fastif demo --no-progress (cached model, fresh index cache)",
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        **estimates(done.stdout),
        "wall_s": round(wall, 1),
        "plan_lines": [line for line in done.stdout.splitlines() if line.startswith("plan:")],
        "machine_before": before,
        "machine_after": machine_info(),
    }
    atomic_write_json(args.output, results)
    atomic_write_text(args.log, f"# command: {results['demo_command']} ({results['date']})\n{done.stdout}")
    print(results)


if __name__ == "__main__":
    main()
