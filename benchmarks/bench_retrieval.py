"""Issue 13's retrieval benchmark: how much of the exact top-10 each candidate method finds, and at what cost.

Every method runs through the facade, :meth:`fastif.influence.Influence.candidate_scores`, on one Influence per
set-up (frozen path where the model has one), test points one at a time with the methods interleaved:

* ``all``: every training point scored exactly (the ground truth, and the "one full scan" cost);
* ``features``: FastIF's kNN in feature space, K candidates;
* ``gradients``: the gradient store (one per projection setting), K/2 per side retrieved, reranked exactly, with
  the facade's recall estimate.

s_test is solved once per test point by CG (a memo in front of the solver hands the same s_test to every method;
its time is measured once and added to each method's marginal cost). The "original influence function" per query
is s_test by FastIF's original LiSSA (batch 128, depth 1000; timed in full or extrapolated from measured steps,
as labelled) plus one full scan; also with the same CG.

Fast queries (set-up a): the facade's solver is swapped (``Influence.use_solver``) for an Arnoldi inverse fitted
once (rank r, the rest of each vector divided by the damping, residual on the Hessian's fixed sample), and the
default store is queried with its s_test, reranked with it; recall and Pearson are against CG's exact scores.
Their speed-up is the original (LiSSA, or the same Arnoldi s_test) + one full scan over their marginal time.

    PYTHONPATH=src python benchmarks/bench_retrieval.py --setup a --pool 8000
    PYTHONPATH=src python benchmarks/bench_retrieval.py --table   # rewrite results/retrieval/README.md

Results: ``benchmarks/results/retrieval/<setup>-<pool>.json`` (with the command line and machine load).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import math
import os
import platform
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from fastif.data import TensorData
from fastif.data.text import TextPairData
from fastif.files import atomic_write_json, atomic_write_text
from fastif.gradient_store import GradientStore, GradientStoreConfig
from fastif.hvp import Hessian
from fastif.influence import CandidateScores, Influence
from fastif.model.adapter import AdapterConfig, HFClassifierAdapter, ModelAdapter
from fastif.projection import ProjectionConfig
from fastif.recipes.nli import NLI3_LABELS, NLI_DAMPING, NLITrainConfig, load_embedded, train_nli_classifier
from fastif.scores import ScoreConfig
from fastif.solvers import CG, Arnoldi, ArnoldiConfig, CGConfig, LiSSA, LiSSAConfig, Solver, SolveResult

RESULTS = Path(__file__).parent / "results" / "retrieval"
TOP = 10  # recall@10 of the exact top-10
FRACTIONS = (0.005, 0.01, 0.025, 0.05)
LISSA_BATCH, LISSA_DEPTH = 128, 1000  # FastIF's "original" s_test
HANS_LABEL = "neutral"  # HANS's non-entailment, folded into the 3-class model's label space
TOP2_HESSIAN, TOP2_DAMPING = 256, 3.0  # set-up (b): Hessian sample and damping (H is indefinite over two layers)


@dataclass
class Setup:
    """One benchmark problem: the model's adapter, pool, test points, solver and the projections to compare."""

    name: str
    adapter: ModelAdapter
    train: Any
    test: Any
    damping: float
    frozen: str
    projections: dict[str, ProjectionConfig]
    default_projection: str
    hessian_data: Any = None
    build_options: dict[str, Any] = field(default_factory=dict)
    score: ScoreConfig = field(default_factory=ScoreConfig)
    hessian_batch_size: int = 64
    cg_tolerance: float = 1e-6
    cg_iterations: int = 100
    lissa_steps: int | None = None  # None: run LiSSA's full depth; else time this many steps and extrapolate
    fast_rank: int | None = None  # the fast queries' Arnoldi rank (None: no fast queries)
    notes: list[str] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------- set-ups


def nli_pool(size: int) -> list:
    """The first ``size`` pairs of MNLI train (8,000), then HANS train (29,035), then ANLI r1-r3 (3,198)."""
    hans = [
        dataclasses.replace(r, label=NLI3_LABELS.index(HANS_LABEL), label_name=HANS_LABEL)
        if r.label_name == "non-entailment"
        else r
        for r in load_embedded("hans_train", 2)
    ]
    anli = [r for name in ("anli_r1", "anli_r2", "anli_r3") for r in load_embedded(name, 3)]
    records = [*load_embedded("mnli_train", 3), *hans, *anli]
    if size > len(records):
        raise SystemExit(f"the bundled pool holds {len(records)} pairs; ask for --pool <= {len(records)}")
    return records[:size]


def nli_setup(key: str, pool: int, tests: int) -> Setup:
    """(a) pooler + classifier or (b) top 2 layers + pooler + classifier of the recipe's trained MiniLM."""
    trained = train_nli_classifier(NLITrainConfig())
    top_layers = key == "b"
    include = ("bert.pooler", "classifier")
    if top_layers:
        include = ("bert.encoder.layer.4", "bert.encoder.layer.5", *include)
    adapter = HFClassifierAdapter(
        trained.model,
        AdapterConfig(include=include, l2=trained.config.l2, l2_exclude=("*bias", "*LayerNorm*")),
    )
    tokenizer, length = trained.tokenizer, trained.config.max_length
    train = TextPairData(nli_pool(pool), tokenizer, length, NLI3_LABELS)
    test = TextPairData(load_embedded("mnli_test", 3)[:tests], tokenizer, length, NLI3_LABELS)
    notes = [
        f"model: recipe-trained MiniLM ({trained.path.name}, validation accuracy "
        f"{trained.metrics['validation_accuracy']:.3f})",
        f"HANS non-entailment labelled {HANS_LABEL!r}",
    ]
    if top_layers:
        hessian = train.subset(list(range(0, pool, pool // TOP2_HESSIAN))[:TOP2_HESSIAN])
        notes += [
            f"Hessian over a {TOP2_HESSIAN}-pair evenly spaced subsample of the pool (hessian_data): full-pool HVPs "
            "over two layers do not fit the time box on 2 cores",
            f"damping {TOP2_DAMPING}: over the top 2 layers H is indefinite (docs/numbers.md: λ <= -1.82 on 128 "
            "pairs), so H + λI needs λ above that; CG refuses any non-positive curvature it meets",
        ]
        return Setup(
            f"b-top2-{pool}",
            adapter,
            train,
            test,
            damping=TOP2_DAMPING,
            frozen="on",
            projections={
                "factored-16": ProjectionConfig(dim=2048, layer_dim=16),
                "factored-32": ProjectionConfig(dim=2048, layer_dim=32),
            },
            default_projection="factored-16",
            hessian_data=hessian,
            build_options={"batch_size": 32, "chunk_size": 32},
            score=ScoreConfig(batch_size=32, chunk_size=32),
            cg_tolerance=1e-4,
            cg_iterations=50,
            lissa_steps=5,
            notes=notes,
        )
    projections = {
        "factored-16": ProjectionConfig(dim=2048, layer_dim=16),
        "factored-32": ProjectionConfig(dim=2048, layer_dim=32),
        "factored-32x8": ProjectionConfig(dim=2048, layer_dim=32, terms=8),
    }
    hessian = None
    if pool <= 8000:  # the dense JL map over all 149k parameters costs minutes per 8,000 examples on one core
        projections["dense-1024"] = ProjectionConfig(dim=1024)
    else:
        notes.append("dense projections skipped at this pool size (build time on one loaded core)")
        hessian = train.subset(range(8000))
        notes.append("Hessian over the pool's 8,000 MNLI pairs (hessian_data), the model's own training objective")
    return Setup(
        f"a-pooler-{pool}",
        adapter,
        train,
        test,
        damping=NLI_DAMPING,
        frozen="on",
        projections=projections,
        default_projection="factored-32x8",
        hessian_data=hessian,
        build_options={"batch_size": 512, "chunk_size": 512},
        score=ScoreConfig(batch_size=512, chunk_size=512),
        hessian_batch_size=1024,
        cg_tolerance=1e-4,
        cg_iterations=50,
        lissa_steps=20,
        fast_rank=100,
        notes=notes,
    )


def digits_setup(tests: int) -> Setup:
    """(c) the digits MLP of benchmarks/peers (float64, trained to a tight optimum), 1,500 training images."""
    sys.path.insert(0, str(Path(__file__).parent))
    from peers.digits_problems import DigitsSpec, build_problem

    problem = build_problem(DigitsSpec("mlp", n_train=1500, n_test=tests))
    return Setup(
        "c-digits-1500",
        problem.adapter(),
        problem.train,
        problem.test,
        damping=0.01,
        frozen="auto",
        projections={
            "factored-8": ProjectionConfig(dim=1024, layer_dim=8),
            "factored-16": ProjectionConfig(dim=1024, layer_dim=16),
            "dense-128": ProjectionConfig(dim=128),
            "dense-512": ProjectionConfig(dim=512),
            "identity": ProjectionConfig(kind="identity"),
        },
        default_projection="factored-16",
        build_options={"batch_size": 256, "chunk_size": 256},
        score=ScoreConfig(batch_size=256, chunk_size=256),
        notes=[f"MLP 64-32-10, {problem.num_params} parameters, test accuracy {problem.info['test_accuracy']:.3f}"],
    )


# ---------------------------------------------------------------------------------------------- helpers


class MemoSolver(Solver):
    """A solver that solves each distinct stack of vectors once, so every method of a test point shares s_test."""

    def __init__(self, inner: Solver) -> None:
        self.inner, self.config, self.hessian = inner, inner.config, None
        self.memo: dict[str, SolveResult] = {}
        self.seconds: dict[str, float] = {}

    def fit(self, hessian: Hessian) -> MemoSolver:
        self.inner.fit(hessian)
        self.hessian = hessian
        return self

    def solve(self, vectors: Tensor) -> SolveResult:
        key = hashlib.sha256(vectors.detach().cpu().numpy().tobytes()).hexdigest()
        if key not in self.memo:
            start = time.perf_counter()
            self.memo[key] = self.inner.solve(vectors)
            self.seconds[key] = time.perf_counter() - start
        return self.memo[key]


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    start = time.perf_counter()
    value = fn()
    return value, time.perf_counter() - start


def one(data: Any, i: int) -> Any:
    """Test point ``i`` alone, as a dataset."""
    if isinstance(data, TensorData):
        return TensorData(tuple(t[i : i + 1] for t in data.tensors))
    return data.subset([i])


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def recall(exact: np.ndarray, candidates: Tensor) -> dict[str, float]:
    """Share of the exact top-10 helpful / harmful points among the candidates."""
    found = set(candidates.tolist())
    order = np.argsort(exact)
    sides = {"helpful": order[::-1][:TOP], "harmful": order[:TOP]}
    return {side: sum(int(j) in found for j in top) / TOP for side, top in sides.items()}


def pearson(x: np.ndarray, y: np.ndarray) -> float:
    return float(np.corrcoef(np.asarray(x, np.float64), np.asarray(y, np.float64))[0, 1])


def load_average() -> list[float]:
    return [round(v, 2) for v in os.getloadavg()]


# ---------------------------------------------------------------------------------------------- run


def build_stores(inf: Influence, setup: Setup, root: Path) -> tuple[dict[str, GradientStore], dict[str, Any]]:
    """One fresh store per projection setting: build time (warm), dimension and bytes per example on disk."""
    stores, info = {}, {}
    for position, (name, projection) in enumerate(setup.projections.items()):
        folder = root / setup.name / name
        config = GradientStoreConfig(projection=projection, dtype="float16")
        for _ in range(2 if position == 0 else 1):  # the first store is built twice: its first build warms up
            shutil.rmtree(folder, ignore_errors=True)
            report, seconds = timed(lambda f=folder, c=config: inf.build_gradient_store(f, c, **setup.build_options))
        stores[name] = inf.gradients
        info[name] = {
            "projection": dataclasses.asdict(projection),
            "dim": report.dim,
            "build_seconds": seconds,
            "bytes_per_example": folder_bytes(folder) / len(inf.train),
            "load": load_average(),
        }
        print(f"store {name}: dim {report.dim}, {seconds:.1f} s", flush=True)
    return stores, info


def lissa_baseline(inf: Influence, setup: Setup, test: Any) -> dict[str, Any]:
    """FastIF's original s_test (LiSSA, batch 128, depth 1000) for one test point: timed, or extrapolated."""
    steps = setup.lissa_steps or LISSA_DEPTH
    config = LiSSAConfig(
        damping=setup.damping, batch_size=LISSA_BATCH, depth=steps, scale_samples=4, power_iterations=10
    )
    solver, fit_seconds = timed(lambda: LiSSA(config).fit(inf.hessian))
    gradient = inf.test_grads(test)
    _, seconds = timed(lambda: solver.solve(gradient))
    return {
        "depth": LISSA_DEPTH,
        "batch_size": LISSA_BATCH,
        "steps_timed": steps,
        "fit_seconds": fit_seconds,
        "solve_seconds": seconds * LISSA_DEPTH / steps,
        "extrapolated": steps < LISSA_DEPTH,
    }


def gradient_row(cs: CandidateScores, exact: np.ndarray, store: GradientStore) -> dict[str, Any]:
    """Measured and estimated recall, and score agreement on the candidates, of one gradient retrieval."""
    indices = cs.indices[0].numpy()
    approximate = store.scores(cs.solve.x)[0]
    estimates = cs.recall[0] if cs.recall else {}
    return {
        **recall(exact, cs.indices[0]),
        "estimate": {side: estimates[side].estimate for side in ("helpful", "harmful")},
        "interval": {side: [estimates[side].lower, estimates[side].upper] for side in ("helpful", "harmful")},
        "pearson_rerank_vs_exact": pearson(cs.scores[0].numpy(), exact[indices]),
        "pearson_projected_vs_exact_candidates": pearson(approximate[indices], exact[indices]),
        "pearson_projected_vs_exact_all": pearson(approximate, exact),
        "stages": dict(cs.timings),
    }


def query_point(
    inf: Influence, setup: Setup, stores: dict[str, GradientStore], test: Any, ks: list[int], sweep_k: int
) -> dict:
    """Every method on one test point, interleaved: s_test once, the full scan, kNN and gradient retrieval."""
    memo: MemoSolver = inf.solver  # type: ignore[assignment]
    result, solve_seconds = timed(lambda: inf.solve(test))
    exact_cs, scan_seconds = timed(lambda: inf.candidate_scores(test, method="all"))
    exact = exact_cs.scores[0].double().numpy()
    row: dict[str, Any] = {
        "s_test_seconds": solve_seconds,
        "cg": {k: v for k, v in result.info.items() if k != "residual_trace"},
        "scan_seconds": scan_seconds,
        "exact": exact,
        "features": {},
        "gradients": {},
    }
    for k in ks:
        cs, seconds = timed(lambda k=k: inf.candidate_scores(test, num_candidates=k, method="features"))
        row["features"][k] = {**recall(exact, cs.indices[0]), "seconds": seconds}
        for name, store in stores.items():
            if name != setup.default_projection and k != sweep_k:
                continue  # the projection sweep runs at K = 1% of N only
            inf.use_gradient_store(store)
            cs, seconds = timed(lambda k=k: inf.candidate_scores(test, num_candidates=k, method="gradients"))
            row["gradients"][f"{name}@{k}"] = {**gradient_row(cs, exact, store), "seconds": seconds}
    row["memo_solves"] = len(memo.memo)
    return row


def fast_queries(
    inf: Influence, fast: Solver, store: GradientStore, test: Any, exact: np.ndarray, ks: list[int]
) -> dict[str, Any]:
    """One test point's fast queries: the fast solver's s_test, retrieval from ``store`` and the rerank with it,
    measured against the exact scores; the facade's own solver is put back afterwards."""
    accurate = inf.solver
    inf.use_solver(fast).use_gradient_store(store)
    try:
        result, s_test_seconds = timed(lambda: inf.solve(test))
        rows = {}
        for k in ks:
            cs, seconds = timed(lambda k=k: inf.candidate_scores(test, num_candidates=k, method="gradients"))
            rows[k] = {**gradient_row(cs, exact, store), "seconds": seconds}
    finally:
        inf.use_solver(accurate)
    return {"s_test_seconds": s_test_seconds, "relative_residual": result.info["relative_residual"], "rows": rows}


def run(setup: Setup, root: Path, argv: list[str], threads: int) -> dict[str, Any]:
    """The whole benchmark for one set-up."""
    started, load_start = time.perf_counter(), load_average()
    inf = Influence(
        setup.adapter,
        setup.train,
        MemoSolver(CG(CGConfig(setup.damping, setup.cg_iterations, setup.cg_tolerance))),
        score=setup.score,
        hessian_batch_size=setup.hessian_batch_size,
        frozen=setup.frozen,
        hessian_data=setup.hessian_data,
    )
    n = len(inf.train)
    _, encode_seconds = timed(lambda: (inf.work_adapter, inf.train_features))
    _, fit_seconds = timed(inf.fit)
    print(
        f"{setup.name}: N={n}, P={inf.flat.numel()}, encode {encode_seconds:.1f} s, fit {fit_seconds:.1f} s", flush=True
    )
    stores, store_info = build_stores(inf, setup, root)
    ks = sorted({max(2 * TOP, round(f * n)) for f in FRACTIONS})  # K/2 per side must hold the top-10
    sweep_k = max(2 * TOP, round(0.01 * n))
    fast, fast_fit_seconds = None, None
    if setup.fast_rank is not None:
        fast = Arnoldi(ArnoldiConfig(setup.damping, setup.fast_rank, complement=True, residual="sample"))
        accurate = inf.solver
        _, fast_fit_seconds = timed(lambda: inf.use_solver(fast).fit())
        inf.use_solver(accurate)
        print(f"fast solver: Arnoldi rank {setup.fast_rank}, fit {fast_fit_seconds:.1f} s", flush=True)
    points = []
    for i in range(len(setup.test)):
        test = one(setup.test, i)
        points.append(query_point(inf, setup, stores, test, ks, sweep_k))
        exact = np.asarray(points[-1].pop("exact"))
        if fast is not None:
            points[-1]["fast"] = fast_queries(inf, fast, stores[setup.default_projection], test, exact, ks)
        print(
            f"test point {i}: scan {points[-1]['scan_seconds']:.2f} s, s_test {points[-1]['s_test_seconds']:.2f} s",
            flush=True,
        )
    lissa = lissa_baseline(inf, setup, one(setup.test, 0))
    return {
        "setup": setup.name,
        "command": " ".join([Path(sys.executable).name, *argv]),
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "torch_threads": threads,
            "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
            "load_start": load_start,
            "load_end": load_average(),
            "torch": torch.__version__,
        },
        "n": n,
        "num_params": int(inf.flat.numel()),
        "num_tests": len(setup.test),
        "solver": {
            "method": "cg",
            "damping": setup.damping,
            "tolerance": setup.cg_tolerance,
            "max_iterations": setup.cg_iterations,
            "hessian_data": None if setup.hessian_data is None else len(setup.hessian_data),
        },
        "frozen": inf.split is not None,
        "encode_seconds": encode_seconds,
        "fit_seconds": fit_seconds,
        "ks": ks,
        "stores": store_info,
        "default_projection": setup.default_projection,
        "lissa": lissa,
        "fast_solver": None if fast is None else {**dataclasses.asdict(fast.config), "fit_seconds": fast_fit_seconds},
        "points": points,
        "summary": summarise(points, ks, store_info, lissa, setup.default_projection),
        "notes": setup.notes,
        "seconds": time.perf_counter() - started,
    }


# ---------------------------------------------------------------------------------------------- summary


def mean(values: list[float]) -> float:
    return float(np.mean(values)) if values else math.nan


def retrieval_summary(rows: list[dict]) -> dict[str, Any]:
    """Means over test points of one retrieval setting: recall, estimate, gap, coverage and Pearson."""
    sides = ("helpful", "harmful")
    return {
        **{side: mean([r[side] for r in rows]) for side in sides},
        "estimate": {side: mean([r["estimate"][side] for r in rows]) for side in sides},
        "mean_abs_gap": mean([abs(r["estimate"][s] - r[s]) for r in rows for s in sides]),
        "interval_coverage": mean(
            [float(r["interval"][s][0] <= r[s] <= r["interval"][s][1]) for r in rows for s in sides]
        ),
        "min_pearson_rerank_vs_exact": min(r["pearson_rerank_vs_exact"] for r in rows),
        "pearson_projected_vs_exact_all": mean([r["pearson_projected_vs_exact_all"] for r in rows]),
        "pearson_projected_vs_exact_candidates": mean([r["pearson_projected_vs_exact_candidates"] for r in rows]),
        "retrieval_seconds": mean([r["seconds"] for r in rows]),
        "stage_seconds": {stage: mean([r["stages"][stage] for r in rows]) for stage in rows[0].get("stages", {})},
    }


def summarise(points: list[dict], ks: list[int], stores: dict, lissa: dict, default: str) -> dict[str, Any]:
    """Means over test points: recall per method and K, estimate gaps, Pearson and the cost ratios."""
    scan = mean([p["scan_seconds"] for p in points])
    s_test = mean([p["s_test_seconds"] for p in points])
    original_lissa = lissa["solve_seconds"] + scan
    original_cg = s_test + scan
    features = {
        str(k): {side: mean([p["features"][k][side] for p in points]) for side in ("helpful", "harmful")} for k in ks
    }
    gradients = {}
    for key in points[0]["gradients"]:
        row = retrieval_summary([p["gradients"][key] for p in points])
        marginal = s_test + row["retrieval_seconds"]
        name = key.split("@")[0]
        gradients[key] = {
            **row,
            "marginal_seconds": marginal,
            "speedup_vs_original_lissa": original_lissa / marginal,
            "speedup_vs_original_cg": original_cg / marginal,
            "scan_over_retrieval": scan / row["retrieval_seconds"],
            "dim": stores[name]["dim"],
            "build_over_scan": stores[name]["build_seconds"] / scan,
            "bytes_per_example": stores[name]["bytes_per_example"],
        }
    summary = {
        "scan_seconds": scan,
        "s_test_seconds": s_test,
        "original_lissa_seconds": original_lissa,
        "original_cg_seconds": original_cg,
        "features": features,
        "gradients": gradients,
        "default": default,
    }
    if "fast" in points[0]:
        summary["fast"] = fast_summary(points, ks, scan, original_lissa)
    return summary


def fast_summary(points: list[dict], ks: list[int], scan: float, original_lissa: float) -> dict[str, Any]:
    """The fast queries per K: recall and Pearson against the exact scores, and their speed-ups (whole query)."""
    fast_s_test = mean([p["fast"]["s_test_seconds"] for p in points])
    rows = {}
    for k in ks:
        row = retrieval_summary([p["fast"]["rows"][k] for p in points])
        marginal = row["retrieval_seconds"]  # the timed call solves s_test itself
        rows[str(k)] = {
            **row,
            "speedup_vs_original_lissa": original_lissa / marginal,
            "speedup_vs_original_same_solver": (fast_s_test + scan) / marginal,
        }
    return {
        "s_test_seconds": fast_s_test,
        "max_relative_residual_sample": max(p["fast"]["relative_residual"] for p in points),
        "rows": rows,
    }


INTRO = """# Retrieval benchmark (issue 13)

Recall@10 of the exact top-10 (helpful / harmful), mean over the test points; every method through
`Influence.candidate_scores` (`all` = exact ground truth, `features` = FastIF's kNN, `gradients` = gradient store,
K/2 per side, reranked exactly). est. = the facade's recall estimate (mean); |gap| = mean |estimate - measured| over
test points and sides; cover = share of (point, side) whose measured recall lies in the estimate's interval.
Pearson rerank = reranked vs exact scores on the candidates (1 by construction); Pearson proj. = projected vs exact
scores over all N. Costs: speed-up = original influence per query (s_test + full scan; s_test by LiSSA batch 128
depth 1000, or by the same CG) / marginal time per query (CG s_test + retrieval + rerank); scan / query = full scan /
(retrieval + rerank), i.e. with s_test known. build / scan = store build time / one full scan. Rewritten from the
JSON files by `python benchmarks/bench_retrieval.py --table`.
"""


def _header(result: dict[str, Any]) -> list[str]:
    s, m, solver, lissa = result["summary"], result["machine"], result["solver"], result["lissa"]
    hessian = f" (Hessian over {solver['hessian_data']} pairs)" if solver["hessian_data"] else ""
    lissa_how = f"extrapolated from {lissa['steps_timed']} timed steps" if lissa["extrapolated"] else "timed"
    return [
        f"## {result['setup']}: N = {result['n']:,}, P = {result['num_params']:,}, {result['num_tests']} test points",
        "",
        f"`{result['command']}` · torch threads {m['torch_threads']} · load (1/5/15 min) {m['load_start']} at start, "
        f"{m['load_end']} at end · {result['seconds'] / 60:.1f} min",
        "",
        f"CG damping {solver['damping']}{hessian} · CG s_test {s['s_test_seconds']:.2f} s · full scan "
        f"{s['scan_seconds']:.2f} s · LiSSA s_test {lissa['solve_seconds']:.1f} s ({lissa_how}) · original influence "
        f"per query {s['original_lissa_seconds']:.1f} s (LiSSA) / {s['original_cg_seconds']:.1f} s (CG)",
        "",
    ]


def _recall_table(result: dict[str, Any]) -> list[str]:
    s, n = result["summary"], result["n"]
    default = s["default"]
    lines = [
        f"Recall vs K (gradient store: {default}, dim {result['stores'][default]['dim']})",
        "",
        "| K | K/N | kNN helpful | kNN harmful | store helpful | store harmful | est. helpful | est. harmful | |gap| "
        "| cover |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for k in result["ks"]:
        f, g = s["features"][str(k)], s["gradients"][f"{default}@{k}"]
        lines.append(
            f"| {k} | {k / n:.2%} | {f['helpful']:.2f} | {f['harmful']:.2f} | {g['helpful']:.2f} | {g['harmful']:.2f} "
            f"| {g['estimate']['helpful']:.2f} | {g['estimate']['harmful']:.2f} | {g['mean_abs_gap']:.3f} "
            f"| {g['interval_coverage']:.2f} |"
        )
    return [*lines, ""]


def _projection_table(result: dict[str, Any]) -> list[str]:
    s, n = result["summary"], result["n"]
    k = max(2 * TOP, round(0.01 * n))
    lines = [
        f"Projection sweep at K = {k} ({k / n:.2%} of N)",
        "",
        "| projection | dim | helpful | harmful | |gap| | Pearson rerank (min) | Pearson proj. | speed-up LiSSA / CG "
        "| scan / query | build / scan | bytes/example |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for key, g in s["gradients"].items():
        name, at = key.split("@")
        if int(at) != k:
            continue
        lines.append(
            f"| {name} | {g['dim']} | {g['helpful']:.2f} | {g['harmful']:.2f} | {g['mean_abs_gap']:.3f} "
            f"| {g['min_pearson_rerank_vs_exact']:.6f} | {g['pearson_projected_vs_exact_all']:.3f} "
            f"| {g['speedup_vs_original_lissa']:.1f}x / {g['speedup_vs_original_cg']:.1f}x "
            f"| {g['scan_over_retrieval']:.1f}x | {g['build_over_scan']:.2f} | {g['bytes_per_example']:.0f} |"
        )
    return [*lines, ""]


def _fast_table(result: dict[str, Any]) -> list[str]:
    fast = result["summary"].get("fast")
    if fast is None:
        return []
    solver, n = result["fast_solver"], result["n"]
    lines = [
        f"Fast queries: s_test by Arnoldi rank {solver['rank']} (rest divided by the damping; fitted once in "
        f"{solver['fit_seconds']:.1f} s; {fast['s_test_seconds']:.2f} s per s_test, worst relative residual "
        f"{fast['max_relative_residual_sample']:.3f} on the Hessian's sample), retrieval from "
        f"{result['summary']['default']}, rerank with that s_test; recall and Pearson against CG's exact scores",
        "",
        "| K | K/N | helpful | harmful | est. helpful | est. harmful | |gap| | cover | Pearson vs exact (min) "
        "| query s | of which prepare / s_test / retrieval / rerank / recall | speed-up vs LiSSA original "
        "| vs same-solver original |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for k, g in sorted(fast["rows"].items(), key=lambda item: int(item[0])):
        lines.append(
            f"| {k} | {int(k) / n:.2%} | {g['helpful']:.2f} | {g['harmful']:.2f} | {g['estimate']['helpful']:.2f} "
            f"| {g['estimate']['harmful']:.2f} | {g['mean_abs_gap']:.3f} | {g['interval_coverage']:.2f} "
            f"| {g['min_pearson_rerank_vs_exact']:.4f} | {g['retrieval_seconds']:.3f} | {_stages(g)} "
            f"| {g['speedup_vs_original_lissa']:.0f}x | {g['speedup_vs_original_same_solver']:.1f}x |"
        )
    return [*lines, ""]


def _stages(row: dict[str, Any]) -> str:
    """The query's stage times (``Influence.candidate_scores`` timings), or "not recorded" in older results."""
    stages = row.get("stage_seconds") or {}
    names = ("prepare", "s_test", "candidates", "scores", "recall")
    return " / ".join(f"{stages[name]:.3f}" for name in names) if all(n in stages for n in names) else "not recorded"


def table(results: list[dict[str, Any]]) -> str:
    """The markdown summary of every results file."""
    lines = [INTRO]
    for result in results:
        notes = [f"- {note}" for note in result["notes"]]
        sections = [*_recall_table(result), *_projection_table(result), *_fast_table(result)]
        lines += [*_header(result), *sections, *notes, ""]
    return "\n".join(lines)


def write_table() -> None:
    import json

    results = [json.loads(p.read_text()) for p in sorted(RESULTS.glob("*.json"))]
    atomic_write_text(RESULTS / "README.md", table(results))


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--setup", choices=("a", "b", "c"))
    parser.add_argument("--pool", type=int, default=8000, help="NLI pool size (set-ups a and b)")
    parser.add_argument("--tests", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--store-root", type=Path, default=Path("/tmp/fastif-bench-retrieval"))
    parser.add_argument("--table", action="store_true", help="only rewrite the markdown table from the JSON files")
    args = parser.parse_args(argv)
    if args.table or args.setup is None:
        write_table()
        return
    torch.set_num_threads(args.threads)
    setup = digits_setup(args.tests) if args.setup == "c" else nli_setup(args.setup, args.pool, args.tests)
    result = run(setup, args.store_root, ["benchmarks/bench_retrieval.py", *argv], args.threads)
    atomic_write_json(RESULTS / f"{setup.name}.json", result)
    write_table()


if __name__ == "__main__":
    main(sys.argv[1:])
