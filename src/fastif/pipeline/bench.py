"""``fastif bench``: quick timings of the pipeline's main stages on the bundled MiniLM.

The recipe's model gets a freshly initialised head (timings do not depend on the weights), so the bench never
trains; the lower layers are frozen as the recipe freezes them, and the parameter selection, candidates and
solver settings are the pipeline config's.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any, TypeVar

import torch

from ..candidates import CandidateIndex
from ..grads import dataset_grads
from ..hvp import Hessian
from ..scores import ScoreConfig, score_matrix
from ..solvers import LiSSA
from .config import PipelineConfig, with_overrides
from .core import Pipeline, build_adapter, solver_config

T = TypeVar("T")
QUERIES = 4


def _timed(stages: list[dict[str, Any]], name: str, items: int, fn: Callable[[], T]) -> T:
    """Run ``fn``, record its wall time as stage ``name`` over ``items`` items, and return its result."""
    start = time.perf_counter()
    result = fn()
    seconds = time.perf_counter() - start
    stages.append({"stage": name, "seconds": seconds, "items": items, "ms_per_item": 1000 * seconds / max(items, 1)})
    return result


def run_bench(config: PipelineConfig, examples: int = 256, steps: int = 20) -> dict[str, Any]:
    """Time loading, tokenising, features, index, kNN, test gradients, LiSSA scale and steps, and scoring."""
    config = with_overrides(config, {"output.progress": False})
    stages: list[dict[str, Any]] = []
    pipeline = Pipeline(config)
    config = pipeline.config
    recipe, device = pipeline.recipe, pipeline.device
    loaded = _timed(
        stages, "load model + tokenizer", 1, lambda: recipe.untrained_model(config.model, config.seed, device)
    )
    data = with_overrides(config, {"data.train_size": examples, "data.max_length": 128}).data
    train = _timed(stages, "tokenise", examples, lambda: recipe.load_data("train", loaded, data))
    pipeline.loaded, pipeline.train = loaded, train
    adapter = pipeline.adapter = build_adapter(loaded, config.parameters, config.candidates.feature_module)
    flat = adapter.flat_params()
    features = _timed(stages, "features (forward, no grad)", len(train), lambda: pipeline.features(train))
    index = _timed(
        stages, "FAISS index build", len(train), lambda: CandidateIndex.build(features, config.candidates.faiss)
    )
    queries = train.subset(range(min(QUERIES, len(train))))
    k = min(config.candidates.count or len(train), len(train))
    neighbours = _timed(
        stages, f"kNN search (k={k})", len(queries), lambda: index.search(features[: len(queries)], k)[1]
    )
    grads = _timed(stages, "test gradients", len(queries), lambda: dataset_grads(adapter, flat, queries))
    hessian = Hessian(adapter, train, flat, config.solver.hessian_batch_size)
    lissa_config = solver_config(with_overrides(config, {"solver.depth": steps}).solver, config.seed, 1)
    solver = LiSSA(lissa_config)
    power = config.solver.scale_samples * config.solver.power_iterations if config.solver.scale is None else 0
    _timed(stages, "LiSSA scale (power iteration HVPs)", power, lambda: solver.fit(hessian))
    s_test, _ = _timed(
        stages, f"LiSSA steps (B={config.solver.batch_size})", steps, lambda: solver.run_chain(grads[:1], 0)
    )
    score = ScoreConfig(method=config.scoring.method, batch_size=config.scoring.batch_size)
    candidates = neighbours[0].tolist()
    _timed(
        stages,
        "candidate scores (1 test point)",
        k,
        lambda: score_matrix(adapter, flat, s_test, train, candidates, score),
    )
    per_step = next(stage["ms_per_item"] for stage in stages if stage["stage"].startswith("LiSSA steps")) / 1000
    return {
        "stages": stages,
        "parameters": adapter.num_params,
        "examples": len(train),
        "lissa_chain_estimate_s": per_step * config.solver.depth,
        "depth": config.solver.depth,
        "torch_threads": torch.get_num_threads(),
        "load_average": list(os.getloadavg()),
    }


def format_bench(results: dict[str, Any]) -> str:
    """The bench results as an aligned table plus a line estimating one LiSSA chain at the configured depth."""
    lines = [f"{'stage':<40} {'seconds':>9} {'items':>7} {'ms/item':>9}"]
    for stage in results["stages"]:
        lines.append(f"{stage['stage']:<40} {stage['seconds']:>9.2f} {stage['items']:>7} {stage['ms_per_item']:>9.1f}")
    load = ", ".join(f"{value:.1f}" for value in results["load_average"])
    lines.append(
        f"{results['parameters']:,} parameters, {results['examples']} training pairs; one LiSSA chain of "
        f"{results['depth']} steps ≈ {results['lissa_chain_estimate_s']:.1f} s; "
        f"{results['torch_threads']} torch threads; load average {load}"
    )
    return "\n".join(lines)
