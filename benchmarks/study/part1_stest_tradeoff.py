"""Study part 1: the s_test trade-off. LiSSA batch size B x depth J x repeats R: wall time and error.

Every chain runs at one common scale (the automatic, contraction-safe scale of B = 1 chains), as FastIF varied B at
a fixed scale. One chain per (B, chain number) is read out at every depth J (a chain of depth J is the first J
steps of a longer one), so a cell's time is the measured time of its first J steps. Chains of different B are
interleaved (B order rotated per chain number) so load changes hit every B alike. The error of a cell is
‖ŝ − s‖ / ‖s‖ averaged over the test points, against CG run to a tight tolerance on the full Hessian; the mean of
R chains is scored on disjoint groups of chains. ``tail_average`` (fastif's addition: mean of the last fraction of
iterates) is scored on the same chains, so it costs nothing extra.

    python benchmarks/study/part1_stest_tradeoff.py --damping 0.3
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import torch

from fastif.solvers import CG, LiSSA, LiSSAConfig

try:
    from common import RESULTS, chain_snapshots, environment, load_setup, pick_test_points, timed, write_results
except ImportError:  # imported as benchmarks.study.part1_stest_tradeoff
    from .common import RESULTS, chain_snapshots, environment, load_setup, pick_test_points, timed, write_results


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options (defaults = the committed run)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-train", type=int, default=4000, help="training pairs (first N of MNLI train split)")
    parser.add_argument("--damping", type=float, default=0.3, help="absolute damping λ of H + λI")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32])
    parser.add_argument("--depths", type=int, nargs="+", default=[100, 300, 1000], help="chain depths J")
    parser.add_argument("--chains", type=int, default=2, help="chains per B (R = 1, 2 from disjoint groups)")
    parser.add_argument("--tail-average", type=float, default=0.5, help="fraction of iterates averaged")
    parser.add_argument("--tests", type=int, default=4, help="test points (half correct, half wrong)")
    parser.add_argument("--cg-tolerance", type=float, default=1e-6)
    parser.add_argument("--cg-iterations", type=int, default=400)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: the machine is shared)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", type=Path, default=RESULTS / "part1_stest_tradeoff.json")
    return parser.parse_args(argv)


def run(args: argparse.Namespace, setup: Any = None) -> dict[str, Any]:
    """Run the grid and return the results dict (also written to ``args.output`` with a PNG beside it)."""
    torch.set_num_threads(args.threads)
    env = environment()
    setup = setup or load_setup(args.n_train)
    tests, correct = pick_test_points(setup, args.tests - args.tests // 2, args.tests // 2, args.seed)
    vectors = setup.facade().test_grads(setup.test_subset(tests))
    hessian = setup.hessian()

    cg = CG(damping=args.damping, tolerance=args.cg_tolerance, max_iterations=args.cg_iterations).fit(hessian)
    reference, cg_seconds = timed(lambda: cg.solve(vectors))
    exact = reference.x

    base = LiSSA(LiSSAConfig(damping=args.damping, batch_size=1, seed=args.seed)).fit(hessian)
    scale = base.scale
    solvers = {
        b: LiSSA(LiSSAConfig(damping=args.damping, scale=scale, batch_size=b, seed=args.seed)).fit(hessian)
        for b in args.batch_sizes
    }
    estimates: dict[tuple[int, int, str, int], torch.Tensor] = {}
    seconds: dict[tuple[int, int, int], float] = {}
    for chain in range(args.chains):
        order = np.roll(args.batch_sizes, -chain).tolist()
        for b in order:
            snap = chain_snapshots(solvers[b], vectors, chain, args.depths, args.tail_average)
            for j in args.depths:
                estimates[b, j, "last", chain] = snap["last"][j]
                estimates[b, j, "tail", chain] = snap["tail"][j]
                seconds[b, j, chain] = snap["seconds"][j]
            print(f"chain {chain} B={b}: {snap['seconds'][max(args.depths)]:.1f}s", flush=True)

    repeats = [r for r in (1, 2, 4, 8) if r <= args.chains]
    rows = []
    for b in args.batch_sizes:
        for j in args.depths:
            for kind in ("last", "tail"):
                for r in repeats:
                    groups = [list(range(g, g + r)) for g in range(0, args.chains - r + 1, r)]
                    errors = [
                        float(_relative_error(torch.stack([estimates[b, j, kind, c] for c in g]).mean(0), exact))
                        for g in groups
                    ]
                    times = [sum(seconds[b, j, c] for c in g) for g in groups]
                    rows.append(
                        {
                            "B": b,
                            "J": j,
                            "R": r,
                            "estimate": kind,
                            "error_mean": statistics.fmean(errors),
                            "errors": errors,
                            "seconds_serial": statistics.fmean(times),
                            "seconds_per_chain": statistics.fmean(seconds[b, j, c] for c in range(args.chains)),
                        }
                    )
    results = {
        "part": "1 s_test trade-off",
        "environment": env,
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "setup": {k: v for k, v in setup.info.items() if k != "parameter_names"},
        "parameters": setup.info.get("parameter_names"),
        "test_points": tests,
        "test_correct": correct,
        "reference": {
            "method": "CG on the full training Hessian (all N points)",
            "converged": reference.info["converged"],
            "iterations": reference.info["iterations"],
            "final_relative_residual": reference.info["residual_trace"][-1],
            "seconds": cg_seconds,
        },
        "lissa_scale": scale,
        "lissa_top_batch_eigenvalue_B1": base.top_eigenvalue,
        "vectors_per_chain": len(tests),
        "rows": rows,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    write_results(args.output, results)
    plot(results, args.output.with_suffix(".png"))
    return results


def _relative_error(estimate: torch.Tensor, exact: torch.Tensor) -> float:
    return float(((estimate - exact).norm(dim=1) / exact.norm(dim=1)).mean())


def plot(results: dict[str, Any], path: Path) -> None:
    """Left: error vs time per chain (R = 1) for every B and J. Right: error vs R at the largest J, last vs tail."""
    rows = results["rows"]
    batch_sizes = sorted({r["B"] for r in rows})
    depths = sorted({r["J"] for r in rows})
    colours = plt.cm.viridis(np.linspace(0, 0.9, len(batch_sizes)))
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.8))
    for colour, b in zip(colours, batch_sizes, strict=True):
        for kind, style in (("last", "-o"), ("tail", "--s")):
            cells = sorted(
                (r for r in rows if r["B"] == b and r["R"] == 1 and r["estimate"] == kind), key=lambda r: r["J"]
            )
            left.plot(
                [r["seconds_per_chain"] for r in cells],
                [r["error_mean"] for r in cells],
                style,
                color=colour,
                label=f"B={b}" if kind == "last" else None,
                alpha=1.0 if kind == "last" else 0.6,
            )
        cells = sorted(
            (r for r in rows if r["B"] == b and r["J"] == depths[-1] and r["estimate"] == "last"), key=lambda r: r["R"]
        )
        right.plot([r["R"] for r in cells], [r["error_mean"] for r in cells], "-o", color=colour, label=f"B={b}")
        cells = sorted(
            (r for r in rows if r["B"] == b and r["J"] == depths[-1] and r["estimate"] == "tail"), key=lambda r: r["R"]
        )
        right.plot([r["R"] for r in cells], [r["error_mean"] for r in cells], "--s", color=colour, alpha=0.6)
    left.set(
        xscale="log",
        yscale="log",
        xlabel="seconds per chain (measured, shared 2-core CPU)",
        ylabel="relative error of s_test vs CG",
        title=f"R=1; points: J={depths}; solid = last iterate, dashed = tail average",
    )
    right.set(
        xscale="log",
        yscale="log",
        xlabel="repeats R (chains averaged)",
        ylabel="relative error",
        title=f"J={depths[-1]}; solid = last iterate, dashed = tail average",
    )
    right.set_xticks(sorted({r["R"] for r in rows}), [str(r) for r in sorted({r["R"] for r in rows})])
    left.legend(fontsize=8)
    right.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    run(parse_args())
