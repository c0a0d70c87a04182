"""fastif's K-FAC / EK-FAC against kronfluence's EK-FAC on the digits problems, and PCG's iterations against CG's.

Same model, damping and Fisher on both sides: the trained digits models of ``digits_problems`` (float64), the true
Fisher (labels drawn from the model; each library draws its own), and the absolute shift ``l2 + damping`` added to
every eigenvalue (fastif: ``damping`` plus the adapter's L2 term per block; kronfluence: ``damping_factor``).
Methods run round-robin for ``--repeats`` rounds; times are factors plus scores of all ``n_test x n_train`` pairs.
Quality is the LDS (dattri's protocol: ``--lds`` random 50% subsets, each retrained) and the Pearson correlation
with fastif's Exact scores. PCG (EK-FAC preconditioner) and CG solve the same test gradients to the same relative
residual; the iteration counts are reported.

With ``--nli-train N``: the MiniLM NLI classifier of ``nli_setup`` (pooler + classifier, its damping) on its first N
training pairs; fastif's EK-FAC on the frozen path (one no-grad forward of the bottom, then everything on the head)
against kronfluence's EK-FAC (``nli_methods``), both timed from the trained model to every pair's score; quality is
the recall of the exact top-10 helpful and harmful points (exact: CG to relative residual 1e-8, untimed).

    python -m benchmarks.peers.kfac_bench --repeats 3
    python -m benchmarks.peers.kfac_bench --models --nli-train 2000 --name kfac_nli
"""

from __future__ import annotations

import os

os.environ.setdefault("TQDM_DISABLE", "1")  # kronfluence's progress bars; must precede every tqdm import

import argparse
import time
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import Tensor

from fastif import CG, Exact, Hessian, Influence, ScoreConfig, Solver
from fastif.evaluation import score_correlation
from fastif.solvers.kfac import EKFAC, KFAC, PCG, EKFACConfig

from .common import (
    interleaved,
    load_average,
    markdown_table,
    provenance,
    set_threads,
    uptime,
    write_results,
)
from .digits_bench import LDSCache
from .digits_problems import DigitsProblem, DigitsSpec, build_problem
from .methods import Settings, kronfluence_method
from .nli_bench import quality as nli_quality
from .nli_methods import Found, NLISettings, full_rows, kronfluence_ekfac
from .nli_setup import NLIProblem, NLISpec
from .nli_setup import build_problem as build_nli_problem

DAMPING = {"logreg": 0.0, "mlp": 1e-3}


def fastif_scores(solver: Solver, problem: DigitsProblem) -> np.ndarray:
    """Factors (one pass, or two for EK-FAC, over the whole set in one batch) and every pair's score."""
    n = len(problem.y_train)
    score = ScoreConfig(method="grad", batch_size=n, chunk_size=n)
    return Influence(problem.adapter(), problem.train, solver, score, n).scores(problem.test).numpy()


def methods(problem: DigitsProblem) -> dict[str, Callable[[], np.ndarray]]:
    """The timed methods, in round-robin order."""
    damping = problem.spec.damping
    peer = kronfluence_method(Settings())
    fisher = {"damping": damping, "fisher": "true", "likelihood": "categorical"}
    return {
        "fastif EK-FAC": lambda: fastif_scores(EKFAC(**fisher), problem),
        "kronfluence EK-FAC": lambda: peer.scores(problem),
        "fastif K-FAC": lambda: fastif_scores(KFAC(**fisher), problem),
    }


def quality(spec: DigitsSpec, args: argparse.Namespace) -> dict[str, Any]:
    """Interleaved timings, then LDS and agreement with Exact for every method on one digits model."""
    problem = build_problem(spec)
    log(f"{spec.kind}: P={problem.num_params}, {problem.info}")
    timings = interleaved(methods(problem), args.repeats, log)
    exact = fastif_scores(Exact(damping=spec.damping), problem)
    lds = LDSCache(problem, args.lds, args.seed)
    rows = {"fastif Exact (reference, untimed)": {"lds": lds.lds(exact), "pearson_vs_exact": 1.0}}
    for name, timing in timings.items():
        rows[name] = {
            "seconds": timing.seconds,
            "median_seconds": timing.median,
            "lds": lds.lds(timing.output),
            "pearson_vs_exact": score_correlation(timing.output, exact)["pearson"],
        }
    fisher = {"damping": spec.damping, "fisher": "true", "likelihood": "categorical"}
    spread = [
        score_correlation(fastif_scores(EKFAC(**fisher, seed=seed), problem), exact)["pearson"] for seed in range(1, 4)
    ]
    log(f"  fastif EK-FAC, Fisher seeds 1-3: Pearson vs Exact {[round(value, 4) for value in spread]}")
    ours, theirs = rows["fastif EK-FAC"], rows["kronfluence EK-FAC"]
    verdict = {
        "lds_gap": ours["lds"] - theirs["lds"],
        "quality_met": ours["lds"] >= theirs["lds"] - 0.01,
        "speedup": theirs["median_seconds"] / ours["median_seconds"],
        "speed_met": theirs["median_seconds"] >= 2 * ours["median_seconds"],
    }
    log(f"  {verdict}; LDS retraining {lds.seconds:.1f}s")
    return {
        "spec": vars(spec),
        "problem": problem.info,
        "lds_seconds": lds.seconds,
        "methods": rows,
        "fastif_ekfac_pearson_other_seeds": spread,
        **verdict,
    }


def iterations(spec: DigitsSpec, args: argparse.Namespace) -> dict[str, Any]:
    """CG and EK-FAC-preconditioned CG on the same test gradients to the same relative residual."""
    problem = build_problem(spec)
    influence = Influence(problem.adapter(), problem.train, CG(), hessian_batch_size=len(problem.y_train))
    vectors = influence.test_grads(problem.test)[: args.pcg_vectors]
    solvers = {
        "CG": CG(damping=spec.damping, max_iterations=args.max_iterations, tolerance=args.tolerance),
        "PCG (EK-FAC)": PCG(
            damping=spec.damping,
            max_iterations=args.max_iterations,
            tolerance=args.tolerance,
            preconditioner=EKFACConfig(damping=spec.damping),
        ),
    }
    return {"spec": vars(spec), **compare_iterations(solvers, influence.hessian, vectors, spec.kind)}


def compare_iterations(solvers: dict[str, Solver], hessian: Hessian, vectors: Tensor, label: str) -> dict[str, Any]:
    """Fit and run each solver (fit included in the time); iteration counts, their ratio and the answers' gap."""
    runs, answers = {}, {}
    for name, solver in solvers.items():
        start = time.perf_counter()
        result = solver.fit(hessian).solve(vectors)
        seconds = time.perf_counter() - start
        answers[name] = result.x
        runs[name] = {"iterations": result.info["iterations"], "converged": result.info["converged"]}
        runs[name]["seconds"] = seconds
        log(f"  {label} {name}: {result.info['iterations']} iterations, {seconds:.2f}s  load {load_average()}")
    difference = float((answers["PCG (EK-FAC)"] - answers["CG"]).norm() / answers["CG"].norm())
    ratio = runs["CG"]["iterations"] / runs["PCG (EK-FAC)"]["iterations"]
    return {"runs": runs, "relative_difference": difference, "ratio": ratio, "met": ratio >= 3}


def nli_fastif(problem: NLIProblem, settings: NLISettings) -> Found:
    """fastif EK-FAC from the trained model: the frozen bottom once, factors and every pair's score on the head."""
    found = Found("fastif EK-FAC")
    with found.stage("frozen bottom, factors (two passes on the head) and scores"):
        solver = EKFAC(damping=problem.spec.damping, fisher="true")
        score = ScoreConfig(method="grad", batch_size=256, chunk_size=256)
        influence = Influence(problem.adapter(), problem.train, solver, score, settings.batch_size)
        matrix = influence.scores(problem.test)
    found.scored, found.scores = full_rows(matrix, np.arange(len(problem.train)))
    return found.finish(settings.k)


def nli_exact(problem: NLIProblem) -> np.ndarray:
    """Exact scores [n_test, n_train] on the frozen path: CG on the full Hessian to relative residual 1e-8."""
    solver = CG(damping=problem.spec.damping, max_iterations=500, tolerance=1e-8)
    score = ScoreConfig(method="grad", batch_size=256, chunk_size=256)
    influence = Influence(problem.adapter(), problem.train, solver, score, len(problem.train))
    return influence.scores(problem.test).double().numpy()


def nli(args: argparse.Namespace) -> dict[str, Any]:
    """Interleaved fastif / kronfluence EK-FAC on MiniLM NLI (pooler + classifier), recall of the exact top-10."""
    problem = build_nli_problem(NLISpec(n_train=args.nli_train))
    settings = NLISettings()
    log(f"nli: {len(problem.train)} training pairs, {len(problem.test)} test pairs, shift {problem.shift}")
    exact = nli_exact(problem)
    runners = {
        "fastif EK-FAC": lambda: nli_fastif(problem, settings),
        "kronfluence EK-FAC": lambda: kronfluence_ekfac(problem, settings),
    }
    timings = interleaved(runners, args.repeats, log)
    rows = {}
    for name, timing in timings.items():
        found = timing.output
        measured = nli_quality(found, exact, settings.k)
        recall = (measured["recall_helpful"] + measured["recall_harmful"]) / 2
        rows[name] = {"seconds": timing.seconds, "median_seconds": timing.median, "stages": found.stages}
        rows[name].update(measured, recall=recall)
    ours, theirs = rows["fastif EK-FAC"], rows["kronfluence EK-FAC"]
    verdict = {
        "recall_gap": ours["recall"] - theirs["recall"],
        "quality_met": ours["recall"] >= theirs["recall"] - 0.01,
        "speedup": theirs["median_seconds"] / ours["median_seconds"],
        "speed_met": theirs["median_seconds"] >= 2 * ours["median_seconds"],
    }
    log(f"  {verdict}")
    return {"spec": vars(problem.spec), "methods": rows, **verdict}


def nli_table(result: dict[str, Any]) -> str:
    """Markdown table of the NLI comparison."""
    headers = ["method", "median time (s)", "top-10 helpful found", "top-10 harmful found", "Spearman vs exact"]
    rows = [
        [name, r["median_seconds"], r["recall_helpful"], r["recall_harmful"], r["spearman_vs_exact_on_scored"]]
        for name, r in result["methods"].items()
    ]
    verdict = (
        f"recall gap (fastif - kronfluence, mean of helpful and harmful) {result['recall_gap']:+.3f} (goal ≥ -0.01: "
        f"{'met' if result['quality_met'] else 'missed'}); speed-up {result['speedup']:.2f}x (goal ≥ 2: "
        f"{'met' if result['speed_met'] else 'missed'})"
    )
    return f"### MiniLM NLI, {result['spec']['n_train']} training pairs\n\n{markdown_table(headers, rows)}\n\n{verdict}"


def tables(results: dict[str, Any]) -> list[str]:
    """Markdown tables: quality and time per model, then PCG iterations."""
    out = []
    for kind, result in results["quality"].items():
        rows = [
            [name, row.get("median_seconds"), row["lds"], row["pearson_vs_exact"]]
            for name, row in result["methods"].items()
        ]
        verdict = (
            f"LDS gap (fastif - kronfluence) {result['lds_gap']:+.4f} (goal ≥ -0.01: "
            f"{'met' if result['quality_met'] else 'missed'}); speed-up {result['speedup']:.2f}x (goal ≥ 2: "
            f"{'met' if result['speed_met'] else 'missed'})"
        )
        table = markdown_table(["method", "median time (s)", "LDS", "Pearson vs Exact"], rows)
        out.append(f"### {kind}\n\n{table}\n\n{verdict}")
    rows = [
        [kind, r["runs"]["CG"]["iterations"], r["runs"]["PCG (EK-FAC)"]["iterations"], r["ratio"], r["met"]]
        for kind, r in results["iterations"].items()
    ]
    headers = ["model", "CG iterations", "PCG iterations", "CG / PCG", "≥ 3x"]
    if rows:
        out.append("### PCG vs CG, same relative residual\n\n" + markdown_table(headers, rows))
    if "nli" in results:
        out.append(nli_table(results["nli"]))
    return out


PROGRESS: list[str] = []  # every logged line (per-round times and load averages), saved with the results

NOTES = """Notes: both sides run the true Fisher, each drawing its own labels (fastif seeded per example, kronfluence
from torch's global generator, seeded once), so part of the gap between them is sampling noise; the
progress log and ``fastif_ekfac_pearson_other_seeds`` give fastif's Pearson vs Exact under three more Fisher seeds.
Times are end to end from the trained model: fastif's fit and scores through ``Influence``;
kronfluence's ``fit_all_factors`` and ``compute_pairwise_scores`` with its files in a temporary folder."""


def log(message: str) -> None:
    """Progress on stdout, flushed, and kept for the results file."""
    PROGRESS.append(message)
    print(message, flush=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options; the defaults are the committed run."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="*", default=["logreg", "mlp"], choices=["logreg", "mlp"])
    parser.add_argument("--nli-train", type=int, default=0, help="MiniLM NLI training pairs (0: skip NLI)")
    parser.add_argument("--n-train", type=int, default=1000)
    parser.add_argument("--n-test", type=int, default=50)
    parser.add_argument("--lds", type=int, default=50, help="random 50%% subsets retrained for LDS")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--pcg-vectors", type=int, default=10, help="test gradients solved by CG and PCG")
    parser.add_argument("--tolerance", type=float, default=1e-6, help="relative residual for CG and PCG")
    parser.add_argument("--max-iterations", type=int, default=2000)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--name", default="kfac", help="results/<name>.json and .md")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    """Run quality/time and iteration comparisons for the selected models; write JSON and markdown."""
    args = parse_args(argv)
    set_threads(args.threads)
    warnings.filterwarnings("ignore")
    torch.manual_seed(args.seed)  # kronfluence draws its true-Fisher labels from torch's global generator
    started, load_before = uptime(), load_average()
    log(started)
    results: dict[str, Any] = {"quality": {}, "iterations": {}}
    for kind in args.models:
        spec = DigitsSpec(kind, args.n_train, args.n_test, damping=DAMPING[kind], seed=args.seed)
        results["quality"][kind] = quality(spec, args)
        results["iterations"][kind] = iterations(spec, args)
    if args.nli_train:
        results["nli"] = nli(args)
    payload = {
        **provenance("benchmarks.peers.kfac_bench", argv, started, load_before),
        "args": vars(args),
        "results": results,
        "notes": NOTES,
        "progress": PROGRESS,
    }
    header = (
        f"# K-FAC / EK-FAC: fastif vs kronfluence, and PCG vs CG\n\nCommand: `{payload['command']}`\n\n"
        f"Load: before `{started}`, after `{payload['uptime_after']}` (2 shared CPU cores).\n\n"
    )
    paths = write_results(args.name, payload, header + "\n\n".join([*tables(results), NOTES]) + "\n")
    log(f"wrote {paths[0]} and {paths[1]}")


if __name__ == "__main__":
    main()
