"""Task (c): time to the top-10 helpful and harmful training points for 10 test points over 8,000 MNLI pairs.

Model: the embedded MiniLM-L6 NLI classifier (``train_nli_classifier(NLITrainConfig())``, cached); influence over
the pooler + classifier (148,995 parameters); damping ``NLI_DAMPING`` on top of the training L2 (the Hessian has
negative eigenvalues, docs/nli-model.md). Every method runs end to end from the trained model, one after another in
one process:
fastif's FastIF pipeline (FAISS kNN candidates, batch-1 LiSSA s_test, JVP scores) on the whole model and on its
frozen-bottom cache (one no-grad forward per example, then everything on the pooler + classifier), fastif's full
scans (LiSSA on the whole model; CG on the cached head), kronfluence's EK-FAC over all 8,000 points, and captum /
dattri on a random subset of ``--subset`` training points with their time extrapolated linearly to 8,000 (only the
stages that grow with the number of points scored). Quality is measured against exact influence (CG on the full
Hessian, every training gradient), computed first and not timed.

    python -m benchmarks.peers.nli_bench
"""

from __future__ import annotations

import os

os.environ.setdefault("TQDM_DISABLE", "1")  # dattri's progress bars; must precede every tqdm import

import argparse
import time
import warnings
from typing import Any

import numpy as np
from scipy import stats

from fastif.evaluation import topm_recall
from fastif.recipes.nli import NLI_DAMPING

from .common import load_average, markdown_table, provenance, set_threads, uptime, write_results
from .nli_methods import RUNNERS, Found, NLISettings
from .nli_setup import NLIProblem, NLISpec, build_problem, check_head_equivalence, exact_reference


def log(message: str) -> None:
    """Progress on stdout, flushed."""
    print(message, flush=True)


def overlap(found: np.ndarray, truth: np.ndarray) -> float:
    """Mean share of each test point's true top-k that the method's top-k contains."""
    return float(np.mean([len(set(f) & set(t)) / len(t) for f, t in zip(found, truth, strict=True)]))


def true_top(scores: np.ndarray, pools: list[np.ndarray], k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k helpful and harmful training indices per test point, among each test point's ``pools`` entry."""
    helpful = np.stack([pool[np.argsort(-scores[i, pool], kind="stable")[:k]] for i, pool in enumerate(pools)])
    harmful = np.stack([pool[np.argsort(scores[i, pool], kind="stable")[:k]] for i, pool in enumerate(pools)])
    return helpful, harmful


def quality(found: Found, exact: np.ndarray, k: int) -> dict[str, Any]:
    """Top-k recall against exact influence, over all points and over the points the method scored, and Spearman."""
    everything = [np.arange(exact.shape[1])] * exact.shape[0]
    all_helpful, all_harmful = true_top(exact, everything, k)
    own_helpful, own_harmful = true_top(exact, found.scored, k)
    spearman = [
        stats.spearmanr(s, exact[i, idx])[0] for i, (idx, s) in enumerate(zip(found.scored, found.scores, strict=True))
    ]
    whole = found.fraction == 1  # a subset run cannot find the top-10 of all points: report it among its own
    return {
        "recall_helpful": overlap(found.helpful, all_helpful) if whole else None,
        "recall_harmful": overlap(found.harmful, all_harmful) if whole else None,
        "recall_helpful_among_scored": overlap(found.helpful, own_helpful),
        "recall_harmful_among_scored": overlap(found.harmful, own_harmful),
        "spearman_vs_exact_on_scored": float(np.mean(spearman)),
        "scored_per_test": int(np.mean([len(idx) for idx in found.scored])),
    }


def run_methods(problem: NLIProblem, settings: NLISettings, names: list[str]) -> dict[str, Found]:
    """Run the methods one after another (fastif and peers alternating), logging stages and load."""
    results = {}
    for name in names:
        log(f"{name}: starting, load {load_average()}")
        found = RUNNERS[name](problem, settings)
        stages = ", ".join(f"{stage} {seconds:.1f}s" for stage, seconds in found.stages.items())
        total = f"total {found.seconds:.1f}s, for all points {found.extrapolated_seconds:.1f}s"
        log(f"  {stages}; {total}; load {load_average()}")
        results[name] = found
    return results


def rows_for(results: dict[str, Found], exact: np.ndarray, settings: NLISettings) -> dict:
    """Per-method JSON rows: stages, measured and 8,000-point times, ratio to fastif kNN, quality."""
    base = results.get("fastif kNN + LiSSA + JVP")
    scan = results.get("fastif frozen path + full scan + CG")
    rows = {}
    for name, found in results.items():
        rows[name] = {
            "stages": found.stages,
            "scaling_stages": list(found.scaling_stages),
            "fraction_scored": found.fraction,
            "measured_seconds": found.seconds,
            "seconds_for_all_points": found.extrapolated_seconds,
            "extrapolated": found.fraction < 1,
            "ratio_to_fastif_knn": found.extrapolated_seconds / base.extrapolated_seconds if base else None,
            "ratio_to_fastif_head_scan": found.extrapolated_seconds / scan.extrapolated_seconds if scan else None,
            **quality(found, exact, settings.k),
        }
    if base is not None:
        candidates = np.stack(base.scored)
        rows["fastif kNN + LiSSA + JVP"]["candidate_recall_helpful"] = float(
            topm_recall(exact, candidates, settings.k).mean()
        )
        rows["fastif kNN + LiSSA + JVP"]["candidate_recall_harmful"] = float(
            topm_recall(exact, candidates, settings.k, sign="harmful").mean()
        )
        rows["fastif kNN + LiSSA + JVP"]["chance_candidate_recall"] = settings.candidates / exact.shape[1]
    return rows


def table(rows: dict[str, dict]) -> str:
    """The main markdown table of task (c)."""
    headers = [
        "method",
        "points scored per test",
        "measured (s)",
        "time for all 8,000 (s)",
        "÷ fastif kNN",
        "÷ fastif head scan",
        "top-10 helpful found",
        "top-10 harmful found",
        "helpful, among scored",
        "harmful, among scored",
        "Spearman vs exact (scored)",
    ]
    body = [
        [
            name,
            r["scored_per_test"],
            r["measured_seconds"],
            f"{r['seconds_for_all_points']:.4g}" + (" (extrapolated)" if r["extrapolated"] else ""),
            r["ratio_to_fastif_knn"],
            r["ratio_to_fastif_head_scan"],
            r["recall_helpful"],
            r["recall_harmful"],
            r["recall_helpful_among_scored"],
            r["recall_harmful_among_scored"],
            r["spearman_vs_exact_on_scored"],
        ]
        for name, r in rows.items()
    ]
    return markdown_table(headers, body)


def stage_table(rows: dict[str, dict]) -> str:
    """Per-stage wall times (measured, before extrapolation)."""
    body = [[name, stage, seconds] for name, r in rows.items() for stage, seconds in r["stages"].items()]
    return markdown_table(["method", "stage", "seconds (measured)"], body)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options; the defaults are the committed run."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n-train", type=int, default=8000)
    parser.add_argument("--n-test", type=int, default=10)
    parser.add_argument("--damping", type=float, default=NLI_DAMPING)
    parser.add_argument("--candidates", type=int, default=100)
    parser.add_argument("--lissa-depth", type=int, default=300)
    parser.add_argument("--subset", type=int, default=256, help="training points captum / dattri score")
    parser.add_argument("--hessian-pool", type=int, default=128, help="training points in the peers' Hessian batch")
    parser.add_argument("--methods", nargs="+", default=list(RUNNERS), choices=list(RUNNERS))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--name", default="nli")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    """Build the problem, run every method, compute the exact reference, write JSON and markdown."""
    args = parse_args(argv)
    set_threads(args.threads)
    warnings.filterwarnings("ignore")
    spec = NLISpec(n_train=args.n_train, n_test=args.n_test, damping=args.damping)
    settings = NLISettings(
        candidates=args.candidates, lissa_depth=args.lissa_depth, subset=args.subset, hessian_pool=args.hessian_pool
    )
    started, load_before = uptime(), load_average()
    log(started)
    problem = build_problem(spec)
    equivalence = check_head_equivalence(problem)
    log(f"model {problem.info['model_path']}; head vs full-model gradients: relative difference {equivalence:.2e}")
    start = time.perf_counter()
    reference = exact_reference(problem)  # first: it fails fast if H + damping·I is not positive definite
    reference_seconds = time.perf_counter() - start
    log(f"exact reference (not timed against the methods): {reference_seconds:.1f}s, CG {reference['cg']}")
    results = run_methods(problem, settings, args.methods)
    rows = rows_for(results, reference["scores"], settings)
    payload = {
        **provenance("benchmarks.peers.nli_bench", argv, started, load_before),
        "spec": vars(spec),
        "settings": vars(settings),
        "problem": problem.info,
        "head_equivalence_relative_difference": equivalence,
        "reference": {"seconds": reference_seconds, "cg": reference["cg"]},
        "methods": rows,
        "top10": {name: {"helpful": f.helpful, "harmful": f.harmful} for name, f in results.items()},
        "train_ids": problem.train_ids,
    }
    text = (
        f"# MiniLM NLI: time to the top-10 helpful and harmful training points\n\nCommand: `{payload['command']}`\n\n"
        f"Load: before `{started}`, after `{payload['uptime_after']}` (2 shared CPU cores, torch threads "
        f"{args.threads}).\n\n{table(rows)}\n\nStages:\n\n{stage_table(rows)}\n"
    )
    paths = write_results(args.name, payload, text)
    log(f"wrote {paths[0]} and {paths[1]}")


if __name__ == "__main__":
    main()
