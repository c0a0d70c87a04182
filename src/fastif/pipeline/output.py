"""Output stage: the report as JSON and CSV beside its config (atomic writes), and as a readable table."""

from __future__ import annotations

import csv
import io
import textwrap
from pathlib import Path
from typing import Any

from ..config import save_config
from ..files import atomic_write_json, atomic_write_text
from .config import PipelineConfig

REPORT_FILE = "influence.json"
CSV_FILE = "influence.csv"
CONFIG_FILE = "pipeline_config.json"
CSV_COLUMNS = (
    "query",
    "test_index",
    "test_id",
    "test_premise",
    "test_hypothesis",
    "test_label",
    "predicted",
    "correct",
    "kind",
    "rank",
    "train_index",
    "train_id",
    "premise",
    "hypothesis",
    "label",
    "score",
)


def _tests(item: dict[str, Any]) -> list[dict[str, Any]]:
    """The test point(s) an explained item is about: one point, or the anchors of a group."""
    return item["group"] if "group" in item else [item["test"]]


def csv_rows(report: dict[str, Any]) -> list[dict[str, Any]]:
    """One CSV row per (test point, helpful/harmful, rank); a group's rows name every anchor."""
    rows = []
    for query, item in enumerate(report["explained"]):
        tests = _tests(item)
        test = {
            "test_index": ";".join(str(t.get("index")) for t in tests),
            "test_id": ";".join(str(t.get("id")) for t in tests),
            "test_premise": " || ".join(str(t.get("premise")) for t in tests),
            "test_hypothesis": " || ".join(str(t.get("hypothesis")) for t in tests),
            "test_label": ";".join(str(t.get("label")) for t in tests),
            "predicted": ";".join(str(t.get("predicted")) for t in tests),
            "correct": ";".join(str(t.get("correct")) for t in tests),
        }
        for kind in ("helpful", "harmful"):
            for row in item[kind]:
                train = {key: row[key] for key in ("rank", "train_index", "premise", "hypothesis", "label", "score")}
                rows.append({"query": query, **test, "kind": kind, "train_id": row["id"], **train})
    return rows


def write_results(report: dict[str, Any], config: PipelineConfig, folder: str | Path) -> list[Path]:
    """Write ``influence.json``, ``influence.csv`` and ``pipeline_config.json`` into ``folder`` (atomically)."""
    folder = Path(folder)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=CSV_COLUMNS)
    writer.writeheader()
    writer.writerows(csv_rows(report))
    return [
        atomic_write_json(folder / REPORT_FILE, report),
        atomic_write_text(folder / CSV_FILE, buffer.getvalue()),
        save_config(config, folder / CONFIG_FILE),
    ]


def describe_test(test: dict[str, Any]) -> str:
    """One line about a test point: where it comes from, its gold and predicted label, right or wrong."""
    where = f"test #{test['index']}" if test.get("index") is not None else "text"
    verdict = "correct" if test.get("correct") else "WRONG"
    return (
        f"{where}: gold {test.get('label')}, predicted {test.get('predicted')} "
        f"(p = {test.get('probability', float('nan')):.2f}), {verdict}"
    )


def _title(number: int, item: dict[str, Any]) -> str:
    tests = _tests(item)
    if "group" in item:
        return f"[{number}] group of {len(tests)} anchor points ({item['candidates']} candidates)"
    return f"[{number}] {describe_test(tests[0])} ({item['candidates']} candidates)"


def _texts(test: dict[str, Any]) -> list[str]:
    lines = [f"premise:    {test.get('premise')}"]
    if test.get("hypothesis") is not None:
        lines.append(f"hypothesis: {test.get('hypothesis')}")
    return lines


def format_report(report: dict[str, Any], width: int = 120) -> str:
    """The explained test points and their top training points as plain text, ``width`` columns wide."""
    text_width = max(20, (width - 30) // 2)
    lines: list[str] = []
    for number, item in enumerate(report["explained"], start=1):
        lines.append(_title(number, item))
        for test in _tests(item):
            lines += ["  " + line for line in _texts(test)]
        for kind in ("helpful", "harmful"):
            lines.append(f"  most {kind}:")
            for row in item[kind]:
                premise = textwrap.shorten(str(row["premise"]), text_width, placeholder="…")
                hypothesis = textwrap.shorten(str(row["hypothesis"] or ""), text_width, placeholder="…")
                score = f"{row['score']:>+10.3g}"
                lines.append(f"  {row['rank']:>3} {score} {row['label']:<14.14} {premise} | {hypothesis}")
        lines.append("")
    return "\n".join(lines)


def print_report(report: dict[str, Any]) -> None:
    """Print the report as tables (with ``rich`` when it is installed, else plain text)."""
    try:
        from rich.console import Console
        from rich.table import Table
        from rich.text import Text
    except ImportError:
        print(format_report(report))
        return
    console = Console(highlight=False)
    for number, item in enumerate(report["explained"], start=1):
        console.print(f"[bold]{_title(number, item)}[/bold]")
        for test in _tests(item):
            for line in _texts(test):
                console.print("  " + line, markup=False)
        for kind, colour in (("helpful", "green"), ("harmful", "red")):
            table = Table(title=f"most {kind}", title_justify="left", title_style=colour, expand=True)
            table.add_column("#", justify="right", no_wrap=True)
            table.add_column("score", justify="right", no_wrap=True, style=colour)
            table.add_column("label", no_wrap=True)
            table.add_column("premise", ratio=3)
            table.add_column("hypothesis", ratio=2)
            for row in item[kind]:
                cells = (row["rank"], f"{row['score']:+.3g}", row["label"], row["premise"], row["hypothesis"] or "")
                table.add_row(*(Text(str(cell)) for cell in cells))
            console.print(table)
        console.print()


def format_timings(timings: dict[str, float]) -> str:
    """Stage times on one line, e.g. ``model 2.1 s · index 0.3 s · s_test 30.2 s``."""
    return " · ".join(f"{stage} {seconds:.1f} s" for stage, seconds in timings.items())
