"""Study part 3: FastIF vs the original. Wall time per test point, speed-up, and agreement of the scores.

* **Original** (FastIF's "original" configuration): all N training points scored against one s_test from a single
  LiSSA chain with B = 128, J = 1000 (R = 1).
* **FastIF**: the k = 100 / 1000 nearest training points (FAISS IndexFlatL2 over the pooled [CLS] vector) scored
  against a fast s_test: B = 1 chains, R repeats averaged; run serially, and with ``Influence.parallel`` (chains
  spread over local worker processes) when ``--workers`` > 1. A second, shorter configuration (``--tuned-*``) uses
  part 1's finding (tail averaging, shorter chains).

Every method runs through the facade's one path, ``Influence.candidate_scores`` (all N points for the original, the
k nearest for FastIF), whose timings give each stage: test gradient + s_test, kNN query, scoring.

Both use the same damping and the same scale (the automatic, contraction-safe scale of B = 1 chains). Agreement:
Pearson, Spearman and Kendall of FastIF's scores against the original's on FastIF's candidates, per test point.

Two cost tiers are reported. *Measured*: both methods run on the cached frozen bottom (influence over the pooler +
classifier, whose input the cache holds), timed per test point, interleaved. *Full model, extrapolated*: the same
work without the cache, as the original code ran it (every HVP and score runs the whole MiniLM): per-step HVP times
at B = 1 and B = 128 and the per-example scoring time are measured on the HF model, then multiplied out:
``J·t_hvp(B) · R + n_scored·t_score``; also for MNLI's N = 392,702.

    python benchmarks/study/part3_fastif_vs_original.py --damping 0.3
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import torch

from fastif.evaluation import score_correlation
from fastif.grads import directional_derivatives
from fastif.hvp import Hessian
from fastif.scores import ScoreConfig
from fastif.solvers import LiSSA, LiSSAConfig

try:
    from common import RESULTS, environment, full_adapter, load_json, load_setup, pick_test_points, timed, write_results
except ImportError:  # imported as benchmarks.study.part3_fastif_vs_original
    from .common import (
        RESULTS,
        environment,
        full_adapter,
        load_json,
        load_setup,
        pick_test_points,
        timed,
        write_results,
    )

MNLI_TRAIN_SIZE = 392_702


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options (defaults = the committed run)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-train", type=int, default=4000)
    parser.add_argument("--damping", type=float, default=0.3)
    parser.add_argument("--correct", type=int, default=2)
    parser.add_argument("--wrong", type=int, default=2)
    parser.add_argument("--timed", type=int, default=1, help="test points timed one by one (the rest: batched)")
    parser.add_argument("--original-batch", type=int, default=128)
    parser.add_argument("--original-depth", type=int, default=1000)
    parser.add_argument("--fast-depth", type=int, default=1000)
    parser.add_argument("--fast-repeats", type=int, default=2)
    parser.add_argument("--tuned-depth", type=int, default=300)
    parser.add_argument("--tuned-repeats", type=int, default=1)
    parser.add_argument("--tuned-tail", type=float, default=0.5)
    parser.add_argument("--ks", type=int, nargs="+", default=[100, 1000])
    parser.add_argument("--workers", type=int, default=2, help="runner processes for the parallel variant (1: none)")
    parser.add_argument("--full-model-steps", type=int, default=2, help="HVP steps timed per B on the full model")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=2)
    parser.add_argument("--output", type=Path, default=RESULTS / "part3_fastif_vs_original.json")
    parser.add_argument("--replot", action="store_true", help="only redraw the PNG from --output's JSON")
    return parser.parse_args(argv)


def _lissa(damping: float, scale: float, batch: int, depth: int, repeats: int, tail: float = 0.0) -> LiSSA:
    config = LiSSAConfig(
        damping=damping, scale=scale, depth=depth, repeats=repeats, batch_size=batch, seed=0, tail_average=tail
    )
    return LiSSA(config)


def full_model_costs(setup: Any, args: argparse.Namespace) -> dict[str, float]:
    """Per-step HVP seconds at B = 1 and B = original batch, and per-example score (JVP) seconds, on the whole HF
    model with the same parameters selected (no cache): what the original code paid per unit of work."""
    adapter = full_adapter(setup.model, setup.l2)
    flat = adapter.flat_params()
    hessian = Hessian(adapter, setup.train_text, flat, 64)
    rng = np.random.default_rng(0)
    vector = torch.randn(1, hessian.dim, generator=torch.Generator().manual_seed(0))
    costs: dict[str, float] = {}
    for batch in (1, args.original_batch):
        steps = [
            rng.choice(setup.n_train, size=batch, replace=False).tolist() for _ in range(args.full_model_steps + 1)
        ]
        hessian.batch_matvec(vector, steps[0])
        costs[f"hvp_B{batch}"] = statistics.median(
            timed(lambda s=s: hessian.batch_matvec(vector, s))[1] for s in steps[1:]
        )
    chunk = rng.choice(setup.n_train, size=min(64, setup.n_train), replace=False).tolist()
    batch = setup.train_text.batch(chunk)
    seconds = timed(lambda: directional_derivatives(adapter, flat, batch, vector[0]))[1]
    costs["score_per_example"] = seconds / len(chunk)
    test = setup.test_text.batch([0])
    costs["feature_per_query"] = timed(lambda: adapter.features(test))[1]
    return costs


def run(args: argparse.Namespace, setup: Any = None) -> dict[str, Any]:
    """Run both methods on the test points; write the results JSON and PNG."""
    torch.set_num_threads(args.threads)
    env = environment()
    setup = setup or load_setup(args.n_train)
    n = setup.n_train
    tests, correct = pick_test_points(setup, args.correct, args.wrong, args.seed)
    scale = LiSSA(LiSSAConfig(damping=args.damping, batch_size=1, seed=0)).fit(setup.hessian()).scale
    configs = {
        "original": (args.original_batch, args.original_depth, 1, 0.0),
        "fast": (1, args.fast_depth, args.fast_repeats, 0.0),
        "tuned": (1, args.tuned_depth, args.tuned_repeats, args.tuned_tail),
    }
    score_config = ScoreConfig(method="jvp")
    facades = {name: setup.facade(_lissa(args.damping, scale, *c), score_config) for name, c in configs.items()}

    # numerics: every configuration on all test points at once (chains draw the same batches per row)
    test_points = setup.test_subset(tests)
    s_tests = {name: facade.solve(test_points).x for name, facade in facades.items()}
    original_scores = setup.facade(score=ScoreConfig("grad")).score_s_test(s_tests["original"])
    neighbours = facades["fast"].nearest(test_points, max(args.ks)).numpy()

    agreement = []
    for name in ("fast", "tuned"):
        for k in args.ks:
            rows = []
            for i in range(len(tests)):
                candidates = neighbours[i, :k].tolist()
                fast = facades[name].score_s_test(s_tests[name][i : i + 1], candidates)
                rows.append(score_correlation(fast[0], original_scores[i, candidates]))
            agreement.append(
                {
                    "method": name,
                    "k": k,
                    **{m: statistics.fmean(r[m] for r in rows) for m in ("pearson", "spearman", "kendall")},
                    "min_pearson": min(r["pearson"] for r in rows),
                    "per_test": rows,
                }
            )

    # timing: one test point at a time, methods interleaved, each a call of the facade's one path
    timings: dict[str, list[float]] = {}
    checks: list[float] = []

    def add(key: str, seconds: float) -> None:
        timings.setdefault(key, []).append(seconds)

    def timed_path(name: str, facade: Any, test: Any, k: int | None, reference: torch.Tensor) -> None:
        """One ``candidate_scores`` call: its total and stage times, and its s_test against the batched one."""
        result = facade.candidate_scores(test, k)
        label = name if k is None else f"{name}_k{k}"
        add(label, sum(result.timings.values()))
        add(f"{name}_s_test", result.timings["s_test"])  # the test gradient and the solve
        add(f"{name}_scoring" if k is None else f"knn_k{k}", result.timings["scores" if k is None else "candidates"])
        checks.append(float((result.solve.x[0] - reference).norm() / reference.norm()))

    with contextlib.ExitStack() as stack:
        parallel = None
        if args.workers > 1:
            from fastif.runner import RunnerConfig

            runner_config = RunnerConfig(backend="processes", workers=args.workers, threads=1)
            parallel_facade = setup.facade(_lissa(args.damping, scale, *configs["fast"]), score_config)
            parallel, runner_start = timed(lambda: stack.enter_context(parallel_facade.parallel(runner_config)))
        for i in range(min(args.timed, len(tests))):
            test = setup.test_subset(tests[i : i + 1])
            timed_path("original", facades["original"], test, None, s_tests["original"][i])
            for name in ("fast", "tuned"):
                for k in args.ks:
                    timed_path(name, facades[name], test, k, s_tests[name][i])
            if parallel is not None:
                for k in args.ks:
                    timed_path("parallel", parallel, test, k, s_tests["fast"][i])
            print({key: round(v[-1], 2) for key, v in timings.items()}, flush=True)

    mean = {key: statistics.fmean(v) for key, v in timings.items()}
    methods = [m for m in ("fast", "tuned", "parallel") if f"{m}_k{args.ks[0]}" in mean]
    speedups = [
        {"method": m, "k": k, "seconds": mean[f"{m}_k{k}"], "speedup": mean["original"] / mean[f"{m}_k{k}"]}
        for m in methods
        for k in args.ks
    ]

    costs = full_model_costs(setup, args)
    extrapolated = []
    for n_pool in (n, MNLI_TRAIN_SIZE):
        orig = args.original_depth * costs[f"hvp_B{args.original_batch}"] + n_pool * costs["score_per_example"]
        for name, (_batch, depth, repeats, _tail) in configs.items():
            if name == "original":
                continue
            for k in args.ks:
                chains = depth * costs["hvp_B1"]
                serial = repeats * chains + k * costs["score_per_example"] + costs["feature_per_query"]
                row = {"N": n_pool, "method": name, "k": k, "original_seconds": orig, "fast_seconds": serial}
                row["speedup"] = orig / serial
                if name == "fast" and args.workers > 1:
                    parallel = -(-repeats // args.workers) * chains + k * costs["score_per_example"] / args.workers
                    row["parallel_seconds"] = parallel + costs["feature_per_query"]
                    row["parallel_speedup"] = orig / row["parallel_seconds"]
                row["cached_tuned_vs_full_original_speedup"] = orig / mean.get(f"tuned_k{k}", float("nan"))
                extrapolated.append(row)

    results = {
        "part": "3 FastIF vs original",
        "environment": env,
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "setup": {key: v for key, v in setup.info.items() if key != "parameter_names"},
        "test_points": tests,
        "test_correct": correct,
        "lissa_scale": scale,
        "configs": {name: dict(zip(("B", "J", "R", "tail_average"), c, strict=True)) for name, c in configs.items()},
        "one_off_seconds": {
            "index_build": setup.info["index_build_seconds"],
            "frozen_pass_train": setup.info.get("cache_seconds_train"),  # activations + features: one pass
            **({"runner_start": runner_start} if parallel is not None else {}),
        },
        "timings_per_test_point": timings,
        "mean_seconds_per_test_point": mean,
        "speedups_measured": speedups,
        "agreement": agreement,
        "single_vs_batched_relative_difference": checks,
        "full_model_costs": costs,
        "full_model_extrapolated": extrapolated,
    }
    write_results(args.output, results)
    plot(results, args.output.with_suffix(".png"))
    return results


def plot(results: dict[str, Any], path: Path) -> None:
    """Measured seconds per test point; agreement with the original; full-model extrapolated speed-ups."""
    mean = results["mean_seconds_per_test_point"]
    labels = ["original"] + [f"{s['method']} k={s['k']}" for s in results["speedups_measured"]]
    values = [mean["original"]] + [s["seconds"] for s in results["speedups_measured"]]
    fig, (left, middle, right) = plt.subplots(1, 3, figsize=(17, 4.8))
    bars = left.barh(labels, values, color=["tab:grey"] + ["tab:blue"] * (len(values) - 1))
    for bar, speed in zip(bars[1:], results["speedups_measured"], strict=True):
        left.text(bar.get_width(), bar.get_y() + bar.get_height() / 2, f" {speed['speedup']:.1f}x", va="center")
    left.set(xscale="log", xlabel="seconds per test point", title="measured (cached bottom, shared CPU)")
    left.invert_yaxis()
    agreement = results["agreement"]
    x = np.arange(len(agreement))
    for offset, metric in zip((-0.25, 0.0, 0.25), ("pearson", "spearman", "kendall"), strict=True):
        middle.bar(x + offset, [a[metric] for a in agreement], width=0.25, label=metric)
    middle.set_xticks(x, [f"{a['method']} k={a['k']}" for a in agreement])
    middle.set(ylim=(0.5, 1.0), ylabel="correlation with the original", title="FastIF vs original on the candidates")
    middle.legend(fontsize=8, loc="lower right")
    rows = results["full_model_extrapolated"]
    names = [f"{r['method']} k={r['k']}" for r in rows if r["N"] == rows[0]["N"]]
    y = np.arange(len(names))
    for offset, n_pool, colour in ((-0.2, rows[0]["N"], "tab:blue"), (0.2, rows[-1]["N"], "tab:orange")):
        cells = [r for r in rows if r["N"] == n_pool]
        right.barh(y + offset, [r["speedup"] for r in cells], height=0.4, color=colour, label=f"serial, N={n_pool}")
        par = [(i, r["parallel_speedup"]) for i, r in enumerate(cells) if "parallel_speedup" in r]
        right.scatter([p for _, p in par], [i + offset for i, _ in par], marker="D", color="black", zorder=3)
    right.axvline(200, color="red", ls="--", lw=0.8, label="200x target")
    right.scatter([], [], marker="D", color="black", label="parallel runner (2 ranks, assumed)")
    right.set_yticks(y, names)
    right.invert_yaxis()
    right.set(xscale="log", xlabel="speed-up over the original", title="full model, extrapolated")
    right.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    arguments = parse_args()
    if arguments.replot:
        plot(load_json(arguments.output), arguments.output.with_suffix(".png"))
    else:
        run(arguments)
