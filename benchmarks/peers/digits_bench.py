"""Tasks (a) and (b) on scikit-learn digits: fastif against captum, kronfluence and dattri, interleaved.

(a) Per model (softmax regression, 64-32-10 MLP): every method scores ``n_test x n_train`` pairs; quality is the
    leave-one-out correlation (``--loo`` random training points retrained away), the LDS (``--lds`` random 50%
    subsets retrained), and the Pearson correlation with fastif's Exact scores.
(b) The same models trained with 10% of the training labels flipped: every method's self-influence, and its ROC AUC
    at finding the flipped points. The iterative solvers (CG, LiSSA; fastif's and dattri's alike) sit this one out:
    self-influence needs one solve per training point, which the factorising methods get for free.

Times are wall-clock medians over ``--repeats`` rounds in which methods run round-robin (each fastif method next to
its peer counterparts), so both sides see the same machine load; the load averages are recorded per round.

    python -m benchmarks.peers.digits_bench --repeats 3
"""

from __future__ import annotations

import os

os.environ.setdefault("TQDM_DISABLE", "1")  # dattri's progress bars; must precede every tqdm import

import argparse
import time
import warnings
from typing import Any

import numpy as np

from fastif.evaluation import (
    lds_from_retraining,
    leave_one_out_changes,
    loo_correlation,
    mislabel_auc,
    predicted_loo_changes,
    score_correlation,
)

from .common import (
    interleaved,
    load_average,
    markdown_table,
    provenance,
    set_threads,
    uptime,
    write_results,
)
from .digits_problems import DigitsProblem, DigitsSpec, build_problem
from .methods import Method, Settings, all_methods

ORDER = (
    "fastif Exact",
    "captum NaiveInfluenceFunction",
    "kronfluence EK-FAC",
    "fastif CG",
    "dattri CG",
    "fastif LiSSA",
    "dattri LiSSA",
    "fastif Arnoldi",
    "captum ArnoldiInfluenceFunction",
    "dattri Arnoldi",
    "fastif Identity",
    "captum TracInCP",
)


def ordered(methods: list[Method]) -> list[Method]:
    """Methods in round-robin order: each fastif method followed by its peer counterparts."""
    rank = {name: i for i, name in enumerate(ORDER)}
    return sorted(methods, key=lambda m: rank.get(m.name, len(ORDER)))


class LDSCache:
    """Retrain the LDS subsets once, then score any number of methods against the same margins."""

    def __init__(self, problem: DigitsProblem, m: int, seed: int) -> None:
        self.problem, self.m, self.seed = problem, m, seed
        self.margins: dict[tuple[int, ...], np.ndarray] = {}
        self.seconds = 0.0

    def retrain(self, kept: np.ndarray) -> tuple[int, ...]:
        """Retrain on ``kept`` the first time; later calls return the cached key."""
        key = tuple(int(i) for i in kept)
        if key not in self.margins:
            start = time.perf_counter()
            self.margins[key] = self.problem.test_margins(self.problem.retrain_subset(kept))
            self.seconds += time.perf_counter() - start
        return key

    def lds(self, scores: np.ndarray) -> float:
        """Mean LDS of ``scores`` over the cached subsets (retraining only on first use)."""
        mean, _ = lds_from_retraining(self.retrain, self.margins.__getitem__, scores, self.m, seed=self.seed)
        return mean


def loo_truth(problem: DigitsProblem, num_loo: int, seed: int) -> tuple[np.ndarray, np.ndarray, float]:
    """Random training points to leave out, the actual test-loss changes [num_loo, n_test], and the wall time."""
    n = len(problem.y_train)
    removed = np.sort(np.random.default_rng(seed).choice(n, size=num_loo, replace=False))
    start = time.perf_counter()
    changes = leave_one_out_changes(problem.retrain, problem.test_losses, n, removed, problem.model)
    return removed, changes, time.perf_counter() - start


def quality(scores: np.ndarray, exact: np.ndarray, problem: DigitsProblem, truth: dict[str, Any]) -> dict:
    """LOO Pearson/Spearman, LDS and agreement with fastif Exact for one method's score matrix."""
    predicted = predicted_loo_changes(scores, truth["removed"], len(problem.y_train))
    loo = loo_correlation(predicted, truth["changes"])
    return {
        "loo_pearson": loo["pearson"],
        "loo_spearman": loo["spearman"],
        "lds": truth["lds"].lds(scores),
        "pearson_vs_exact": score_correlation(scores, exact)["pearson"],
    }


def task_a(spec: DigitsSpec, methods: list[Method], args: argparse.Namespace) -> dict[str, Any]:
    """Score every pair with every method (interleaved), then measure quality against retraining."""
    problem = build_problem(spec)
    log(f"task (a) {spec.kind}: P={problem.num_params}, {problem.info}")
    timings = interleaved({m.name: (lambda m=m: m.scores(problem)) for m in methods}, args.repeats, log)
    removed, changes, loo_seconds = loo_truth(problem, args.loo, args.seed)
    lds = LDSCache(problem, args.lds, args.seed)
    truth = {"removed": removed, "changes": changes, "lds": lds}
    exact = timings["fastif Exact"].output
    rows = {}
    for method in methods:
        timing = timings[method.name]
        rows[method.name] = {
            "library": method.library,
            "counterpart": method.counterpart,
            "seconds": timing.seconds,
            "median_seconds": timing.median,
            **quality(timing.output, exact, problem, truth),
        }
    log(f"  ground truth: {args.loo} LOO refits {loo_seconds:.1f}s, {args.lds} LDS refits {lds.seconds:.1f}s")
    return {
        "spec": vars(spec),
        "problem": problem.info,
        "ground_truth_seconds": {"loo": loo_seconds, "lds": lds.seconds},
        "methods": with_ratios(rows, "lds", 0.005),
    }


def task_b(spec: DigitsSpec, methods: list[Method], args: argparse.Namespace) -> dict[str, Any]:
    """Self-influence of every training point with every method (interleaved) and its mislabel AUC."""
    problem = build_problem(spec)
    log(f"task (b) {spec.kind}: {int(problem.flipped.sum())} flipped labels, {problem.info}")
    methods = [m for m in methods if not m.iterative]  # CG / LiSSA would need one solve per training point
    timings = interleaved({m.name: (lambda m=m: m.self_influence(problem)) for m in methods}, args.repeats, log)
    exact = timings["fastif Exact"].output
    rows = {}
    for method in methods:
        timing = timings[method.name]
        rows[method.name] = {
            "library": method.library,
            "counterpart": method.counterpart,
            "seconds": timing.seconds,
            "median_seconds": timing.median,
            "auc": mislabel_auc(timing.output, problem.flipped),
            "found_at_10pct": found_at(timing.output, problem.flipped, 0.1),
            "pearson_vs_exact": score_correlation(timing.output, exact)["pearson"],
        }
    return {"spec": vars(spec), "problem": problem.info, "methods": with_ratios(rows, "auc", 0.002)}


def found_at(suspicion: np.ndarray, flipped: np.ndarray, fraction: float) -> float:
    """Share of the flipped labels among the top ``fraction`` most self-influential points."""
    top = np.argsort(-suspicion, kind="stable")[: round(fraction * len(suspicion))]
    return float(flipped[top].sum() / flipped.sum())


def with_ratios(rows: dict[str, dict], quality: str, tolerance: float) -> dict[str, dict]:
    """Add, for peers, the time ratio to their fastif counterpart and to the fastest fastif method whose
    ``quality`` (LDS or AUC) is at least theirs minus ``tolerance``: "fastest at equal or better quality"."""
    fastif = {name: row for name, row in rows.items() if row["library"] == "fastif"}
    for row in rows.values():
        base = rows.get(row["counterpart"])
        peer = row["library"] != "fastif"
        row["ratio_to_counterpart"] = row["median_seconds"] / base["median_seconds"] if base and peer else None
        good = [name for name, r in fastif.items() if r[quality] >= row[quality] - tolerance]
        best = min(good, key=lambda name: fastif[name]["median_seconds"]) if good and peer else None
        row["fastest_fastif_at_equal_quality"] = best
        row["ratio_to_fastest"] = row["median_seconds"] / fastif[best]["median_seconds"] if best else None
    return rows


RATIO_HEADERS = [
    "method",
    "time (s)",
    "fastif counterpart",
    "peer / counterpart",
    "fastest fastif at ≥ quality",
    "peer / that",
]


def ratio_cells(name: str, row: dict[str, Any]) -> list[Any]:
    """The method, its median time, and (for peers) the two time ratios with the fastif methods they are set against."""
    peer = row["library"] != "fastif"
    return [
        name,
        row["median_seconds"],
        row["counterpart"] if peer else "",
        row["ratio_to_counterpart"],
        row["fastest_fastif_at_equal_quality"] or ("none" if peer else ""),
        row["ratio_to_fastest"],
    ]


def table_a(name: str, result: dict[str, Any]) -> str:
    """Markdown table of task (a) for one model."""
    headers = [*RATIO_HEADERS, "LOO Pearson", "LOO Spearman", "LDS", "Pearson vs Exact"]
    rows = [
        [*ratio_cells(m, r), r["loo_pearson"], r["loo_spearman"], r["lds"], r["pearson_vs_exact"]]
        for m, r in result["methods"].items()
    ]
    return f"### (a) {name}\n\n" + markdown_table(headers, rows)


def table_b(name: str, result: dict[str, Any]) -> str:
    """Markdown table of task (b) for one model."""
    headers = [*RATIO_HEADERS, "mislabel AUC", "found in top 10%", "Pearson vs Exact"]
    rows = [
        [*ratio_cells(m, r), r["auc"], r["found_at_10pct"], r["pearson_vs_exact"]] for m, r in result["methods"].items()
    ]
    return f"### (b) {name}, 10% flipped labels\n\n" + markdown_table(headers, rows)


def log(message: str) -> None:
    """Progress on stdout, flushed (runs take a while on a shared machine)."""
    print(message, flush=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options; the defaults are the committed run."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["logreg", "mlp"], choices=["logreg", "mlp"])
    parser.add_argument("--tasks", nargs="+", default=["a", "b"], choices=["a", "b"])
    parser.add_argument("--n-train", type=int, default=1000)
    parser.add_argument("--n-test", type=int, default=50)
    parser.add_argument("--loo", type=int, default=100, help="training points retrained away for LOO")
    parser.add_argument("--lds", type=int, default=50, help="random 50%% subsets retrained for LDS")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (2 oversubscribe a loaded machine)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--name", default="digits", help="results/<name>.json and .md")
    return parser.parse_args(argv)


DAMPING = {"logreg": 0.0, "mlp": 1e-3}


def main(argv: list[str] | None = None) -> None:
    """Run the selected tasks and models, then write the JSON and markdown results."""
    args = parse_args(argv)
    set_threads(args.threads)
    warnings.filterwarnings("ignore")
    methods = ordered(all_methods(Settings()))
    started, load_before = uptime(), load_average()
    log(f"{started}; methods: {[m.name for m in methods]}")
    results: dict[str, Any] = {}
    tables = []
    for kind in args.models:
        spec = DigitsSpec(kind, args.n_train, args.n_test, damping=DAMPING[kind], seed=args.seed)
        if "a" in args.tasks:
            results[f"a_{kind}"] = task_a(spec, methods, args)
            tables.append(table_a(kind, results[f"a_{kind}"]))
        if "b" in args.tasks:
            flipped = DigitsSpec(
                kind, args.n_train, args.n_test, damping=DAMPING[kind], flip_fraction=0.1, seed=args.seed
            )
            results[f"b_{kind}"] = task_b(flipped, methods, args)
            tables.append(table_b(kind, results[f"b_{kind}"]))
    payload = {
        **provenance("benchmarks.peers.digits_bench", argv, started, load_before),
        "settings": vars(Settings()),
        "args": vars(args),
        "results": results,
    }
    header = (
        f"# Digits: fastif vs peers\n\nCommand: `{payload['command']}`\n\n"
        f"Load: before `{started}`, after `{payload['uptime_after']}` (2 shared CPU cores).\n\n"
    )
    paths = write_results(args.name, payload, header + "\n\n".join(tables) + "\n")
    log(f"wrote {paths[0]} and {paths[1]}")


if __name__ == "__main__":
    main()
