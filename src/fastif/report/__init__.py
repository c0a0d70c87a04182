"""Visualise train<->test influence (FastIF application 2): graph, layout, statistics, figure and HTML explorer."""

from __future__ import annotations

import os
from pathlib import Path

from ..files import atomic_write_json, jsonable
from .graph import Edge, InfluenceGraph, TestPoint, TrainPoint
from .html import render_html, write_html
from .layout import Layout, arc_layout, compute_layout, geometric_median
from .static import plot_graph, save_figure
from .stats import graph_statistics

__all__ = [
    "Edge",
    "InfluenceGraph",
    "Layout",
    "TestPoint",
    "TrainPoint",
    "arc_layout",
    "compute_layout",
    "geometric_median",
    "graph_statistics",
    "plot_graph",
    "render_html",
    "save_figure",
    "write_html",
    "write_report",
]


def write_report(
    graph: InfluenceGraph, out_dir: str | os.PathLike[str], title: str = "FastIF influence explorer"
) -> dict[str, Path]:
    """Write graph.json, the PNG/SVG figure, the HTML explorer and graph_stats.json into ``out_dir``."""
    out = Path(out_dir)
    layout = compute_layout(graph)
    figure = plot_graph(graph, layout)
    png, svg = save_figure(figure, out / "influence_graph.png", out / "influence_graph.svg")
    return {
        "graph": graph.to_json(out / "graph.json"),
        "png": png,
        "svg": svg,
        "html": write_html(graph, out / "influence_explorer.html", layout, title),
        "stats": atomic_write_json(out / "graph_stats.json", jsonable(graph_statistics(graph))),
    }
