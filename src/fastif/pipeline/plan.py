"""What a run will do and how long each stage should take on this machine, said before the slow part starts.

Each estimate times a small sample of the real work on this machine (a few batches of the no-grad pass, one
LiSSA step, one batch of scores) and scales it to the run's size, so it reflects the current load. They are
estimates and say so; the progress bars then show the measured rate and ETA.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

from ..data import length_order
from ..solvers.lissa import first_attempt

if TYPE_CHECKING:
    from .core import Pipeline

SAMPLE_BATCHES = 3
"""Batches the training-pass estimate times, at the pass's own batch size (batches of 8 ran slower per example and
put the demo's 181 s pass at 8.0 min, ``benchmarks/results/demo/new_model_stopped_run.log``)."""
WARM_UP_SIZE = 8


def _seconds(work: Callable[[], object]) -> float:
    start = time.perf_counter()
    work()
    return time.perf_counter() - start


def _duration(seconds: float) -> str:
    if seconds < 10:
        return f"{seconds:.1f} s"
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


@torch.no_grad()
def pass_seconds(pipeline: Pipeline) -> float:
    """The training pass's time: a no-grad forward over a few batches of the pass's batch size, spread over its
    length order (after one small untimed warm-up batch), scaled to the training set."""
    train, adapter = pipeline.train, pipeline.adapter
    batch_size = pipeline.influence.score_config.batch_size
    order = length_order(train, range(len(train)))
    starts = [int((part + 0.5) / SAMPLE_BATCHES * len(order)) for part in range(SAMPLE_BATCHES)]
    chunks = [order[start : start + batch_size] for start in starts]
    chunks = [chunk for chunk in chunks if chunk]
    adapter.features(adapter.to_device(train.batch(order[:WARM_UP_SIZE])))  # the first forward sets things up
    seconds = sum(_seconds(lambda c=chunk: adapter.features(adapter.to_device(train.batch(c)))) for chunk in chunks)
    return seconds / sum(len(chunk) for chunk in chunks) * len(train)


def pass_plan(pipeline: Pipeline) -> str:
    """One line: whether the training pass will be reused, or how long computing it should take."""
    influence, n = pipeline.influence, len(pipeline.train)
    what = "frozen-bottom pass" if influence.split is not None else "feature pass"
    with pipeline.open_store() as store:
        influence.cache = store
        try:
            cached = influence.training_pass_cached()
        finally:
            influence.cache = None
    if cached:
        return f"plan: the {what} over {n:,} training points is in the cache ({store.folder}): reused"
    return (
        f"plan: {what} over {n:,} training points, about {_duration(pass_seconds(pipeline))} (estimated from "
        f"{SAMPLE_BATCHES} batches of them timed now), then cached for every later run"
    )


def planned_tests(pipeline: Pipeline) -> int:
    """How many s_test rows the run solves: the given test indices, the text, or the correct + wrong picks (one for
    a group)."""
    scoring = pipeline.config.scoring
    if scoring.group:
        return 1
    if scoring.text is not None:
        return 1
    return len(scoring.test_indices) or scoring.correct + scoring.wrong


def query_plan(pipeline: Pipeline) -> str:
    """One line, after the training pass: the time of s_test and of the scores for the run's test points, from one
    timed HVP step and one timed batch of scores on the working (frozen) model. LiSSA's automatic mode picks its
    depth as it runs, so only its first attempt is estimated."""
    influence, config, rows = pipeline.influence, pipeline.config, planned_tests(pipeline)
    hessian, lissa = influence.hessian, config.solver.method == "lissa"
    depth, batch_size, repeats = first_attempt(influence.solver.config, hessian.num_examples) if lissa else (0, 1, 0)
    vectors = torch.randn(rows, influence.adapter.num_params, dtype=influence.flat.dtype)
    batch = list(range(min(batch_size, hessian.num_examples)))
    step = min(_seconds(lambda: hessian.batch_matvec(vectors, batch)) for _ in range(2))  # the first warms up
    count = len(pipeline.train) if pipeline.candidate_method == "all" else config.candidates.count or 0
    sample = list(range(min(count, config.scoring.batch_size, len(pipeline.train))))  # too large: refused later
    timed = min(_seconds(lambda: influence.score_s_test(vectors, sample)) for _ in range(2))
    scores = timed / max(len(sample), 1) * count
    scoring = f"scores of {count:,} training points per test point ≈ {_duration(scores)} for all {rows}"
    if not lissa:
        return f"plan: {rows} s_test row(s) by {config.solver.method}, one HVP ≈ {step * 1000:.0f} ms; {scoring}"
    workers, _ = pipeline.parallelism()
    chains = -(-repeats // workers)  # chains each worker runs, one after another
    timed_step = f"one step at batch {len(batch)} timed now: {step * 1000:.1f} ms"
    if influence.solver.config.adaptive:
        return (
            f"plan: s_test for {rows} test point(s) = LiSSA, automatic depth: a first attempt of {repeats} chain(s) × "
            f"{depth} steps ≈ {_duration(step * depth * chains)} ({timed_step}), then attempts of doubling depth "
            f"(and batch) until the relative residual on the full H is ≤ {config.solver.target_residual:g}, within "
            f"{config.solver.max_steps:,} steps; {scoring}"
        )
    return (
        f"plan: s_test for {rows} test point(s) = LiSSA {repeats} chain(s) × {depth} steps in {workers} process(es) "
        f"≈ {_duration(step * depth * chains)} ({timed_step}); {scoring}"
    )
