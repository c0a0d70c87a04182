"""Progress reporting: long stages announce their work to the installed reporter, and nothing shows by default."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import pytest
import torch
import transformers
from test_frozen import TokenData, _config

from fastif import AdapterConfig, HFClassifierAdapter, Influence, LiSSA
from fastif.progress import Advance, BarReporter, reporting, task
from fastif.solvers.lissa import LiSSAConfig


class Recorder:
    """Records each task's name, total and the units it advanced."""

    def __init__(self) -> None:
        self.tasks: list[dict] = []

    @contextlib.contextmanager
    def task(self, name: str, total: int | None, unit: str) -> Iterator[Advance]:
        record = {"name": name, "total": total, "unit": unit, "done": 0}
        self.tasks.append(record)

        def advance(done: int) -> None:
            record["done"] += done

        yield advance


def _influence(depth: int) -> tuple[Influence, TokenData, TokenData]:
    torch.manual_seed(0)
    model = transformers.BertForSequenceClassification(_config("bert")).double()
    adapter = HFClassifierAdapter(model, AdapterConfig(include=("bert.encoder.layer.2", "bert.pooler", "classifier")))
    solver = LiSSA(LiSSAConfig(depth=depth, repeats=2, batch_size=4, damping=0.1, scale=50.0))
    return Influence(adapter, TokenData(24, seed=1), solver), TokenData(24, seed=1), TokenData(2, seed=2)


@pytest.mark.filterwarnings("ignore:LiSSA has not settled")  # a few steps are enough to count them
def test_each_long_stage_reports_its_total_and_finishes_it():
    influence, train, test = _influence(depth=7)
    recorder = Recorder()
    with reporting(recorder):
        influence.top_k(test, k=3)
    by_name = {record["name"]: record for record in recorder.tasks}
    passes = [r["total"] for r in recorder.tasks if r["name"] == "frozen-bottom pass"]
    assert passes == [len(train), 2]  # the training pass, then the test points
    assert [r["name"] for r in recorder.tasks if r["name"].startswith("s_test")] == [
        "s_test: LiSSA chain 0",
        "s_test: LiSSA chain 1",
    ]
    assert by_name["scores"]["total"] == 24
    assert all(record["done"] == record["total"] for record in recorder.tasks)


@pytest.mark.filterwarnings("ignore:LiSSA has not settled")
def test_nothing_is_shown_unless_a_reporter_is_installed(capsys):
    influence, _, test = _influence(depth=3)
    influence.top_k(test, k=2)
    assert capsys.readouterr() == ("", "")
    with reporting(BarReporter()), task("work", 3, "ex") as advance:
        advance(3)
    assert "work" in capsys.readouterr().err
