"""Reports of finished runs: computing a run on a tiny BERT, its JSON, statistics, the pipeline's report and the CLI."""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import tiny_bert, token_batch
from scipy import ndimage

from fastif import AdapterConfig, HFClassifierAdapter, Identity, Influence, TensorData
from fastif.applications.influence_graph import compute_run
from fastif.cli.applications import add_report_command
from fastif.errors import DataError
from fastif.report import TestPoint, TrainPoint
from fastif.report.from_run import (
    RUN_FILE,
    InfluenceRun,
    graph_from_pipeline_report,
    report_run,
    run_statistics,
    write_run,
)

REPORT_FILES = {
    "graph.json",
    "influence_graph.png",
    "influence_graph.svg",
    "influence_explorer.html",
    "graph_stats.json",
}


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """One torch thread: tiny models run faster without thread hand-offs on a shared machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny_run() -> tuple[InfluenceRun, torch.Tensor]:
    """A finished run on the tiny BERT (groups A and B, 8 candidates each) and the dense scores it must match."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    config = AdapterConfig(include=("bert.encoder.layer.1", "bert.pooler", "classifier"))
    influence = Influence(
        HFClassifierAdapter(tiny_bert(torch.float64), config), TensorData(token_batch(30)), Identity()
    )
    groups = {"A": TensorData(token_batch(3, seed=5)), "B": TensorData(token_batch(3, seed=6))}
    run = compute_run(influence, groups, k=8, meta={"note": "tiny"})
    dense = torch.cat([influence.scores(groups["A"]), influence.scores(groups["B"])])
    torch.set_num_threads(threads)
    return run, dense


def test_compute_run_matches_dense_scores(tiny_run) -> None:
    """Each stored candidate score equals the dense influence score of that (test, training) pair."""
    run, dense = tiny_run
    assert [point.group for point in run.test_points] == ["A"] * 3 + ["B"] * 3
    assert run.candidates.shape == run.scores.shape == (6, 8)
    original = np.array([int(point.id.split(":")[1]) for point in run.train_points])
    expected = dense.numpy()[np.arange(6)[:, None], original[run.candidates]]
    np.testing.assert_allclose(run.scores, expected, rtol=1e-10, atol=1e-12)
    assert len(run.train_points) == len(np.unique(run.candidates))


def test_run_json_round_trip_and_report(tiny_run, tmp_path: Path) -> None:
    """write_run/from_json reproduce the run; report_run writes every report file into RUN_DIR/report."""
    run, _ = tiny_run
    path = write_run(run, tmp_path / "run")
    back = InfluenceRun.from_json(path)
    assert back.test_points == run.test_points and back.train_points == run.train_points and back.meta == run.meta
    np.testing.assert_array_equal(back.candidates, run.candidates)
    np.testing.assert_array_equal(back.scores, run.scores)
    paths = report_run(tmp_path / "run", top=2)
    assert {path.name for path in paths.values()} == REPORT_FILES
    assert all(path.parent == tmp_path / "run" / "report" for path in paths.values())
    stats = json.loads(paths["stats"].read_text(), parse_constant=lambda name: pytest.fail(name))
    assert stats["all_candidate_edges"]["n_edges"] == int((run.scores != 0).sum())
    assert stats["displayed_edges"]["top_per_sign"] == 2 and stats["meta"]["note"] == "tiny"
    assert set(stats["meta"]["solves"]) == {"A", "B"}


def test_statistics_over_all_candidates_are_not_balanced() -> None:
    """Shares over all candidate edges reflect the signs; the displayed top-1 graph keeps one edge per sign."""
    tests = tuple(TestPoint(f"t{i}", group, "x", "a", "b") for i, group in enumerate("AAB"))
    trains = tuple(TrainPoint(f"r{j}", "y", "a") for j in range(4))
    candidates = np.array([[0, 1, 2, 3]] * 3)
    scores = np.array([[1.0, -1.0, -2.0, -3.0], [2.0, -1.0, -2.0, -4.0], [1.0, 2.0, 3.0, -1.0]])
    stats = run_statistics(InfluenceRun(tests, trains, candidates, scores), top=1)
    shares = {group: item["helpful_share"] for group, item in stats["all_candidate_edges"]["groups"].items()}
    assert shares == {"A": 0.25, "B": 0.75}
    assert {g: s["helpful_share"] for g, s in stats["displayed_edges"]["groups"].items()} == {"A": 0.5, "B": 0.5}
    (pearson,) = stats["all_candidate_edges"]["correlations"]
    assert pearson["n_shared"] == 4 and pearson["pearson"] == pytest.approx(
        np.corrcoef([3, -2, -4, -7], [1, 2, 3, -1])[0, 1]
    )
    (spearman,) = stats["all_candidate_edges"]["rank_correlations"]
    assert spearman["spearman"] == pytest.approx(0.2)  # ranks [4, 3, 2, 1] vs [2, 3, 4, 1]


def _pipeline_report() -> dict:
    """A minimal ``influence.json`` of the pipeline: two single test points from one source."""

    def row(index: int, score: float) -> dict:
        return {"rank": 1, "train_index": index, "id": f"m{index}", "premise": f"p{index}", "hypothesis": "h",
                "label": "neutral", "score": score}  # fmt: skip

    def test(index: int, predicted: str) -> dict:
        return {"source": "mnli_test", "index": index, "id": f"t{index}", "premise": "P", "hypothesis": "H",
                "label": "entailment", "predicted": predicted, "correct": predicted == "entailment"}  # fmt: skip

    return {
        "explained": [
            {"test": test(0, "entailment"), "helpful": [row(5, 2.0)], "harmful": [row(7, -1.0)]},
            {"test": test(1, "neutral"), "helpful": [row(5, 0.5)], "harmful": [row(9, -0.1)]},
        ]
    }


def _demo_report(top: int = 5) -> dict:
    """An ``influence.json`` shaped like the demo's: four test points, ``top`` helpful and harmful rows each, every
    training point touched by one test point only (so the old median layout hid it under that test point)."""

    def row(rank: int, index: int, score: float) -> dict:
        return {"rank": rank, "train_index": index, "id": f"mnli-{index}", "premise": f"premise {index}",
                "hypothesis": f"hypothesis {index}", "label": "neutral", "score": score}  # fmt: skip

    items = []
    for number in range(4):
        predicted = "entailment" if number < 2 else "neutral"
        test = {"source": "mnli_test", "index": 10 + number, "id": f"test-{number}", "premise": "P", "hypothesis": "H",
                "label": "entailment", "predicted": predicted, "correct": predicted == "entailment"}  # fmt: skip
        magnitudes = [8.0 / (rank + 1) for rank in range(top)]
        helpful = [row(r + 1, 100 * number + r, m) for r, m in enumerate(magnitudes)]
        harmful = [row(r + 1, 100 * number + 50 + r, -m / 2) for r, m in enumerate(magnitudes)]
        items.append({"test": test, "helpful": helpful, "harmful": harmful})
    return {"explained": items}


def _colour_masks(image: np.ndarray) -> dict[str, np.ndarray]:
    """Pixels of the helpful-edge green, the harmful-edge red (both blended with white) and the training dots' grey."""
    r, g, b = (image[..., channel].astype(np.float64) for channel in range(3))
    if image.dtype == np.uint8:
        r, g, b = r / 255, g / 255, b / 255
    return {
        "helpful": (g - r > 0.12) & (g - b > 0.12),
        "harmful": (r - g > 0.12) & (r - b > 0.12) & (np.abs(g - b) < 0.1),
        "train": (np.maximum(np.maximum(r, g), b) < 0.45) & (np.ptp(np.stack([r, g, b]), axis=0) < 0.08),
    }


def test_static_figure_of_a_demo_report_shows_edges_and_training_points(tmp_path: Path) -> None:
    """The report's PNG of a demo-like run draws each panel's edges in its colour and every training point visibly:
    pixel counts inside each panel's axes (green only left, red only right, grey dots in both)."""
    from matplotlib.image import imread

    (tmp_path / "influence.json").write_text(json.dumps(_demo_report()))
    paths = report_run(tmp_path, tmp_path / "report")
    image = imread(paths["png"])
    graph = graph_from_pipeline_report(_demo_report())
    height, width = image.shape[:2]
    left, right = image[:, : width // 2], image[:, width // 2 :]
    masks = {"helpful": _colour_masks(left), "harmful": _colour_masks(right)}
    for sign, other in (("helpful", "harmful"), ("harmful", "helpful")):
        n_edges = sum((e.score > 0) == (sign == "helpful") for e in graph.edges)
        assert masks[sign][sign].sum() > 60 * n_edges  # an edge about 0.45 units long, 1-3 px wide at 150 dpi
        assert masks[sign][other].sum() < 0.01 * masks[sign][sign].sum()
        dots = masks[sign]["train"][int(0.1 * height) : int(0.85 * height)]  # below the title, above the legend
        assert dots.sum() > 15 * n_edges  # one training point per edge, each a dot of 3-8 pt
        assert ndimage.label(dots)[1] == len(graph.train_points) // 2  # each dot apart, none under a test point


def test_pipeline_report_becomes_a_graph(tmp_path: Path) -> None:
    """``fastif influence``'s influence.json is reported too: one source, so arcs split correct from wrong points;
    test points carry their ids and training points the CSV's ``train_id``."""
    graph = graph_from_pipeline_report(_pipeline_report())
    assert [point.group for point in graph.test_points] == ["correct", "wrong"]
    assert [point.id for point in graph.test_points] == ["t0", "t1"]
    assert [point.id for point in graph.train_points] == ["m5", "m7", "m9"]
    assert sorted((e.test, e.train, e.score) for e in graph.edges) == [
        (0, 0, 2.0),
        (0, 1, -1.0),
        (1, 0, 0.5),
        (1, 2, -0.1),
    ]
    (tmp_path / "influence.json").write_text(json.dumps(_pipeline_report()))
    assert {path.name for path in report_run(tmp_path, tmp_path / "out").values()} == REPORT_FILES
    with pytest.raises(DataError, match="malformed"):
        graph_from_pipeline_report({"explained": [{"helpful": []}]})


def test_pipeline_report_names_a_predicted_label() -> None:
    """A given text without --label is named by its place, and its label is shown as the model's prediction."""
    report = _pipeline_report()
    report["explained"][0]["test"].update(source="text (label = the model's prediction)", index=None, id=None)
    graph = graph_from_pipeline_report(report)
    assert [point.id for point in graph.test_points] == ["text 1", "t1"]
    assert graph.test_points[0].gold == "entailment (the model's prediction)"
    assert graph.test_points[1].gold == "entailment"


def test_report_run_refuses_missing_runs(tmp_path: Path) -> None:
    """A missing folder or one without run files raises a DataError that names what is expected."""
    with pytest.raises(DataError, match="does not exist"):
        report_run(tmp_path / "nope")
    with pytest.raises(DataError, match=RUN_FILE):
        report_run(tmp_path)


def test_report_command_on_own_parser(tiny_run, tmp_path: Path, capsys) -> None:
    """``report RUN_DIR --top N --output DIR`` registers on a plain parser and writes the report."""
    run, _ = tiny_run
    write_run(run, tmp_path / "run")
    parser = argparse.ArgumentParser(prog="fastif")
    add_report_command(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["report", str(tmp_path / "run"), "-k", "3", "--output", str(tmp_path / "out")])
    assert args.handler(args) == 0
    assert {path.name for path in (tmp_path / "out").iterdir()} == REPORT_FILES
    assert "helpful edges" in capsys.readouterr().out
    bad = parser.parse_args(["report", str(tmp_path / "run"), "--top-k", "0"])
    with pytest.raises(DataError, match="--top-k"):
        bad.handler(bad)


def test_graph_command_registration() -> None:
    """``experiment influence-graph`` registers beside other experiments and parses its sizes."""
    from fastif.cli.applications import add_experiment_commands

    parser = argparse.ArgumentParser(prog="fastif")
    commands = parser.add_subparsers(dest="command", required=True)
    add_experiment_commands(commands)
    add_report_command(commands)
    args = parser.parse_args(["experiment", "influence-graph", "--quick", "--per-group", "2", "--select", "any"])
    assert (args.quick, args.per_group, args.select, args.candidates) == (True, 2, "any", None)
    assert args.handler.__name__ == "_graph_command"


@pytest.mark.browser
@pytest.mark.skipif(not Path("/usr/bin/chromium").exists(), reason="needs Debian chromium at /usr/bin/chromium")
def test_screenshot_of_a_run_report(tiny_run, tmp_path: Path) -> None:
    """The explorer of a run's report opens in headless Chromium, takes a click and gives a PNG screenshot."""
    pytest.importorskip("playwright")
    from fastif.report.screenshot import screenshot_explorer

    run, _ = tiny_run
    write_run(run, tmp_path)
    html = report_run(tmp_path, top=2)["html"]
    shot = screenshot_explorer(html, tmp_path / "shot.png")
    assert shot is not None and shot.read_bytes().startswith(b"\x89PNG")


@pytest.mark.browser
@pytest.mark.skipif(not Path("/usr/bin/chromium").exists(), reason="needs Debian chromium at /usr/bin/chromium")
def test_explorer_of_a_demo_report_shows_edges_and_training_points(tmp_path: Path) -> None:
    """In headless Chromium the explorer of a demo-like run shows its edges (green and red pixels that vanish when
    the edges are hidden) and every training point as its own dot; a click names the test and training ids."""
    pytest.importorskip("playwright")
    from matplotlib.image import imread
    from playwright.sync_api import sync_playwright

    (tmp_path / "influence.json").write_text(json.dumps(_demo_report()))
    html = report_run(tmp_path, tmp_path / "report")["html"]
    graph = graph_from_pipeline_report(_demo_report())
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path="/usr/bin/chromium", args=["--headless", "--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1500, "height": 950})
            page.goto(html.as_uri())
            box = page.locator("#graph").bounding_box()

            def shot(name: str) -> dict[str, np.ndarray]:
                """Screenshot the graph's SVG and classify its pixels."""
                page.screenshot(path=str(tmp_path / name), clip=box)
                return _colour_masks(imread(tmp_path / name))

            full = shot("explorer.png")
            page.eval_on_selector_all("circle.train-point", "els => els.forEach(e => e.style.visibility = 'hidden')")
            no_train = shot("no_train.png")
            page.eval_on_selector_all("line.edge", "els => els.forEach(e => e.style.visibility = 'hidden')")
            bare = shot("bare.png")
            page.eval_on_selector_all(".edge, .train-point", "els => els.forEach(e => e.style.visibility = '')")
            page.locator('#panel-helpful circle.test-point[data-index="0"]').click(force=True)
            details = page.locator("#details").inner_text()
            page.screenshot(path=str(tmp_path / "clicked.png"), full_page=True)
            print(f"explorer screenshots: {tmp_path}")
        finally:
            browser.close()
    for sign in ("helpful", "harmful"):
        n_edges = sum((e.score > 0) == (sign == "helpful") for e in graph.edges)
        assert full[sign].sum() > 40 * n_edges and bare[sign].sum() < 0.01 * full[sign].sum()
    dots = full["train"] & ~no_train["train"]
    assert ndimage.label(dots)[1] == len(graph.train_points)  # one sign each, so one dot each across both panels
    assert "Test point test-0" in details and "gold entailment" in details
    assert all(f"id mnli-{index}" in details for index in (0, 1, 50, 51))
