"""Print the study's results files as the Markdown tables of docs/study.md.

python benchmarks/study/report.py
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"


def _load(name: str) -> dict[str, Any] | None:
    path = RESULTS / f"{name}.json"
    return json.loads(path.read_text()) if path.is_file() else None


def _load_line(results: dict[str, Any]) -> str:
    env = results["environment"]
    start = ", ".join(f"{x:.1f}" for x in env["loadavg_1_5_15"])
    end = ", ".join(f"{x:.1f}" for x in results.get("loadavg_at_end", []))
    return f"`{env['command']}` — load average (1/5/15 min) {start} at start, {end} at end; {env['started']}"


def part1(results: dict[str, Any]) -> list[str]:
    """Error (and seconds per chain) per B x J for R = 1, last iterate and tail average; then R at the largest J."""
    rows = results["rows"]
    depths = sorted({r["J"] for r in rows})
    lines = [_load_line(results), "", "| B | " + " | ".join(f"J={j}: err last / tail (s/chain)" for j in depths) + " |"]
    lines.append("|---" * (len(depths) + 1) + "|")
    for b in sorted({r["B"] for r in rows}):
        cells = []
        for j in depths:
            last = next(r for r in rows if (r["B"], r["J"], r["R"], r["estimate"]) == (b, j, 1, "last"))
            tail = next(r for r in rows if (r["B"], r["J"], r["R"], r["estimate"]) == (b, j, 1, "tail"))
            cells.append(f"{last['error_mean']:.3f} / {tail['error_mean']:.3f} ({last['seconds_per_chain']:.1f})")
        lines.append(f"| {b} | " + " | ".join(cells) + " |")
    repeats = sorted({r["R"] for r in rows})
    lines += ["", f"J={depths[-1]}, error of the mean of R chains (last / tail):", ""]
    lines.append("| B | " + " | ".join(f"R={r}" for r in repeats) + " |")
    lines.append("|---" * (len(repeats) + 1) + "|")
    for b in sorted({r["B"] for r in rows}):
        cells = []
        for rep in repeats:
            last = next(r for r in rows if (r["B"], r["J"], r["R"], r["estimate"]) == (b, depths[-1], rep, "last"))
            tail = next(r for r in rows if (r["B"], r["J"], r["R"], r["estimate"]) == (b, depths[-1], rep, "tail"))
            cells.append(f"{last['error_mean']:.3f} / {tail['error_mean']:.3f}")
        lines.append(f"| {b} | " + " | ".join(cells) + " |")
    return lines


def part2(results: dict[str, Any]) -> list[str]:
    """Recall per (m, sign, group) at each k, with chance."""
    curves = results["curves"]
    ks = sorted({c["k"] for c in curves})
    lines = [_load_line(results), "", "| m | points | " + " | ".join(f"k={k}" for k in ks) + " |"]
    lines.append("|---" * (len(ks) + 2) + "|")
    for m in sorted({c["m"] for c in curves}):
        for sign in ("helpful", "harmful"):
            for group in ("correct", "wrong", "all"):
                cells = [
                    next(c for c in curves if (c["m"], c["sign"], c["group"], c["k"]) == (m, sign, group, k))["recall"]
                    for k in ks
                ]
                lines.append(f"| {m} | {sign}, {group} | " + " | ".join(f"{x:.2f}" for x in cells) + " |")
        chance = [next(c for c in curves if c["m"] == m and c["k"] == k)["chance"] for k in ks]
        lines.append(f"| {m} | chance k/N | " + " | ".join(f"{x:.3f}" for x in chance) + " |")
    return lines


def part3(results: dict[str, Any]) -> list[str]:
    """Measured seconds and speed-ups, agreement, and the full-model extrapolation."""
    mean = results["mean_seconds_per_test_point"]
    lines = [_load_line(results), "", "| method | seconds / test point | speed-up |", "|---|---|---|"]
    lines.append(f"| original | {mean['original']:.2f} | 1 |")
    for row in results["speedups_measured"]:
        lines.append(f"| {row['method']} k={row['k']} | {row['seconds']:.2f} | {row['speedup']:.1f}x |")
    lines += ["", "| FastIF s_test | k | Pearson | Spearman | Kendall | min Pearson |", "|---|---|---|---|---|---|"]
    for row in results["agreement"]:
        lines.append(
            f"| {row['method']} | {row['k']} | {row['pearson']:.4f} | {row['spearman']:.4f} | {row['kendall']:.4f} | "
            f"{row['min_pearson']:.4f} |"
        )
    lines += [
        "",
        "| N | method | k | original s | FastIF s | speed-up | parallel speed-up |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in results["full_model_extrapolated"]:
        parallel = f"{row['parallel_speedup']:.0f}x" if "parallel_speedup" in row else "—"
        lines.append(
            f"| {row['N']} | {row['method']} | {row['k']} | {row['original_seconds']:.0f} | "
            f"{row['fast_seconds']:.1f} | {row['speedup']:.0f}x | {parallel} |"
        )
    return lines


def part4(results: dict[str, Any]) -> list[str]:
    """Per damping: definiteness, residual, and Spearman / top-10 overlap of each comparison."""
    keys = ("exact_vs_truth", "exact_vs_identity", "lissa_vs_exact", "lissa_vs_truth", "lissa_vs_original")
    lines = [_load_line(results), "", "Spearman / top-10 overlap, mean over the test points:", ""]
    lines.append("| λ | PD | residual | " + " | ".join(keys) + " |")
    lines.append("|---" * (len(keys) + 3) + "|")
    for row in results["rows"]:
        missing = "diverged" if "diverged" in row["lissa"] else "not run"
        cells = [f"{row[k]['spearman']:.3f} / {row[k]['top_overlap']:.2f}" if k in row else missing for k in keys]
        residual = f"{row['exact_residual_max']:.1e}"
        lines.append(f"| {row['damping']:g} | {row['positive_definite']} | {residual} | " + " | ".join(cells) + " |")
    return lines


def main(argv: list[str] | None = None) -> None:
    """Print every available part's tables."""
    argparse.ArgumentParser(description=__doc__.splitlines()[0]).parse_args(argv)
    for name, fn in (
        ("part1_stest_tradeoff", part1),
        ("part2_knn_recall", part2),
        ("part3_fastif_vs_original", part3),
        ("part4_damping", part4),
    ):
        results = _load(name)
        if results is not None:
            print(f"\n## {name}\n")
            print("\n".join(fn(results)))


if __name__ == "__main__":
    main()
