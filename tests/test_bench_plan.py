"""The plan-accuracy benchmark reads the demo's own lines: its estimates and the times measured after them."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.bench_plan import estimates, seconds_after

OUTPUT = """\
plan: frozen-bottom pass over 8,001 training points, about 8.0 min (estimated from 3 batches of them timed now), then
frozen path: the first token of every training point computed (181.1 s); gradients, HVPs and scores run on the top
plan: s_test for 4 test point(s) = LiSSA, automatic depth: a first attempt of 2 chain(s) × 100 steps ≈ 5.8 s (one \
step at batch 32 timed now: 28.9 ms), then ...; scores of 8,001 training points per test point ≈ 4.1 s for all 4
s_test: lissa, 2 chain(s) on 1 worker(s); automatic depth: 3 attempt(s), 1,400 steps (last: depth 400, batch 128)
times: model 3.5 s · data 1.3 s · index 181.9 s · test points 2.4 s · s_test 55.0 s · scores 2.0 s; total 246.1 s
"""


def test_minutes_and_seconds_are_read_in_seconds():
    assert seconds_after("about ", "about 8.0 min") == 480.0
    assert seconds_after("about ", "about 12.5 s") == 12.5
    assert seconds_after("about ", "nothing here") is None


def test_estimates_pair_each_plan_with_the_measured_time():
    found = estimates(OUTPUT)
    assert found["frozen_pass"] == {"estimate_s": 480.0, "measured_s": 181.1, "ratio": pytest.approx(2.65)}
    assert found["s_test"] == {"first_attempt_estimate_s": 5.8, "measured_s": 55.0, "attempts": 3, "steps": 1400}
    assert found["scores"] == {"estimate_s": 4.1, "measured_s": 2.0, "ratio": pytest.approx(2.05)}


def test_a_run_that_stopped_early_has_no_ratio_for_what_it_did_not_reach():
    stopped = OUTPUT.split("s_test: lissa")[0]
    found = estimates(stopped)
    assert found["frozen_pass"]["ratio"] == pytest.approx(2.65)
    assert found["scores"]["ratio"] is None and found["s_test"]["attempts"] is None
