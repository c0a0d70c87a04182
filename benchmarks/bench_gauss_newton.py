"""Gauss-Newton vs the damped Hessian on the digits MLP (issue 12), by leave-one-out and LDS.

The 64-32-10 tanh MLP of ``benchmarks/peers/digits_problems.py`` (float64, mean CE + (l2 / 2)·‖θ‖², trained to a
gradient norm below 1e-12). Each curvature is solved exactly (dense, eigendecomposition) so only the matrix differs:
the loss Hessian with the peers bench's damping 1e-3, and the Gauss-Newton matrix (PSD by construction) with no
damping and with the same 1e-3. Quality: LOO Pearson/Spearman over ``--loo`` random training points
retrained away (chord Newton, exact local retraining), mean LDS over ``--lds`` random 50% subsets retrained by
L-BFGS, and the Pearson of each score matrix with the damped Hessian's.

    python -m benchmarks.bench_gauss_newton --loo 100 --lds 20 --output benchmarks/results/gauss_newton.json
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from typing import Any

import numpy as np
import torch

from fastif import Exact
from fastif.evaluation import (
    lds_from_retraining,
    leave_one_out_changes,
    loo_correlation,
    predicted_loo_changes,
    score_correlation,
)
from fastif.files import atomic_write_json
from fastif.grads import dataset_grads
from fastif.hvp import Hessian, HessianKind

from .peers.digits_problems import DigitsProblem, DigitsSpec, build_problem

CURVATURES: dict[str, tuple[HessianKind, float]] = {
    "hessian, damping 1e-3": ("hessian", 1e-3),
    "gauss-newton, damping 0": ("gauss-newton", 0.0),
    "gauss-newton, damping 1e-3": ("gauss-newton", 1e-3),
}
REFERENCE = "hessian, damping 1e-3"


def curvature_scores(problem: DigitsProblem, kind: HessianKind, damping: float) -> tuple[np.ndarray, dict]:
    """Scores [n_test, n_train] with ``(H_kind + damping·I)⁻¹``, plus the solve's eigenvalue range and time."""
    adapter = problem.adapter()
    flat = adapter.flat_params()
    start = time.perf_counter()
    solver = Exact(damping=damping).fit(Hessian(adapter, problem.train, flat, batch_size=250, kind=kind))
    s_test = solver.solve(dataset_grads(adapter, flat, problem.test)).x
    scores = (s_test @ dataset_grads(adapter, flat, problem.train).T).numpy()
    shifted = solver.eigenvalues
    info = {
        "seconds": time.perf_counter() - start,
        "min_eigenvalue": float(shifted.min()) - damping,
        "max_eigenvalue": float(shifted.max()) - damping,
    }
    return scores, info


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the comparison and write the results JSON (with the command line and load averages)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-train", type=int, default=1000)
    parser.add_argument("--n-test", type=int, default=50)
    parser.add_argument("--loo", type=int, default=100, help="random training points retrained away for LOO")
    parser.add_argument("--lds", type=int, default=20, help="random 50%% subsets retrained for LDS")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--output", default="benchmarks/results/gauss_newton.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    load_before, started = list(os.getloadavg()), time.perf_counter()
    problem = build_problem(DigitsSpec("mlp", args.n_train, args.n_test, damping=1e-3, seed=args.seed))
    scores, solves = {}, {}
    for name, (kind, damping) in CURVATURES.items():
        scores[name], solves[name] = curvature_scores(problem, kind, damping)
        print(f"{name}: {solves[name]}", flush=True)
    n = len(problem.y_train)
    removed = np.sort(np.random.default_rng(args.seed).choice(n, size=args.loo, replace=False))
    changes = leave_one_out_changes(problem.retrain, problem.test_losses, n, removed, problem.model)
    margins: dict[tuple[int, ...], np.ndarray] = {}

    def retrain_subset(kept: np.ndarray) -> tuple[int, ...]:
        key = tuple(int(i) for i in kept)
        if key not in margins:
            margins[key] = problem.test_margins(problem.retrain_subset(kept))
        return key

    results = {}
    for name, matrix in scores.items():
        loo = loo_correlation(predicted_loo_changes(matrix, removed, n), changes)
        lds, _ = lds_from_retraining(retrain_subset, margins.__getitem__, matrix, args.lds, seed=args.seed)
        results[name] = {
            "loo_pearson": loo["pearson"],
            "loo_spearman": loo["spearman"],
            "lds": lds,
            "pearson_vs_damped_hessian": score_correlation(matrix, scores[REFERENCE])["pearson"],
            **solves[name],
        }
        print(f"{name}: {results[name]}", flush=True)
    payload = {
        "command": " ".join(["python -m benchmarks.bench_gauss_newton", *(argv if argv is not None else sys.argv[1:])]),
        "problem": {"model": "64-32-10 tanh MLP, float64", "n_train": n, "n_test": args.n_test, "l2": 1e-3},
        "problem_info": problem.info,
        "loo_points": args.loo,
        "lds_subsets": args.lds,
        "results": results,
        "wall_seconds": time.perf_counter() - started,
        "load_average_before": load_before,
        "load_average_after": list(os.getloadavg()),
        "machine": {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "platform": platform.platform()},
        "torch": torch.__version__,
    }
    atomic_write_json(args.output, payload)
    return payload


if __name__ == "__main__":
    main()
