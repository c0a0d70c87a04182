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


def test_pipeline_report_becomes_a_graph(tmp_path: Path) -> None:
    """``fastif run``'s influence.json is reported too: one source, so arcs split correct from wrong points."""
    graph = graph_from_pipeline_report(_pipeline_report())
    assert [point.group for point in graph.test_points] == ["correct", "wrong"]
    assert [point.id for point in graph.train_points] == ["train:5", "train:7", "train:9"]
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
    args = parser.parse_args(["report", str(tmp_path / "run"), "--top", "3", "--output", str(tmp_path / "out")])
    assert args.handler(args) == 0
    assert {path.name for path in (tmp_path / "out").iterdir()} == REPORT_FILES
    assert "helpful edges" in capsys.readouterr().out
    bad = parser.parse_args(["report", str(tmp_path / "run"), "--top", "0"])
    with pytest.raises(DataError, match="--top"):
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
