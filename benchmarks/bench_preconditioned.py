"""Preconditioned solvers (issue 15): CG against PCG (EK-FAC / K-FAC) and LiSSA against LiSSA + EK-FAC, to the
same relative residual on the same test gradients: iterations or steps, the examples their HVPs touched, seconds,
and each answer's distance from a tight CG reference.

Problems: the digits softmax regression and MLP (``benchmarks/peers/digits_problems``, their damping), the MiniLM
NLI model's pooler + classifier on the study's cached frozen pass (``--nli-train`` pairs, damping
``NLI_DAMPING``), and with ``--top2 N`` MiniLM's top 2 layers + pooler + classifier (3.7M parameters) on N pairs
(``--top2-damping``: their Hessian is far more indefinite than the head's; only CG and PCG with EK-FAC run there,
CG's answer the reference: ``TOP2_METHODS``).
Methods run one after another per problem (one round; the counts are deterministic, the seconds are not).

    python -m benchmarks.bench_preconditioned --nli-train 4000 --top2 128
    python -m benchmarks.bench_preconditioned --only-top2 --top2 128     # adds that problem to the results file
    python -m benchmarks.bench_preconditioned --sweep                    # adds PCG's preconditioner sweep
"""

from __future__ import annotations

import argparse
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

from torch import Tensor

from benchmarks.peers.common import load_average, markdown_table, provenance, set_threads, uptime
from fastif import CG, Hessian, Influence, Solver
from fastif.files import atomic_write_json, atomic_write_text, read_json
from fastif.solvers import LiSSA
from fastif.solvers.kfac import PCG, EKFACConfig, KFACConfig

RESULTS = "benchmarks/results/preconditioned"
TOP2_METHODS = ("CG", "PCG (EK-FAC)")
"""What runs on MiniLM's top 2 layers (CG's answer is the reference there): an automatic LiSSA's thousands of
batch HVPs through two 3.7M-parameter layers do not fit the time box on 2 cores."""


def methods(damping: float, tolerance: float, target: float) -> dict[str, Callable[[], Solver]]:
    """Each method's solver, built fresh (so every fit is timed)."""
    cg = {"damping": damping, "tolerance": tolerance, "max_iterations": 2000}
    return {
        "CG": lambda: CG(**cg),
        "PCG (EK-FAC)": lambda: PCG(**cg, preconditioner=EKFACConfig(damping=damping)),
        "PCG (K-FAC)": lambda: PCG(**cg, preconditioner=KFACConfig(damping=damping)),
        "LiSSA": lambda: LiSSA(damping=damping, target_residual=target),
        "LiSSA (EK-FAC)": lambda: LiSSA(
            damping=damping, target_residual=target, preconditioner=EKFACConfig(damping=damping)
        ),
    }


def run_method(
    solver: Solver, hessian: Hessian, vectors: Tensor, reference: Tensor | None
) -> tuple[dict[str, Any], Tensor]:
    """Fit (timed apart) and solve; the work in examples touched by HVPs, and the error against ``reference`` (None:
    this solve is the reference, error 0)."""
    start = time.perf_counter()
    solver.fit(hessian)
    fitted = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = solver.solve(vectors)
    solved = time.perf_counter()
    info = result.info
    row: dict[str, Any] = {
        "fit_seconds": round(fitted - start, 2),
        "solve_seconds": round(solved - fitted, 2),
        "converged": bool(info["converged"]),
        "error_vs_reference": 0.0 if reference is None else float((result.x - reference).norm() / reference.norm()),
        "warnings": [str(w.message) for w in caught],
    }
    if "attempts" in info:  # automatic LiSSA
        row["steps"] = info["steps"]
        row["examples_touched"] = sum(2 * a["depth"] * a["batch_size"] for a in info["attempts"])
        row["relative_residual"] = info["relative_residual"]
        row["scale"], row["top_eigenvalue"] = info["scale"], info["top_eigenvalue"]  # of the last attempt's batches
    else:
        row["iterations"] = info["iterations"]
        row["examples_touched"] = info["iterations"] * hessian.num_examples
        row["relative_residual"] = info["residual_trace"][-1]
    print(f"    {row}  load {load_average()}", flush=True)
    return row, result.x


def compare(
    name: str, hessian: Hessian, vectors: Tensor, damping: float, args: argparse.Namespace, labels: tuple = ()
) -> dict:
    """Every method (or only ``labels``, whose first solve is then the reference) on one problem, and the CG / PCG
    and LiSSA step ratios of the pairs that ran."""
    print(
        f"{name}: P = {hessian.dim}, N = {hessian.num_examples}, {len(vectors)} vectors, damping {damping}", flush=True
    )
    reference = None
    if not labels:
        reference = CG(damping=damping, tolerance=1e-10, max_iterations=4000).fit(hessian).solve(vectors).x
    rows = {}
    for label, make in methods(damping, args.tolerance, args.target).items():
        if labels and label not in labels:
            continue
        print(f"  {label}", flush=True)
        rows[label], answer = run_method(make(), hessian, vectors, reference)
        reference = answer if reference is None else reference
    pairs = {
        "CG / PCG (EK-FAC) iterations": ("CG", "PCG (EK-FAC)", "iterations"),
        "CG / PCG (K-FAC) iterations": ("CG", "PCG (K-FAC)", "iterations"),
        "LiSSA / LiSSA (EK-FAC) steps": ("LiSSA", "LiSSA (EK-FAC)", "steps"),
    }
    ratios = {key: rows[a][n] / rows[b][n] for key, (a, b, n) in pairs.items() if a in rows and b in rows}
    reference_note = f"the {next(iter(rows))} solve" if labels else "CG to relative residual 1e-10"
    info = {"P": hessian.dim, "N": hessian.num_examples, "damping": damping, "reference": reference_note}
    return {**info, "methods": rows, "ratios": ratios}


SWEEP_DAMPINGS = (0.0, 1e-4, 1e-3, 1e-2, 3e-2, 1e-1, 3e-1, "heuristic")


def preconditioner_sweep(vectors: int, tolerance: float) -> dict[str, Any]:
    """PCG's iterations on the digits models over the EK-FAC preconditioner's own damping and Fisher (the solve's
    damping fixed): whether any setting reaches 3× fewer iterations than CG."""
    sweep = {}
    for kind in ("logreg", "mlp"):
        hessian, gradients, damping = digits(kind, vectors)
        options = {"damping": damping, "tolerance": tolerance, "max_iterations": 2000}
        cg = CG(**options).fit(hessian).solve(gradients).info["iterations"]
        rows = []
        for fisher in ("empirical", "true"):
            for own in SWEEP_DAMPINGS:
                factors = EKFACConfig(damping=own, fisher=fisher, likelihood="categorical")
                iterations = PCG(**options, preconditioner=factors).fit(hessian).solve(gradients).info["iterations"]
                rows.append({"fisher": fisher, "preconditioner_damping": own, "iterations": iterations})
        best = min(rows, key=lambda row: row["iterations"])
        sweep[kind] = {"cg_iterations": cg, "rows": rows, "best": best, "best_ratio": cg / best["iterations"]}
        print(f"sweep {kind}: CG {cg}, best PCG {best} ({cg / best['iterations']:.2f}x)", flush=True)
    return sweep


def digits(kind: str, vectors: int) -> tuple[Hessian, Tensor, float]:
    from benchmarks.peers.digits_problems import DigitsSpec, build_problem
    from benchmarks.peers.kfac_bench import DAMPING

    spec = DigitsSpec(kind, 1000, 50, damping=DAMPING[kind], seed=0)
    problem = build_problem(spec)
    influence = Influence(problem.adapter(), problem.train, CG(), hessian_batch_size=len(problem.y_train))
    return influence.hessian, influence.test_grads(problem.test)[:vectors], spec.damping


def nli_head(n_train: int, vectors: int) -> tuple[Hessian, Tensor, float]:
    from benchmarks.study.common import load_setup
    from fastif.recipes.nli import NLI_DAMPING

    setup = load_setup(n_train=n_train)
    return setup.hessian(), setup.facade().test_grads(setup.test_subset(range(vectors))), NLI_DAMPING


def nli_top2(n_train: int, vectors: int, damping: float) -> tuple[Hessian, Tensor, float]:
    from fastif import AdapterConfig, HFClassifierAdapter
    from fastif.data.text import TextPairData
    from fastif.recipes.nli import NLI3_LABELS, NLITrainConfig, load_embedded, train_nli_classifier

    trained = train_nli_classifier(NLITrainConfig(), progress=False)
    include = ("bert.encoder.layer.4", "bert.encoder.layer.5", "bert.pooler", "classifier")
    config = AdapterConfig(include=include, l2=trained.config.l2, l2_exclude=("*bias", "*LayerNorm*"))
    adapter = HFClassifierAdapter(trained.model, config)
    length = trained.config.max_length
    train = TextPairData(load_embedded("mnli_train", 3)[:n_train], trained.tokenizer, length, NLI3_LABELS)
    test = TextPairData(load_embedded("mnli_test", 3)[:vectors], trained.tokenizer, length, NLI3_LABELS)
    influence = Influence(adapter, train, CG(), frozen="on", hessian_batch_size=32)
    return influence.hessian, influence.test_grads(test), damping


def table(results: dict[str, Any]) -> str:
    lines = []
    for name, problem in results["problems"].items():
        rows = [
            [
                label,
                row.get("iterations", row.get("steps")),
                row["examples_touched"],
                row["fit_seconds"],
                row["solve_seconds"],
                row["relative_residual"],
                row["error_vs_reference"],
                row["converged"],
            ]
            for label, row in problem["methods"].items()
        ]
        headers = ["method", "iterations / steps", "examples touched", "fit s", "solve s", "residual", "error", "ok"]
        ratios = ", ".join(f"{key} {value:.2f}" for key, value in problem["ratios"].items())
        lines.append(
            f"### {name}: P = {problem['P']:,}, N = {problem['N']:,}, damping {problem['damping']}\n\n"
            f"`{problem['command']}`\n\n"
            f"{markdown_table(headers, rows)}\n\n{ratios}\n"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--vectors", type=int, default=5, help="test gradients solved at once")
    parser.add_argument("--tolerance", type=float, default=1e-6, help="CG / PCG relative residual")
    parser.add_argument("--target", type=float, default=0.01, help="LiSSA's target relative residual")
    parser.add_argument("--nli-train", type=int, default=0, help="NLI head on this many pairs (0: skip)")
    parser.add_argument("--top2", type=int, default=0, help="MiniLM top 2 layers on this many pairs (0: skip)")
    parser.add_argument(
        "--top2-damping", type=float, default=3.0, help="its damping (at 0.5, H + 0.5·I is indefinite: λ <= -1.82)"
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--only-top2", action="store_true", help="run the top-2 problem only, keeping the others")
    parser.add_argument("--sweep", action="store_true", help="only the preconditioner sweep, kept in the results file")
    args = parser.parse_args(argv)
    set_threads(args.threads)
    started, load_before = uptime(), load_average()
    problems = {} if args.only_top2 else {f"digits {k}": lambda k=k: digits(k, args.vectors) for k in ("logreg", "mlp")}
    if args.nli_train:
        problems[f"MiniLM NLI head, {args.nli_train} pairs"] = lambda: nli_head(args.nli_train, args.vectors)
    if args.top2:
        problems[f"MiniLM top 2 layers, {args.top2} pairs"] = lambda: nli_top2(
            args.top2, args.vectors, args.top2_damping
        )
    path = Path(f"{RESULTS}.json")
    keep = (args.only_top2 or args.sweep) and path.is_file()
    results: dict[str, Any] = read_json(path) if keep else {"problems": {}}
    command = provenance("benchmarks.bench_preconditioned", argv, started, load_before)["command"]
    for problem in results["problems"].values():  # a file from before per-problem commands: its one command
        problem.setdefault("command", results.get("command"))
    results["commands"] = [*results.get("commands", [results["command"]] if "command" in results else []), command]
    if args.sweep:
        problems = {}
        results["preconditioner_sweep"] = {"command": command, **preconditioner_sweep(args.vectors, args.tolerance)}
        save(results, argv, started, load_before)
    for name, build in problems.items():
        labels = TOP2_METHODS if name.startswith("MiniLM top 2") else ()
        results["problems"][name] = {"command": command, **compare(name, *build(), args, labels)}
        save(results, argv, started, load_before)


def save(results: dict[str, Any], argv: list[str] | None, started: str, load_before: list[float]) -> None:
    """Write the results JSON and its markdown tables (after every problem, so a stopped run keeps the others)."""
    results.update(provenance("benchmarks.bench_preconditioned", argv, started, load_before))
    atomic_write_json(f"{RESULTS}.json", results)
    header = "# Preconditioned solvers\n\nCommands: " + ", ".join(f"`{c}`" for c in results["commands"]) + "\n\n"
    load = f"Load of the last command: before `{started}`, after `{results['uptime_after']}`.\n\n"
    atomic_write_text(f"{RESULTS}.md", header + load + table(results) + sweep_table(results))


def sweep_table(results: dict[str, Any]) -> str:
    """PCG's iterations per preconditioner setting on the digits models, if the sweep ran."""
    sweep = results.get("preconditioner_sweep")
    if not sweep:
        return ""
    lines = [f"\n### PCG over the EK-FAC preconditioner's damping and Fisher\n\n`{sweep['command']}`\n"]
    for kind in ("logreg", "mlp"):
        found = sweep[kind]
        rows = [[r["fisher"], r["preconditioner_damping"], r["iterations"]] for r in found["rows"]]
        lines.append(
            f"{kind}: CG {found['cg_iterations']} iterations; best PCG {found['best']['iterations']} "
            f"({found['best_ratio']:.2f}×)\n\n{markdown_table(['Fisher', 'P damping', 'PCG iterations'], rows)}\n"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
