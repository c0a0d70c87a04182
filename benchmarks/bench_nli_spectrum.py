"""The embedded NLI models' Hessian spectrum on the frozen head, and what it means for the damping (issue 18).

For each model (``--labels``: 3-class, 2-class), on the peers' task (c) set-up (``benchmarks/peers/nli_setup.py``):
the pooler + classifier's training Hessian over the first ``--n-train`` MNLI training pairs (the training L2
included), on the facade's frozen path; its largest and smallest eigenvalues by Lanczos (scipy ``eigsh``); then, per
damping in ``--dampings`` (default: 0.3, the recipe's value before the new model, and ``NLI_DAMPING``), CG at a tight
tolerance and LiSSA at its defaults (automatic mode) on the same ``--n-test`` test gradients (one solve of all rows
each): their times, iterations or attempts and LiSSA's error against CG, or the one-line error a solver stops with
when H + damping·I is not positive definite.

    python -m benchmarks.bench_nli_spectrum --output benchmarks/results/nli_spectrum.json
"""

from __future__ import annotations

import argparse
import sys
import time
from datetime import UTC, datetime
from typing import Any

import torch

from fastif import CG, Influence, LiSSA, ScoreConfig
from fastif.errors import SolverError
from fastif.files import atomic_write_json
from fastif.recipes.nli import NLI_DAMPING
from fastif.solvers import Solver
from fastif.telemetry import machine_info

from .peers.nli_setup import NLISpec, build_problem
from .study.common import hessian_extremes

FORMER_DAMPING = 0.3


def attempt(solver: Solver, vectors: torch.Tensor) -> dict[str, Any]:
    """One solve of all rows: its seconds and summary, or the error it stopped with (and after how long)."""
    start = time.perf_counter()
    try:
        result = solver.solve(vectors)
    except SolverError as error:
        return {"error": str(error), "seconds": round(time.perf_counter() - start, 1)}
    keep = ("iterations", "relative_residual", "residual_scope", "converged", "steps", "attempts", "scale")
    return {
        "x": result.x,
        "seconds": round(time.perf_counter() - start, 1),
        **{key: result.info[key] for key in keep if key in result.info},
    }


def solves(influence: Influence, vectors: torch.Tensor, damping: float, tolerance: float) -> dict[str, Any]:
    """CG and automatic LiSSA at ``damping`` on the facade's Hessian, and LiSSA's relative error against CG."""
    cg = attempt(CG(damping=damping, tolerance=tolerance, max_iterations=500).fit(influence.hessian), vectors)
    lissa = attempt(LiSSA(damping=damping).fit(influence.hessian), vectors)
    if "x" in cg and "x" in lissa:
        error = (lissa["x"] - cg["x"]).norm(dim=1) / cg["x"].norm(dim=1)
        lissa["relative_error_vs_cg_max"] = float(error.max())
    cg.pop("x", None)
    lissa.pop("x", None)
    return {"cg": cg, "lissa": lissa}


def one_model(num_labels: int, args: argparse.Namespace) -> dict[str, Any]:
    """Spectrum and solves for the ``num_labels``-class model."""
    problem = build_problem(NLISpec(n_train=args.n_train, n_test=args.n_test, num_labels=num_labels))
    score = ScoreConfig(method="grad", batch_size=512, chunk_size=512)
    influence = Influence(problem.adapter(), problem.train, CG(damping=NLI_DAMPING), score, hessian_batch_size=1024)
    start = time.perf_counter()
    influence.cached_training_pass()
    vectors = influence.test_grads(problem.test)
    influence.fit()
    row: dict[str, Any] = {
        "num_labels": num_labels,
        "validation_accuracy": problem.info["metrics"]["validation_accuracy"],
        "num_params": influence.work_adapter.num_params,
        "n_train": len(problem.train),
        "l2": problem.l2,
        "pass_seconds": round(time.perf_counter() - start, 1),
    }
    start = time.perf_counter()
    row["spectrum"] = {**hessian_extremes(influence.hessian, tolerance=args.tolerance), "tolerance": args.tolerance}
    row["spectrum"]["seconds"] = round(time.perf_counter() - start, 1)
    print(num_labels, row["spectrum"], flush=True)
    row["solves"] = {}
    for damping in args.dampings:
        row["solves"][f"{damping:g}"] = solves(influence, vectors, damping, args.cg_tolerance)
        print(num_labels, damping, row["solves"][f"{damping:g}"], flush=True)
    return row


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Measure each model once and write the results JSON (command, date, load, machine)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--labels", type=int, nargs="+", default=[3, 2], choices=[2, 3])
    parser.add_argument("--n-train", type=int, default=8001)
    parser.add_argument("--n-test", type=int, default=4)
    parser.add_argument("--dampings", type=float, nargs="+", default=[FORMER_DAMPING, NLI_DAMPING])
    parser.add_argument("--tolerance", type=float, default=1e-3, help="eigsh's relative tolerance")
    parser.add_argument("--cg-tolerance", type=float, default=1e-8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--output", default="benchmarks/results/nli_spectrum.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    machine_before, started = machine_info(), time.perf_counter()
    models = [one_model(num_labels, args) for num_labels in args.labels]
    payload = {
        "command": " ".join(["python -m benchmarks.bench_nli_spectrum", *(argv if argv is not None else sys.argv[1:])]),
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "recipe_damping": NLI_DAMPING,
        "models": models,
        "wall_seconds": round(time.perf_counter() - started, 1),
        "machine_before": machine_before,
        "machine_after": machine_info(),
    }
    atomic_write_json(args.output, payload)
    return payload


if __name__ == "__main__":
    main()
