"""Self-contained interactive HTML explorer: inline SVG/JS/CSS, data embedded as JSON, no network access.

A Content-Security-Policy with the hashes of the inline script and style blocks everything else, so even text
that slipped past escaping could not run, and the page cannot fetch anything.
"""

from __future__ import annotations

import base64
import hashlib
import html
import json
import math
import os
import re
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from ..files import atomic_write_text
from .graph import InfluenceGraph
from .layout import SIGNS, Layout, compute_layout, group_colors, strength_scale

_PLACEHOLDER = re.compile(r"@@([A-Z_]+)@@")


def render_html(graph: InfluenceGraph, layout: Layout | None = None, title: str = "FastIF influence explorer") -> str:
    """Return the explorer page for ``graph`` as one HTML string."""
    layout = layout or compute_layout(graph)
    css, js = _asset("explorer.css"), _asset("explorer.js")
    values = {
        "TITLE": html.escape(title),
        "CSS": css,
        "JS": js,
        "STYLE_HASH": _csp_hash(css),
        "SCRIPT_HASH": _csp_hash(js),
        "DATA": embed_json(_payload(graph, layout)),
    }
    return _PLACEHOLDER.sub(lambda match: values[match.group(1)], _asset("explorer.html"))


def write_html(
    graph: InfluenceGraph,
    path: str | os.PathLike[str],
    layout: Layout | None = None,
    title: str = "FastIF influence explorer",
) -> Path:
    """Write the explorer page atomically."""
    return atomic_write_text(path, render_html(graph, layout, title))


def embed_json(obj: Any) -> str:
    """Serialise ``obj`` for a <script type="application/json"> block: '<', '>' and '&' become \\u escapes."""
    text = json.dumps(obj, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def _payload(graph: InfluenceGraph, layout: Layout) -> dict[str, Any]:
    """Collect what the page needs: groups with colours, positioned points and edges."""
    return {
        "groups": [{"name": name, "color": color} for name, color in group_colors(graph.groups).items()],
        "test": [
            {
                "id": p.id,
                "group": p.group,
                "text": p.text,
                "gold": p.gold,
                "predicted": p.predicted,
                "x": round(float(x), 5),
                "y": round(float(y), 5),
            }
            for p, (x, y) in zip(graph.test_points, layout.test, strict=True)
        ],
        "train": [
            {
                "id": p.id,
                "text": p.text,
                "label": p.label,
                **{sign: _xy(layout.train[sign][i]) for sign in SIGNS},
                "strength": {sign: _strength(layout.strength[sign][i]) for sign in SIGNS},
            }
            for i, p in enumerate(graph.train_points)
        ],
        "edges": [[edge.test, edge.train, edge.score] for edge in graph.edges],
        "max_abs": max((abs(edge.score) for edge in graph.edges), default=0.0),
        "scale": strength_scale(graph),
    }


def _xy(point: np.ndarray) -> list[float] | None:
    """Round a position for embedding; None where the point has no edge of that sign (NaN)."""
    return None if math.isnan(point[0]) else [round(float(point[0]), 5), round(float(point[1]), 5)]


def _strength(value: float) -> float | None:
    """Round a dot's relative size for embedding; None where the point has no edge of that sign (NaN)."""
    return None if math.isnan(value) else round(float(value), 4)


def _asset(name: str) -> str:
    """Read a packaged template, stylesheet or script."""
    return resources.files("fastif.report").joinpath("assets", name).read_text(encoding="utf-8")


def _csp_hash(source: str) -> str:
    """Return the CSP source expression ('sha256-...') that allows exactly this inline block."""
    return "sha256-" + base64.b64encode(hashlib.sha256(source.encode("utf-8")).digest()).decode("ascii")
