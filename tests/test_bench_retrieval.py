"""Smoke test of benchmarks/bench_retrieval.py: one tiny set-up end to end through ``run`` and the markdown tables.
Its identity store's approximate scores are the exact ones, so the benchmark must measure recall 1 there."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import bench_retrieval as bench
from fastif import AdapterConfig, TensorData, TorchAdapter
from fastif.projection import ProjectionConfig
from fastif.scores import ScoreConfig


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(logits, targets, reduction="none")


def tiny_setup() -> bench.Setup:
    """A float64 MLP on 600 random points (K/2 = 20 and 30 per side) and 2 test points."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    adapter = TorchAdapter(model, cross_entropy, AdapterConfig(l2=1e-3))
    generator = torch.Generator().manual_seed(1)
    inputs = torch.randn(602, 5, generator=generator, dtype=torch.float64)
    labels = torch.randint(0, 3, (602,), generator=generator)
    return bench.Setup(
        "tiny",
        adapter,
        TensorData((inputs[:600], labels[:600])),
        TensorData((inputs[600:], labels[600:])),
        damping=1.0,  # the untrained MLP's H is indefinite (λ_min ≈ -0.16)
        frozen="off",
        projections={"identity": ProjectionConfig(kind="identity"), "dense-8": ProjectionConfig(dim=8)},
        default_projection="identity",
        score=ScoreConfig(batch_size=128, chunk_size=128),
        build_options={"batch_size": 128, "chunk_size": 128},
        hessian_batch_size=600,
        lissa_steps=3,
        fast_rank=4,
    )


def test_the_benchmark_measures_recall_one_on_an_exact_store_and_renders_its_tables(tmp_path):
    result = bench.run(tiny_setup(), tmp_path, ["benchmarks/bench_retrieval.py", "--setup", "tiny"], threads=1)
    assert result["ks"] == [20, 30] and result["n"] == 600 and result["num_tests"] == 2
    summary = result["summary"]
    for k in result["ks"]:
        exact_store = summary["gradients"][f"identity@{k}"]
        assert exact_store["helpful"] == exact_store["harmful"] == 1.0
        assert exact_store["pearson_projected_vs_exact_all"] > 0.999999
        assert math.isfinite(exact_store["speedup_vs_original_lissa"]) and exact_store["speedup_vs_original_lissa"] > 0
        assert 0.0 <= summary["features"][str(k)]["helpful"] <= 1.0
    assert summary["gradients"]["dense-8@20"]["pearson_projected_vs_exact_all"] < 0.999999  # 8 of 57 dims: lossy
    assert set(summary["fast"]["rows"]) == {"20", "30"}
    fast = summary["fast"]["rows"]["20"]
    assert set(fast["stage_seconds"]) == {"prepare", "s_test", "candidates", "scores", "recall"}
    assert sum(fast["stage_seconds"].values()) <= fast["retrieval_seconds"]  # the stages lie inside the query
    markdown = bench.table([result])
    assert "tiny" in markdown and "identity" in markdown and "dense-8" in markdown
