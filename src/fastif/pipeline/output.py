"""Output stage: the report as JSON and CSV beside its config (atomic writes), and as a readable table."""

from __future__ import annotations

import csv
import io
import textwrap
from pathlib import Path
from typing import Any

from ..config import save_config
from ..files import atomic_write_json, atomic_write_text, check_fresh
from .config import PipelineConfig

REPORT_FILE = "influence.json"
CSV_FILE = "influence.csv"
CONFIG_FILE = "pipeline_config.json"
TRAIN_KEYS = ("rank", "train_index", "score")
SHORT_COLUMNS = ("id", "label")
"""Display columns joined with ';' across a group's anchors; the (free text) others are joined with ' || '."""


def _tests(item: dict[str, Any]) -> list[dict[str, Any]]:
    """The test point(s) an explained item is about: one point, or the anchors of a group."""
    return item["group"] if "group" in item else [item["test"]]


def display_columns(report: dict[str, Any]) -> list[str]:
    """The recipe's display columns of the training points (e.g. id, premise, hypothesis, label), in order."""
    for item in report["explained"]:
        for row in (*item["helpful"], *item["harmful"]):
            return [key for key in row if key not in TRAIN_KEYS]
    return []


def _text_columns(row: dict[str, Any]) -> list[str]:
    """The free-text display columns of a row (everything the recipe shows but its id and label)."""
    return [key for key in row if key not in (*TRAIN_KEYS, *SHORT_COLUMNS)]


def csv_columns(report: dict[str, Any]) -> list[str]:
    """CSV header: the query, the test point's columns, then the training point's columns and score."""
    shown = display_columns(report)
    test = ["test_index", *(f"test_{key}" for key in shown), "predicted", "correct"]
    train = ["kind", "rank", "train_index", *(f"train_{key}" if key == "id" else key for key in shown), "score"]
    return ["query", *test, *train]


def csv_rows(report: dict[str, Any]) -> list[dict[str, Any]]:
    """One CSV row per (test point, helpful/harmful, rank); a group's rows name every anchor."""
    shown = display_columns(report)
    rows = []
    for query, item in enumerate(report["explained"]):
        tests = _tests(item)
        test = {"test_index": ";".join(str(t.get("index")) for t in tests)}
        for key in shown:
            separator = ";" if key in SHORT_COLUMNS else " || "
            test[f"test_{key}"] = separator.join(str(t.get(key)) for t in tests)
        test["predicted"] = ";".join(str(t.get("predicted")) for t in tests)
        test["correct"] = ";".join(str(t.get("correct")) for t in tests)
        for kind in ("helpful", "harmful"):
            for row in item[kind]:
                train = {("train_id" if key == "id" else key): value for key, value in row.items()}
                rows.append({"query": query, **test, "kind": kind, **train})
    return rows


def write_results(report: dict[str, Any], config: PipelineConfig, folder: str | Path) -> list[Path]:
    """Write ``influence.json``, ``influence.csv`` and ``pipeline_config.json`` into ``folder`` (atomically); a
    folder holding a finished run is refused unless ``config.output.overwrite``."""
    folder = check_fresh(folder, REPORT_FILE, config.output.overwrite)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=csv_columns(report))
    writer.writeheader()
    writer.writerows(csv_rows(report))
    return [
        atomic_write_json(folder / REPORT_FILE, report),
        atomic_write_text(folder / CSV_FILE, buffer.getvalue()),
        save_config(config, folder / CONFIG_FILE),
    ]


PREDICTED_LABEL = "label = the model's prediction"
"""Part of a given text's ``source`` when no gold label was given: its label is the model's own prediction."""


def describe_test(test: dict[str, Any]) -> str:
    """One line about a test point: where it comes from, its gold and predicted label, right or wrong (a text given
    without a label has no gold one: its label is the model's prediction, and the line says so)."""
    where = f"test #{test['index']}" if test.get("index") is not None else "text"
    probability = f"(p = {test.get('probability', float('nan')):.2f})"
    if PREDICTED_LABEL in str(test.get("source", "")):
        return f"{where}: predicted {test.get('predicted')} {probability}; no gold label given: {PREDICTED_LABEL}"
    verdict = "correct" if test.get("correct") else "WRONG"
    return f"{where}: gold {test.get('label')}, predicted {test.get('predicted')} {probability}, {verdict}"


def _title(number: int, item: dict[str, Any]) -> str:
    tests = _tests(item)
    if "group" in item:
        return f"[{number}] group of {len(tests)} anchor points ({item['candidates']} candidates)"
    return f"[{number}] {describe_test(tests[0])} ({item['candidates']} candidates)"


def _texts(test: dict[str, Any], columns: list[str]) -> list[str]:
    """The test point's free-text columns, one per line (a missing second text is left out)."""
    shown = [key for position, key in enumerate(columns) if position == 0 or test.get(key) is not None]
    return [f"{key + ':':<11} {test.get(key)}" for key in shown]


def format_report(report: dict[str, Any], width: int = 120) -> str:
    """The explained test points and their top training points as plain text, ``width`` columns wide."""
    columns = _text_columns(dict.fromkeys(display_columns(report)))
    text_width = max(20, (width - 30) // max(2, len(columns)))
    lines: list[str] = []
    for number, item in enumerate(report["explained"], start=1):
        lines.append(_title(number, item))
        for test in _tests(item):
            lines += ["  " + line for line in _texts(test, columns)]
        for kind in ("helpful", "harmful"):
            lines.append(f"  most {kind}:")
            for row in item[kind]:
                texts = " | ".join(
                    textwrap.shorten(str(row[key] or ""), text_width, placeholder="…") for key in columns
                )
                score = f"{row['score']:>+10.3g}"
                lines.append(f"  {row['rank']:>3} {score} {row['label']:<14.14} {texts}")
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
    columns = _text_columns(dict.fromkeys(display_columns(report)))
    for number, item in enumerate(report["explained"], start=1):
        console.print(f"[bold]{_title(number, item)}[/bold]")
        for test in _tests(item):
            for line in _texts(test, columns):
                console.print("  " + line, markup=False)
        for kind, colour in (("helpful", "green"), ("harmful", "red")):
            table = Table(title=f"most {kind}", title_justify="left", title_style=colour, expand=True)
            table.add_column("#", justify="right", no_wrap=True)
            table.add_column("score", justify="right", no_wrap=True, style=colour)
            table.add_column("label", no_wrap=True)
            for position, key in enumerate(columns):
                table.add_column(key, ratio=3 if position == 0 else 2)
            for row in item[kind]:
                cells = (row["rank"], f"{row['score']:+.3g}", row["label"], *(row[key] or "" for key in columns))
                table.add_row(*(Text(str(cell)) for cell in cells))
            console.print(table)
        console.print()


def describe_index(info: dict[str, Any]) -> str:
    """One line about the kNN index: size, features, and whether it was reused."""
    how = "reused" if info["features_loaded"] and info["index_loaded"] else "built"
    return (
        f"index: {info['n']} training points, {info['d']}-d features (input of {info['feature_module']!r}), "
        f"{how} at {info['folder']}"
    )


def format_timings(timings: dict[str, float]) -> str:
    """Stage times on one line, e.g. ``model 2.1 s · index 0.3 s · s_test 30.2 s``."""
    return " · ".join(f"{stage} {seconds:.1f} s" for stage, seconds in timings.items())
