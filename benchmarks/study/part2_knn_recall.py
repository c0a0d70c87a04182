"""Study part 2: kNN recall. How many of the top-m helpful / harmful training points (ranked by full influence over
the whole training split) lie among a test point's k nearest neighbours in feature space, vs the k/N chance line.

Full influence, through the facade (``Influence.candidate_scores`` over every training point): one s_test per test
point (``--solver lissa``: FastIF's original one-chain, B = 128, J = 1000 LiSSA, vectorised over all test points;
``--solver cg``: CG to a tight tolerance), then one pass of per-example gradients over all N training points dotted
with all s_test at once. Neighbours (``Influence.nearest``): FAISS IndexFlatL2 over the pooled [CLS] vector (the
classifier's input), as FastIF; the training features come from the frozen path's one pass.

    python benchmarks/study/part2_knn_recall.py --damping 0.3
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import torch

from fastif.evaluation import chance_recall, topm_recall
from fastif.scores import ScoreConfig
from fastif.solvers import CG, LiSSA, LiSSAConfig

try:
    from common import RESULTS, environment, load_setup, pick_test_points, timed, write_results
except ImportError:  # imported as benchmarks.study.part2_knn_recall
    from .common import RESULTS, environment, load_setup, pick_test_points, timed, write_results


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options (defaults = the committed run)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-train", type=int, default=4000)
    parser.add_argument("--damping", type=float, default=0.3)
    parser.add_argument("--correct", type=int, default=10, help="correctly predicted test points")
    parser.add_argument("--wrong", type=int, default=10, help="wrongly predicted test points")
    parser.add_argument("--solver", choices=("lissa", "cg"), default="cg")
    parser.add_argument("--depth", type=int, default=1000, help="LiSSA J")
    parser.add_argument("--batch-size", type=int, default=128, help="LiSSA B")
    parser.add_argument("--scale-batch-size", type=int, default=1, help="scale = auto scale of chains at this B")
    parser.add_argument("--cg-iterations", type=int, default=400)
    parser.add_argument("--ms", type=int, nargs="+", default=[10, 100])
    parser.add_argument("--ks", type=int, nargs="+", default=[10, 30, 100, 300, 1000, 3000, 4000])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--output", type=Path, default=RESULTS / "part2_knn_recall.json")
    return parser.parse_args(argv)


def full_scores(setup: Any, tests: list[int], args: argparse.Namespace) -> tuple[torch.Tensor, dict[str, Any]]:
    """Scores [n_test, N] of every training point, and how s_test was obtained."""
    if args.solver == "cg":
        solver = CG(damping=args.damping, tolerance=1e-6, max_iterations=args.cg_iterations)
        info: dict[str, Any] = {"solver": "CG, tolerance 1e-6, full Hessian"}
    else:
        scale_config = LiSSAConfig(damping=args.damping, batch_size=args.scale_batch_size, seed=0)
        scale = LiSSA(scale_config).fit(setup.hessian()).scale
        config = LiSSAConfig(damping=args.damping, scale=scale, depth=args.depth, batch_size=args.batch_size, seed=0)
        solver = LiSSA(config)
        info = {"solver": f"LiSSA R=1, B={args.batch_size}, J={args.depth}, scale={scale:.4g} (FastIF's original)"}
    result = setup.facade(solver, ScoreConfig(method="grad")).candidate_scores(setup.test_subset(tests))
    info.update(
        s_test_seconds=result.timings["s_test"],  # test gradients and the solve (the solver's fit is lazy, inside)
        **{k: v for k, v in result.solve.info.items() if k in ("converged", "iterations", "late_growth")},
    )
    info["score_seconds"] = result.timings["scores"]
    return result.scores, info


def run(args: argparse.Namespace, setup: Any = None) -> dict[str, Any]:
    """Compute full influence and kNN recall; write the results JSON and PNG."""
    torch.set_num_threads(args.threads)
    env = environment()
    setup = setup or load_setup(args.n_train)
    n = setup.n_train
    tests, correct = pick_test_points(setup, args.correct, args.wrong, args.seed)
    scores, info = full_scores(setup, tests, args)
    ks = sorted({min(k, n) for k in args.ks})
    neighbours, neighbour_seconds = timed(lambda: setup.facade().nearest(setup.test_subset(tests), ks[-1]).numpy())
    correct_mask = np.array(correct)
    curves = []
    for m in args.ms:
        for sign in ("helpful", "harmful"):
            for k in ks:
                recall = topm_recall(scores, neighbours[:, :k], m, sign)
                for group, mask in (("correct", correct_mask), ("wrong", ~correct_mask), ("all", slice(None))):
                    curves.append(
                        {
                            "m": m,
                            "sign": sign,
                            "group": group,
                            "k": k,
                            "recall": float(recall[mask].mean()),
                            "chance": chance_recall(k, n),
                        }
                    )
    np.save(args.output.with_suffix(".scores.npy"), scores.numpy())
    results = {
        "part": "2 kNN recall",
        "environment": env,
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "setup": {k: v for k, v in setup.info.items() if k != "parameter_names"},
        "test_points": tests,
        "test_correct": correct,
        "influence": info,
        "neighbour_seconds": neighbour_seconds,  # test features + FAISS search (train features: the one pass)
        "index": "FAISS IndexFlatL2 over the pooled [CLS] vector (classifier input)",
        "curves": curves,
    }
    write_results(args.output, results)
    plot(results, args.output.with_suffix(".png"))
    return results


def plot(results: dict[str, Any], path: Path) -> None:
    """One panel per m: recall vs k (log) per sign and group, with the k/N chance line."""
    curves = results["curves"]
    ms = sorted({c["m"] for c in curves})
    fig, axes = plt.subplots(1, len(ms), figsize=(6 * len(ms), 4.6), squeeze=False)
    styles = {("helpful", "correct"): "-o", ("helpful", "wrong"): "--o", ("harmful", "correct"): "-s"}
    styles[("harmful", "wrong")] = "--s"
    colours = {"helpful": "tab:green", "harmful": "tab:red"}
    for ax, m in zip(axes[0], ms, strict=True):
        for (sign, group), style in styles.items():
            cells = sorted(
                (c for c in curves if (c["m"], c["sign"], c["group"]) == (m, sign, group)), key=lambda c: c["k"]
            )
            ax.plot(
                [c["k"] for c in cells],
                [c["recall"] for c in cells],
                style,
                color=colours[sign],
                label=f"{sign}, {group}",
            )
        cells = sorted(
            (c for c in curves if c["m"] == m and c["sign"] == "helpful" and c["group"] == "all"), key=lambda c: c["k"]
        )
        ax.plot([c["k"] for c in cells], [c["chance"] for c in cells], ":", color="grey", label="chance k/N")
        ax.set(xscale="log", xlabel="k nearest neighbours", ylabel=f"recall of top-{m}", ylim=(0, 1.02))
        ax.set_title(f"top-{m} by full influence inside the kNN set (N={results['setup']['n_train']})")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    run(parse_args())
