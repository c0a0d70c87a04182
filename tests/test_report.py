"""Tests for fastif.report: graph construction, layout, statistics, JSON, static figure and the HTML explorer."""

from __future__ import annotations

import base64
import hashlib
import importlib.util
import json
import math
import re
from pathlib import Path

import numpy as np
import pytest

from fastif.errors import ConfigError, DataError
from fastif.report import (
    Edge,
    InfluenceGraph,
    TestPoint,
    TrainPoint,
    arc_layout,
    compute_layout,
    geometric_median,
    graph_statistics,
    render_html,
    write_report,
)
from fastif.report.layout import fan_radius

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
SCRIPT_TEXT = '<script>alert("test")</script> & </script><!--'
EVIL_TRAIN_TEXT = '</script><img src=x onerror="alert(1)"> x < y'


def _browser_missing() -> str | None:
    """Say why the browser test cannot run here, or None when it can."""
    if not CHROMIUM.exists():
        return f"needs Debian chromium at {CHROMIUM}; install it with .ci/install-browser.sh (as root)"
    if importlib.util.find_spec("playwright") is None:
        return "needs the playwright Python package; install it with .ci/install-browser.sh"
    return None


BROWSER_MISSING = _browser_missing()


def _points(groups: list[str], n_train: int) -> tuple[list[TestPoint], list[TrainPoint]]:
    """Make test points in ``groups`` and ``n_train`` training points with recognisable texts."""
    tests = [TestPoint(f"t{i}", group, f"test sentence {i}", "entailment", "neutral") for i, group in enumerate(groups)]
    trains = [TrainPoint(f"r{j}", f"train sentence {j}", "contradiction") for j in range(n_train)]
    return tests, trains


def _hand_graph() -> InfluenceGraph:
    """Groups A (tests 0-1), B (tests 2-3), C (test 4) over five training points, scores chosen for hand maths."""
    tests, trains = _points(["A", "A", "B", "B", "C"], 5)
    edges = [(0, 0, 1.0), (1, 0, 0.5), (0, 1, -2.0), (1, 2, 1.0), (1, 3, -0.5)]  # group A
    edges += [(2, 0, 2.0), (3, 1, -1.0), (2, 2, 3.0), (3, 2, -1.0), (3, 4, 1.0)]  # group B
    edges += [(4, 4, 1.0)]  # group C
    return InfluenceGraph(tuple(tests), tuple(trains), tuple(Edge(*edge) for edge in edges))


def _sample_graph() -> InfluenceGraph:
    """A HANS-like graph with three groups, hostile texts on test 0 and its strongest helpful training point."""
    rng = np.random.default_rng(0)
    groups = ["lexical_overlap"] * 4 + ["subsequence"] * 4 + ["mnli"] * 5
    tests, trains = _points(groups, 30)
    tests[0] = TestPoint("t0", "lexical_overlap", SCRIPT_TEXT, "entailment", "non-entailment")
    trains[7] = TrainPoint("r7", EVIL_TRAIN_TEXT, "<b>entailment</b>")
    candidates = np.stack([rng.permutation(30)[:12] for _ in groups])
    scores = rng.normal(size=candidates.shape)
    candidates[0] = np.r_[7, [j for j in rng.permutation(30) if j != 7][:11]]
    scores[0, 0] = 9.0
    return InfluenceGraph.from_scores(tests, trains, scores, candidates, top=3)


def test_geometric_median_simple_cases() -> None:
    """Equilateral triangle -> centroid, collinear points -> middle one, a dominant weight -> its point."""
    triangle = np.array([[0.0, 0.0], [1.0, 0.0], [0.5, math.sqrt(3) / 2]])
    np.testing.assert_allclose(geometric_median(triangle, np.ones(3)), triangle.mean(axis=0), atol=1e-7)
    line = np.array([[0.0, 0.0], [1.0, 0.0], [5.0, 0.0]])
    np.testing.assert_allclose(geometric_median(line, np.ones(3)), [1.0, 0.0], atol=1e-6)
    np.testing.assert_allclose(geometric_median(triangle, np.array([3.0, 1.0, 1.0])), triangle[0], atol=1e-9)
    np.testing.assert_allclose(geometric_median(triangle[:1], np.ones(1)), triangle[0])


def test_geometric_median_satisfies_optimality() -> None:
    """At the weighted median of a generic triangle the weighted unit vectors to the points cancel."""
    points = np.array([[0.0, 0.0], [4.0, 0.5], [1.0, 3.0]])
    weights = np.array([1.0, 2.0, 1.5])
    median = geometric_median(points, weights)
    pull = sum(w * (p - median) / np.linalg.norm(p - median) for p, w in zip(points, weights, strict=True))
    np.testing.assert_allclose(pull, 0.0, atol=1e-6)


def test_arc_layout_one_arc_per_group() -> None:
    """Points sit on the unit circle; a group is one contiguous arc; arcs are separated by the gap."""
    groups = ["a", "a", "b", "a", "c", "c"]
    gap = 0.25
    xy = arc_layout(groups, gap)
    np.testing.assert_allclose(np.linalg.norm(xy, axis=1), 1.0)
    angles = (np.arctan2(xy[:, 1], xy[:, 0]) - np.pi / 2) % (2 * np.pi)
    step = (2 * np.pi - 3 * gap) / 6
    ordered = angles[[0, 1, 3, 2, 4, 5]]  # a, a, a, b, c, c: counter-clockwise from the top
    np.testing.assert_allclose(np.diff(ordered), [step, step, step + gap, step + gap, step])
    np.testing.assert_allclose(ordered[0], step / 2)


def test_compute_layout_weights_by_absolute_score() -> None:
    """A training point touched once, or pulled onto one test point by a dominant |score|, is fanned out next to it:
    inside the circle at the fan radius, straight inwards when alone; its strength is its |score| over the scale."""
    tests, trains = _points(["A", "A", "B"], 2)
    edges = (Edge(0, 0, 0.5), Edge(0, 1, -3.0), Edge(1, 1, -1.0), Edge(2, 1, -1.0))
    layout = compute_layout(InfluenceGraph(tuple(tests), tuple(trains), edges))
    radius = fan_radius(3)
    for sign, index in (("helpful", 0), ("harmful", 1)):
        np.testing.assert_allclose(layout.train[sign][index], (1 - radius) * layout.test[0], atol=1e-9)
    assert np.isnan(layout.train["helpful"][1]).all() and np.isnan(layout.train["harmful"][0]).all()
    scale = np.percentile([0.5, 3.0, 1.0, 1.0], 95)
    np.testing.assert_allclose(layout.strength["helpful"][0], 0.5 / scale)
    np.testing.assert_allclose(layout.strength["harmful"][1], 1.0)
    assert np.isnan(layout.strength["helpful"][1])


def test_fan_keeps_training_points_apart() -> None:
    """Training points that touch one test point alone get distinct places, the strongest straight inwards."""
    tests, trains = _points(["A", "A", "A", "A"], 5)
    edges = tuple(Edge(0, j, score) for j, score in enumerate([0.1, 0.2, 0.9, 0.3, 0.4]))
    layout = compute_layout(InfluenceGraph(tuple(tests), tuple(trains), edges))
    placed = layout.train["helpful"]
    gaps = np.linalg.norm(placed[:, None] - placed[None], axis=-1)[np.triu_indices(5, 1)]
    assert gaps.min() > 0.05
    np.testing.assert_allclose(np.linalg.norm(placed - layout.test[0], axis=1), fan_radius(4))
    np.testing.assert_allclose(placed[2], (1 - fan_radius(4)) * layout.test[0], atol=1e-9)


def test_from_scores_keeps_top_k_per_sign() -> None:
    """Dense and candidate-indexed scores keep the top-k helpful and harmful edges and drop untouched points."""
    tests, trains = _points(["A", "B"], 6)
    dense = np.array([[3.0, -1.0, 2.0, 0.0, -5.0, 1.0], [0.0, 0.0, 0.0, 0.0, 0.0, 0.5]])
    graph = InfluenceGraph.from_scores(tests, trains, dense, top=2)
    assert [train.id for train in graph.train_points] == ["r0", "r1", "r2", "r4", "r5"]
    kept = {(e.test, graph.train_points[e.train].id, e.score) for e in graph.edges}
    assert kept == {(0, "r0", 3.0), (0, "r2", 2.0), (0, "r4", -5.0), (0, "r1", -1.0), (1, "r5", 0.5)}
    pruned = InfluenceGraph.from_scores(tests, trains, np.array([[-1.0, 4.0], [2.0, 0.0]]), np.array([[5, 3], [3, 0]]))
    assert {(e.test, pruned.train_points[e.train].id, e.score) for e in pruned.edges} == {
        (0, "r5", -1.0),
        (0, "r3", 4.0),
        (1, "r3", 2.0),
    }


@pytest.mark.parametrize(
    ("scores", "candidates", "top", "error"),
    [
        (np.zeros((2, 5)), None, 1, DataError),
        (np.zeros((2, 2)), np.array([[0, 6], [1, 2]]), 1, DataError),
        (np.zeros((2, 2)), np.array([[1, 1], [1, 2]]), 1, DataError),
        (np.array([[np.nan, 0.0], [0.0, 0.0]]), np.array([[0, 1], [1, 2]]), 1, DataError),
        (np.zeros((2, 2)), np.array([[0.0, 1.0], [1.0, 2.0]]), 1, DataError),
        (np.zeros((2, 6)), None, 0, ConfigError),
    ],
)
def test_from_scores_refuses_bad_input(
    scores: np.ndarray, candidates: np.ndarray | None, top: int, error: type
) -> None:
    """Wrong shapes, out-of-range/duplicate/float candidates, NaN scores and top < 1 raise fastif errors."""
    tests, trains = _points(["A", "B"], 6)
    with pytest.raises(error):
        InfluenceGraph.from_scores(tests, trains, scores, candidates, top=top)


def test_statistics_on_hand_made_graph() -> None:
    """Shares and Pearson correlations match the values worked out by hand."""
    stats = graph_statistics(_hand_graph())
    a, b = stats["groups"]["A"], stats["groups"]["B"]
    assert (a["n_helpful"], a["n_harmful"], a["helpful_share"], a["harmful_share"]) == (3, 2, 0.6, 0.4)
    assert (a["helpful_mass_share"], a["harmful_mass_share"]) == (0.5, 0.5)
    assert (b["helpful_share"], b["helpful_mass_share"], b["harmful_mass_share"]) == (0.6, 0.75, 0.25)
    correlations = {tuple(c["groups"]): c for c in stats["correlations"]}
    # shared training points 0, 1, 2: A sums [1.5, -2, 1], B sums [2, -1, 2] -> r = 6.5 / sqrt(43)
    assert correlations["A", "B"]["n_shared"] == 3
    assert correlations["A", "B"]["pearson"] == pytest.approx(6.5 / math.sqrt(43))
    assert correlations["A", "B"]["note"] is None
    assert math.isnan(correlations["B", "C"]["pearson"]) and correlations["B", "C"]["n_shared"] == 1
    assert "at least 3" in correlations["A", "C"]["note"]


def test_json_round_trip(tmp_path: Path) -> None:
    """to_json/from_json reproduce the graph exactly and the file is plain JSON."""
    graph = _sample_graph()
    path = graph.to_json(tmp_path / "graph.json")
    assert InfluenceGraph.from_json(path) == graph
    json.loads(path.read_text(), parse_constant=lambda name: pytest.fail(f"non-standard JSON constant {name}"))
    path.write_text('{"format": "something else"}')
    with pytest.raises(DataError):
        InfluenceGraph.from_json(path)


def test_write_report_writes_every_file(tmp_path: Path) -> None:
    """write_report produces the graph, PNG, SVG, HTML and standard-JSON statistics files."""
    paths = write_report(_hand_graph(), tmp_path / "report")
    assert {path.name for path in paths.values()} == {
        "graph.json",
        "influence_graph.png",
        "influence_graph.svg",
        "influence_explorer.html",
        "graph_stats.json",
    }
    assert paths["png"].read_bytes().startswith(b"\x89PNG")
    assert "<svg" in paths["svg"].read_text()
    stats = json.loads(paths["stats"].read_text(), parse_constant=lambda name: pytest.fail(name))
    assert stats["correlations"][1]["pearson"] is None  # A-C: NaN written as null


def _embedded(page: str) -> dict:
    """Parse the JSON data block of an explorer page."""
    match = re.search(r'<script type="application/json" id="graph-data">(.*?)</script>', page, re.S)
    assert match is not None
    return json.loads(match.group(1))


def _without_data(page: str) -> str:
    """Drop the embedded data (hostile texts may mention src=) to check the page's own markup and code."""
    return re.sub(r'(<script type="application/json" id="graph-data">).*?(</script>)', r"\1\2", page, flags=re.S)


def test_html_is_self_contained() -> None:
    """The page references no http(s) resource, loads nothing by src/href, and its CSP hashes match its blocks."""
    page = render_html(_sample_graph())
    assert re.search(r"https?://", page) is None
    assert re.search(r"\b(src|href)\s*=|@import|url\(", _without_data(page)) is None
    csp = re.search(r"script-src '(sha256-[^']+)'; style-src '(sha256-[^']+)'", page)
    script = re.search(r"<script>(.*?)</script>", page, re.S).group(1)
    style = re.search(r"<style>(.*?)</style>", page, re.S).group(1)
    digest = [base64.b64encode(hashlib.sha256(s.encode()).digest()).decode() for s in (script, style)]
    assert csp.groups() == (f"sha256-{digest[0]}", f"sha256-{digest[1]}")


def test_html_escapes_script_text() -> None:
    """Hostile texts cannot close the data block; they survive intact inside the embedded JSON."""
    page = render_html(_sample_graph(), title="<script>alert(1)</script>")
    assert page.count("<script") == 2 and page.count("</script") == 2
    assert "<img" not in page and "<!--" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    data = _embedded(page)
    assert data["test"][0]["text"] == SCRIPT_TEXT
    assert EVIL_TRAIN_TEXT in [train["text"] for train in data["train"]]


@pytest.mark.browser
@pytest.mark.skipif(BROWSER_MISSING is not None, reason=str(BROWSER_MISSING))
def test_explorer_in_headless_chromium(tmp_path: Path) -> None:
    """Render the explorer in Chromium: no errors, details on click, filters hide edges; save a screenshot."""
    from playwright.sync_api import sync_playwright

    graph = _sample_graph()
    page_path = write_report(graph, tmp_path / "report")["html"]
    problems: list[str] = []
    requests: list[str] = []
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1500, "height": 900})
            page.on("console", lambda msg: msg.type == "error" and problems.append(f"console: {msg.text}"))
            page.on("pageerror", lambda error: problems.append(f"page error: {error}"))
            page.on("dialog", lambda dialog: problems.append(f"dialog: {dialog.message}") or dialog.dismiss())
            page.on("request", lambda request: requests.append(request.url))
            page.goto(page_path.as_uri())
            _check_details(page, graph)
            screenshot = tmp_path / "explorer.png"
            page.screenshot(path=str(screenshot), full_page=True)
            print(f"explorer screenshot: {screenshot}")
            _check_filters(page, graph)
        finally:
            browser.close()
    assert problems == []
    assert requests == [page_path.as_uri()]


def _check_details(page, graph: InfluenceGraph) -> None:
    """Click test point 0 and check the side panel lists its helpful and harmful training texts, as text."""
    assert page.locator("circle.test-point").count() == 2 * len(graph.test_points)
    # force: training point r7 (touched by test 0 alone) is drawn over its centre; the page must see through it
    page.locator('#panel-helpful circle.test-point[data-index="0"]').click(force=True)
    details = page.locator("#details")
    assert SCRIPT_TEXT in details.inner_text()
    for sign, keep in (("helpful", lambda s: s > 0), ("harmful", lambda s: s < 0)):
        texts = [graph.train_points[e.train].text for e in graph.edges if e.test == 0 and keep(e.score)]
        items = page.locator(f"#details-{sign} li.influence-item")
        assert items.count() == len(texts) > 0
        shown = items.all_inner_texts()
        assert all(any(text in item for item in shown) for text in texts)
    assert EVIL_TRAIN_TEXT in details.inner_text() and details.locator("img").count() == 0
    assert page.locator("line.edge.dim").count() == sum(e.test != 0 for e in graph.edges)


def _shown(page, selector: str) -> int:
    """Count elements not hidden by display:none (zero-length edges have no box, so ':visible' would miss them)."""
    return page.eval_on_selector_all(selector, "els => els.filter(e => getComputedStyle(e).display !== 'none').length")


def _check_filters(page, graph: InfluenceGraph) -> None:
    """Sign, group and strength filters hide exactly the edges they should."""
    page.locator('input[name="sign"][value="helpful"]').check()
    assert _shown(page, 'line.edge[data-sign="harmful"]') == 0
    assert _shown(page, 'line.edge[data-sign="helpful"]') == sum(e.score > 0 for e in graph.edges)
    page.locator('input.group-filter[data-group="mnli"]').uncheck()
    mnli = {i for i, point in enumerate(graph.test_points) if point.group == "mnli"}
    assert _shown(page, "line.edge") == sum(e.score > 0 and e.test not in mnli for e in graph.edges)
    assert _shown(page, 'circle.test-point[data-group="mnli"]') == 0
    page.locator('input[name="sign"][value="both"]').check()
    page.locator("#strength").evaluate("(s) => { s.value = 500; s.dispatchEvent(new Event('input')); }")
    threshold = max(abs(e.score) for e in graph.edges) / 2
    expected = sum(abs(e.score) >= threshold and e.test not in mnli for e in graph.edges)
    assert _shown(page, "line.edge") == expected > 0
    assert page.locator("#edge-count").inner_text() == f"{expected} of {len(graph.edges)} edges shown"
