"""``fastif store build`` / ``fastif store query`` on a tiny checkpoint: resumable build, retrieval + exact rerank
equal to a full scan where the projection keeps every coordinate, recall lines, and one-line refusals."""

from __future__ import annotations

import json

import pytest
from test_cli import one_line_error, tiny  # noqa: F401 (the module-scoped fixture)

from fastif.cli import run


def _common(tiny, output) -> list[str]:  # noqa: F811
    return [
        *("--model", str(tiny["model"]), "--train", str(tiny["train"]), "--test", str(tiny["test"])),
        *("--max-length", "48", "--output", str(output), "--no-progress"),
    ]


def _explain(tiny, output, *extra: str) -> list[str]:  # noqa: F811
    return [
        *_common(tiny, output),
        *("--test-indices", "0,3", "-k", "3", "--solver", "cg", "--damping", "5", "--workers", "1", *extra),
    ]


def test_build_then_query_finds_the_full_scans_top_k(tiny, tmp_path, capsys):  # noqa: F811
    store_options = ("--projection", "identity", "--dim", "200000", "--store-dtype", "float32")
    assert run(["store", "build", *_common(tiny, tmp_path / "s"), *store_options]) == 0
    built = capsys.readouterr().out
    assert "store: 30 training points" in built and "built 1 shard(s), reused 0" in built
    assert run(["store", "build", *_common(tiny, tmp_path / "s"), *store_options]) == 0
    assert "built 0 shard(s), reused 1 of 1" in capsys.readouterr().out
    assert run(["store", "query", *_explain(tiny, tmp_path / "s", "--candidates", "12", *store_options)]) == 0
    printed = capsys.readouterr().out
    assert "helpful: recall of the exact top-3 among the 12 reranked candidates" in printed
    retrieved = json.loads((tmp_path / "s" / "influence.json").read_text())
    assert run(["influence", *_explain(tiny, tmp_path / "full", "--candidate-method", "all")]) == 0
    full = json.loads((tmp_path / "full" / "influence.json").read_text())
    for got, want in zip(retrieved["explained"], full["explained"], strict=True):
        for side in ("helpful", "harmful"):
            assert [row["train_index"] for row in got[side]] == [row["train_index"] for row in want[side]]
            assert [row["score"] for row in got[side]] == pytest.approx([row["score"] for row in want[side]], 1e-5)
        assert got["recall"]["helpful"]["estimate"] >= 0.95


def test_a_store_made_with_another_projection_is_refused_in_one_line(tiny, tmp_path, capsys):  # noqa: F811
    assert run(["store", "build", *_common(tiny, tmp_path), "--dim", "16"]) == 0
    capsys.readouterr()
    assert run(["store", "query", *_explain(tiny, tmp_path, "--candidates", "10", "--dim", "17")]) == 2
    assert "dim" in one_line_error(capsys)
