"""Static influence-graph figure (matplotlib, Agg): helpful and harmful panels, saved as PNG and SVG."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.collections import LineCollection
from matplotlib.colors import to_rgb
from matplotlib.figure import Figure

from ..files import atomic_write
from .graph import InfluenceGraph
from .layout import EDGE_COLORS, SIGNS, TRAIN_COLOR, Layout, compute_layout, group_colors, strength_scale


def plot_graph(graph: InfluenceGraph, layout: Layout | None = None) -> Figure:
    """Draw the graph in two panels (helpful, harmful); edge width and opacity grow with |score|."""
    layout = layout or compute_layout(graph)
    figure = Figure(figsize=(13, 6.8), layout="constrained")
    FigureCanvasAgg(figure)
    scale = strength_scale(graph)
    for axes, sign in zip(figure.subplots(1, 2), SIGNS, strict=True):
        _draw_panel(axes, graph, layout, sign, scale)
    handles = figure.axes[0].get_legend_handles_labels()
    figure.legend(*handles, loc="outside lower center", ncols=min(len(graph.groups) + 1, 6), frameon=False)
    return figure


def _draw_panel(axes: Axes, graph: InfluenceGraph, layout: Layout, sign: str, scale: float) -> None:
    """Draw one sign's edges, the test points coloured by group, and its training points (sized by |score|) on top."""
    edges = [edge for edge in graph.edges if (edge.score > 0) == (sign == "helpful")]
    strength = np.array([min(abs(edge.score) / scale, 1.0) for edge in edges])
    segments = [(layout.test[edge.test], layout.train[sign][edge.train]) for edge in edges]
    colors = [(*to_rgb(EDGE_COLORS[sign]), 0.45 + 0.5 * s) for s in strength]
    axes.add_collection(LineCollection(segments, colors=colors, linewidths=0.8 + 2.2 * strength, zorder=1))
    touched = sorted({edge.train for edge in edges})
    train = layout.train[sign][touched].reshape(-1, 2)
    sizes = 8 + 52 * layout.strength[sign][touched]
    axes.scatter(train[:, 0], train[:, 1], s=sizes, color=TRAIN_COLOR, zorder=4, label="training point")
    for group, color in group_colors(graph.groups).items():
        index = [i for i, point in enumerate(graph.test_points) if point.group == group]
        axes.scatter(
            *layout.test[index].T, s=36, color=color, edgecolors="white", linewidths=0.6, zorder=3, label=group
        )
    axes.set_title(f"{sign.capitalize()} influence ({len(edges)} edges, {len(touched)} training points)")
    axes.set_xlim(-1.12, 1.12)
    axes.set_ylim(-1.12, 1.12)
    axes.set_aspect("equal")
    axes.set_axis_off()


def save_figure(
    figure: Figure, png_path: str | os.PathLike[str], svg_path: str | os.PathLike[str]
) -> tuple[Path, Path]:
    """Save the figure as PNG (150 dpi) and SVG, each written atomically."""
    png = atomic_write(png_path, lambda tmp: figure.savefig(tmp, format="png", dpi=150))
    svg = atomic_write(svg_path, lambda tmp: figure.savefig(tmp, format="svg"))
    return png, svg
