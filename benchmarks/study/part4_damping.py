"""Study part 4: damping. How the scores move with the damping λ of (H + λI)⁻¹, towards gradient similarity.

For each λ on a log grid (with FastIF's effective 50-5,000):

* **exact_λ**: (H + λI)⁻¹ ∇L(test) on the full training Hessian by Lanczos with full reorthogonalisation (one
  run serves every λ: it is CG for each shift), with its relative residual; a damping below −λ_min(H) leaves
  H + λI indefinite (no influence defined).
* **lissa_λ**: FastIF's fast s_test (B = 1, J, one chain, automatic contraction-safe scale for that λ).
* **identity**: gradient similarity (H replaced by I), the limit of λ → ∞ up to a factor 1/λ.
* **original**: FastIF's original configuration with its MNLI setting damp = 5e-3, scale = 1e4 (λ = 50):
  one LiSSA chain, B = 128, J = 1000.

Ground truth = exact influence at the smallest damping of the grid whose solve converged and whose H + λI is
positive definite. Correlations (Pearson, Spearman, top-10 overlap) are over all N training points, averaged over
the test points.

    python benchmarks/study/part4_damping.py
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch

from fastif.errors import SolverError
from fastif.evaluation import score_correlation
from fastif.scores import ScoreConfig
from fastif.solvers import CG, LiSSA, LiSSAConfig

try:
    from common import (
        RESULTS,
        environment,
        hessian_extremes,
        lanczos_solves,
        load_setup,
        pick_test_points,
        timed,
        write_results,
    )
except ImportError:  # imported as benchmarks.study.part4_damping
    from .common import (
        RESULTS,
        environment,
        hessian_extremes,
        lanczos_solves,
        load_setup,
        pick_test_points,
        timed,
        write_results,
    )

DEFAULT_DAMPINGS = [1e-4, 1e-2, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0, 3.0, 10.0, 50.0, 500.0, 5000.0]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options (defaults = the committed run)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-train", type=int, default=4000)
    parser.add_argument("--dampings", type=float, nargs="+", default=DEFAULT_DAMPINGS)
    parser.add_argument("--correct", type=int, default=2)
    parser.add_argument("--wrong", type=int, default=2)
    parser.add_argument("--lanczos", type=int, default=120, help="Lanczos iterations (full-Hessian HVPs)")
    parser.add_argument("--residual-tolerance", type=float, default=1e-3, help="converged if residual below")
    parser.add_argument("--check-damping", type=float, default=1.0, help="compare Lanczos with fastif's CG here")
    parser.add_argument("--lissa-depth", type=int, default=1000)
    parser.add_argument(
        "--lissa-dampings", type=float, nargs="+", default=[0.1, 0.3, 1.0, 10.0, 50.0, 5000.0], help="LiSSA runs here"
    )
    parser.add_argument("--original-depth", type=int, default=1000)
    parser.add_argument("--original-batch", type=int, default=128)
    parser.add_argument("--top", type=int, default=10, help="top-n overlap")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=3)
    parser.add_argument("--output", type=Path, default=RESULTS / "part4_damping.json")
    return parser.parse_args(argv)


def _agreement(a: torch.Tensor, b: torch.Tensor, top: int) -> dict[str, float]:
    """Mean over rows of Pearson / Spearman, and of the overlap of the top-``top`` helpful and harmful sets."""
    corr = score_correlation(a, b, per_row=True)
    overlap = []
    for sign in (1.0, -1.0):
        first = (sign * a).topk(top, dim=1).indices
        second = (sign * b).topk(top, dim=1).indices
        overlap += [len(set(x.tolist()) & set(y.tolist())) / top for x, y in zip(first, second, strict=True)]
    return {"pearson": corr["pearson"], "spearman": corr["spearman"], "top_overlap": statistics.fmean(overlap)}


def run(args: argparse.Namespace, setup: Any = None) -> dict[str, Any]:
    """Sweep the damping; write the results JSON and PNG."""
    torch.set_num_threads(args.threads)
    env = environment()
    setup = setup or load_setup(args.n_train)
    tests, correct = pick_test_points(setup, args.correct, args.wrong, args.seed)
    test_points = setup.test_subset(tests)
    scoring = setup.facade(score=ScoreConfig(method="grad"))
    vectors = scoring.test_grads(test_points)
    hessian = setup.hessian()
    dampings = sorted(set(args.dampings) | {args.check_damping})

    spectrum, spectrum_seconds = timed(lambda: hessian_extremes(hessian, tolerance=1e-2))
    print(f"spectrum {spectrum} in {spectrum_seconds:.0f}s", flush=True)
    exact, lanczos_seconds = timed(lambda: lanczos_solves(hessian, vectors, dampings, args.lanczos))
    print(f"lanczos {lanczos_seconds:.0f}s", flush=True)
    for damping in dampings:  # definiteness from the whole spectrum, not only the Krylov space
        exact[damping]["positive_definite"] = [
            p and damping + spectrum["min"] > 0 for p in exact[damping]["positive_definite"]
        ]
    cg = setup.facade(CG(damping=args.check_damping, tolerance=1e-6, max_iterations=args.lanczos))
    cg_result, cg_seconds = timed(lambda: cg.solve(test_points))
    reference = exact[args.check_damping]["x"]
    cg_check = float(((cg_result.x - reference).norm(dim=1) / reference.norm(dim=1)).max())

    lissa: dict[float, torch.Tensor] = {}
    lissa_info: dict[float, dict[str, Any]] = {}
    for damping in sorted(set(args.lissa_dampings) & set(dampings)):
        solver = LiSSA(LiSSAConfig(damping=damping, depth=args.lissa_depth, batch_size=1, seed=args.seed))
        try:
            (result, seconds) = timed(lambda s=solver: setup.facade(s).solve(test_points))
        except SolverError as error:
            lissa_info[damping] = {"diverged": str(error)}
            continue
        lissa[damping] = result.x
        lissa_info[damping] = {
            "seconds": seconds,
            "scale": result.info["scale"],
            "converged": result.info["converged"],
            "late_growth": result.info["late_growth"],
        }
        print(f"lissa λ={damping:g}: {seconds:.1f}s", flush=True)
    print("lissa done", flush=True)
    original_config = LiSSAConfig.from_fastif(
        5e-3, 1e4, depth=args.original_depth, batch_size=args.original_batch, seed=args.seed
    )
    original, original_seconds = timed(lambda: setup.facade(LiSSA(original_config)).solve(test_points).x)

    keys = [("exact", d) for d in dampings] + [("lissa", d) for d in lissa] + [("identity", 0.0), ("original", 50.0)]
    stack = torch.cat([exact[d]["x"] for d in dampings] + [lissa[d] for d in lissa] + [vectors, original])
    all_scores, score_seconds = timed(lambda: scoring.score_s_test(stack))
    k = len(tests)
    scores = {key: all_scores[i * k : (i + 1) * k] for i, key in enumerate(keys)}

    valid = [
        d
        for d in dampings
        if all(exact[d]["positive_definite"]) and max(exact[d]["relative_residual"]) < args.residual_tolerance
    ]
    truth_damping = min(valid)
    truth = scores["exact", truth_damping]
    identity = scores["identity", 0.0]
    rows = []
    for damping in dampings:
        row: dict[str, Any] = {
            "damping": damping,
            "positive_definite": all(exact[damping]["positive_definite"]),
            "exact_residual_max": max(exact[damping]["relative_residual"]),
            "exact_converged": damping in valid,
            "exact_vs_truth": _agreement(scores["exact", damping], truth, args.top),
            "exact_vs_identity": _agreement(scores["exact", damping], identity, args.top),
            "exact_vs_original": _agreement(scores["exact", damping], scores["original", 50.0], args.top),
            "lissa": lissa_info.get(damping, {"skipped": True}),
        }
        if damping in lissa:
            fast = scores["lissa", damping]
            row["lissa_vs_exact"] = _agreement(fast, scores["exact", damping], args.top)
            row["lissa_vs_truth"] = _agreement(fast, truth, args.top)
            row["lissa_vs_identity"] = _agreement(fast, identity, args.top)
            row["lissa_vs_original"] = _agreement(fast, scores["original", 50.0], args.top)
        rows.append(row)
    results = {
        "part": "4 damping",
        "environment": env,
        "args": {key: str(v) if isinstance(v, Path) else v for key, v in vars(args).items()},
        "setup": {key: v for key, v in setup.info.items() if key != "parameter_names"},
        "test_points": tests,
        "test_correct": correct,
        "ground_truth": f"exact (Lanczos) influence at damping {truth_damping:g}",
        "truth_damping": truth_damping,
        "lanczos_seconds": lanczos_seconds,
        "hessian_spectrum": {**spectrum, "seconds": spectrum_seconds, "method": "scipy eigsh (Lanczos), tol 1e-2"},
        "ritz_extremes": _ritz(exact),
        "cg_check": {"damping": args.check_damping, "max_relative_difference": cg_check, "seconds": cg_seconds},
        "original": {
            "config": "LiSSA B=128, J=1000, R=1, FastIF damp=5e-3, scale=1e4 (λ=50)",
            "seconds": original_seconds,
            "vs_truth": _agreement(scores["original", 50.0], truth, args.top),
            "vs_identity": _agreement(scores["original", 50.0], identity, args.top),
        },
        "identity_vs_truth": _agreement(identity, truth, args.top),
        "score_seconds": score_seconds,
        "rows": rows,
    }
    write_results(args.output, results)
    plot(results, args.output.with_suffix(".png"))
    return results


def _ritz(exact: dict[float, dict[str, Any]]) -> dict[str, Any]:
    """The dampings at which H + λI stopped being positive definite on the Krylov space, per test vector."""
    return {str(d): v["positive_definite"] for d, v in exact.items()}


def plot(results: dict[str, Any], path: Path) -> None:
    """Spearman (solid) and top-10 overlap (dotted) vs damping for each comparison; FastIF's range shaded."""
    rows = results["rows"]
    fig, ax = plt.subplots(figsize=(8.5, 5))
    series = [
        ("exact_vs_truth", "exact_λ vs ground truth", "tab:blue"),
        ("exact_vs_identity", "exact_λ vs gradient similarity", "tab:orange"),
        ("lissa_vs_exact", "LiSSA B=1 vs exact_λ", "tab:green"),
        ("lissa_vs_truth", "LiSSA B=1 vs ground truth", "tab:red"),
        ("exact_vs_original", "exact_λ vs original (λ=50)", "tab:purple"),
    ]
    for key, label, colour in series:
        cells = [r for r in rows if key in r]
        x = [r["damping"] for r in cells]
        ax.plot(x, [r[key]["spearman"] for r in cells], "-o", color=colour, label=label)
        ax.plot(x, [r[key]["top_overlap"] for r in cells], ":", color=colour)
    ax.axvspan(50, 5000, color="grey", alpha=0.15, label="FastIF's effective damping")
    bad = [r["damping"] for r in rows if not r["positive_definite"]]
    if bad:
        ax.axvline(max(bad), color="black", ls="--", lw=0.8, label="H+λI indefinite at and below")
    ax.set(
        xscale="log",
        xlabel="damping λ (absolute)",
        ylabel="Spearman (solid) / top-10 overlap (dotted)",
        title=f"{results['ground_truth']}; N={results['setup']['n_train']}",
    )
    ax.legend(fontsize=8, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    run(parse_args())
