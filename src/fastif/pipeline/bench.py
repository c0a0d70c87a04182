"""``fastif bench``: quick timings of the pipeline's main stages on the bundled MiniLM, through the same facade
the pipeline uses (the frozen path where it runs), so its estimates are those of ``fastif demo`` and ``influence``.

The recipe's model gets a freshly initialised head (timings do not depend on the weights), so the bench never
trains; the lower layers are frozen as the recipe freezes them, and the parameter selection, candidates and
solver settings are the pipeline config's, with one LiSSA chain of ``steps`` steps.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any, TypeVar

import torch

from ..candidates import CandidateIndex
from ..solvers.lissa import LiSSAConfig, first_attempt
from .config import PipelineConfig, with_overrides
from .core import Pipeline

T = TypeVar("T")


def _timed(stages: list[dict[str, Any]], name: str, items: int, fn: Callable[[], T]) -> T:
    """Run ``fn``, record its wall time as stage ``name`` over ``items`` items, and return its result."""
    start = time.perf_counter()
    result = fn()
    _record(stages, name, items, time.perf_counter() - start)
    return result


def _record(stages: list[dict[str, Any]], name: str, items: int, seconds: float) -> None:
    stages.append({"stage": name, "seconds": seconds, "items": items, "ms_per_item": 1000 * seconds / max(items, 1)})


def run_bench(config: PipelineConfig, examples: int = 256, steps: int = 20) -> dict[str, Any]:
    """Time loading, tokenising, the training pass, the index, LiSSA's scale and steps, and scoring, through the
    pipeline's :class:`~fastif.influence.Influence` facade; estimates one chain at the configured depth (automatic
    LiSSA: its first attempt's depth and batch size, which later attempts double)."""
    lissa = LiSSAConfig(**{key: getattr(config.solver, key) for key in ("depth", "batch_size")})
    depth, batch_size, _ = first_attempt(lissa, examples)
    overrides = {"output.progress": False, "solver.depth": steps, "solver.repeats": 1, "solver.workers": 1}
    overrides["solver.batch_size"] = batch_size
    pipeline = Pipeline(with_overrides(config, overrides))
    config = pipeline.config
    stages: list[dict[str, Any]] = []
    recipe = pipeline.recipe
    loaded = _timed(
        stages, "load model + tokenizer", 1, lambda: recipe.untrained_model(config.model, config.seed, pipeline.device)
    )
    data = with_overrides(config, {"data.train_size": examples, "data.max_length": 128}).data
    train = _timed(stages, "tokenise", examples, lambda: recipe.load_data("train", loaded, data))
    pipeline.loaded, pipeline.train = loaded, train
    influence = pipeline.influence
    method = "features" if pipeline.candidate_method == "gradients" else pipeline.candidate_method
    pass_name = "training pass (frozen bottom)" if influence.split is not None else "features (forward, no grad)"
    _timed(stages, pass_name, len(train), influence.cached_training_pass)
    if method == "features":
        index = _timed(stages, "FAISS index build", len(train), lambda: CandidateIndex.build(influence.train_features))
        influence.build_index(index)
    power = config.solver.scale_samples * config.solver.power_iterations if config.solver.scale is None else 0
    _timed(stages, "LiSSA scale (power iteration HVPs)", power, influence.fit)
    count = None if method == "all" else min(config.candidates.count or len(train), len(train))
    first = influence.candidate_scores(train.subset(range(1)), count, method=method)  # includes one-off set-up
    _record(stages, "first query (s_test + scores, with set-up)", 1, sum(first.timings.values()))
    result = influence.candidate_scores(train.subset(range(1, 2)), count, method=method)
    if "candidates" in result.timings:
        _record(stages, f"kNN search (k={count})", 1, result.timings["candidates"])
    _record(stages, f"LiSSA steps (B={config.solver.batch_size})", steps, result.timings["s_test"])
    _record(stages, "candidate scores (1 test point)", result.indices.shape[1], result.timings["scores"])
    return {
        "stages": stages,
        "parameters": influence.adapter.num_params,
        "examples": len(train),
        "candidate_method": method,
        "frozen": influence.split is not None,
        "lissa_chain_estimate_s": result.timings["s_test"] / steps * depth,
        "depth": depth,
        "adaptive": lissa.adaptive,
        "torch_threads": torch.get_num_threads(),
        "load_average": list(os.getloadavg()),
    }


def format_bench(results: dict[str, Any]) -> str:
    """The bench results as an aligned table plus a line estimating one LiSSA chain at the configured depth."""
    lines = [f"{'stage':<40} {'seconds':>9} {'items':>7} {'ms/item':>9}"]
    for stage in results["stages"]:
        lines.append(f"{stage['stage']:<40} {stage['seconds']:>9.2f} {stage['items']:>7} {stage['ms_per_item']:>9.1f}")
    load = ", ".join(f"{value:.1f}" for value in results["load_average"])
    first = " (automatic depth: the first attempt's)" if results["adaptive"] else ""
    lines.append(
        f"{results['parameters']:,} parameters, {results['examples']} training pairs; one LiSSA chain of "
        f"{results['depth']} steps{first} ≈ {results['lissa_chain_estimate_s']:.1f} s; "
        f"{results['torch_threads']} torch threads; load average {load}"
    )
    return "\n".join(lines)
