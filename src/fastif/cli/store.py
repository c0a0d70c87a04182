"""``fastif store build`` and ``fastif store query``: the gradient store of a training set, built once, resumable,
then searched by projected influence, reranked exactly, with a recall estimate per query."""

from __future__ import annotations

import argparse
import time
from typing import Any

from .options import CANDIDATES, DATA, GLOBAL, MODEL, OUTPUT, PARAMETERS, SCORING, SOLVER, _add_options, _Option
from .pipeline import _check_outputs, _describe_model

STORE = (
    "gradient store",
    (
        _Option(("--store",), "candidates.store", "gradient store folder (default OUTPUT/gradients)"),
        _Option(("--dim",), "candidates.gradients.projection.dim", "JL dimension of the non-factored part", int),
        _Option(
            ("--layer-dim",),
            "candidates.gradients.projection.layer_dim",
            "per-side dimension of each Linear layer's factored projection (0: no factoring)",
            int,
        ),
        _Option(
            ("--terms",),
            "candidates.gradients.projection.terms",
            "independent Kronecker maps summed per factored layer (more: closer to a dense projection)",
            int,
        ),
        _Option(
            ("--projection",),
            "candidates.gradients.projection.kind",
            "random projection",
            str,
            ("rademacher", "gaussian", "identity"),
        ),
        _Option(("--store-dtype",), "candidates.gradients.dtype", "on-disk dtype", str, ("float16", "float32")),
    ),
)


def _store_line(pipeline: Any, store: Any, seconds: float) -> str:
    """The store's size, dimension and bytes per example on disk."""
    on_disk = sum(path.stat().st_size for path in pipeline.store_folder.glob("grads-*.npy"))
    return (
        f"store: {store.n} training points x {store.dim} dims ({on_disk / store.n:.0f} bytes per example on disk, "
        f"{on_disk / 1e6:.1f} MB) at {pipeline.store_folder}; {seconds:.1f} s"
    )


def _build(args: argparse.Namespace) -> int:
    from tqdm.auto import tqdm

    from ..pipeline import Pipeline
    from .options import _pipeline_config

    config = _pipeline_config(args)
    _check_outputs(config, index=False)
    pipeline = Pipeline(config)
    print(_describe_model(pipeline.loaded.info, pipeline.loaded.label_names), flush=True)
    for line in pipeline.prepare_frozen():
        print(line, flush=True)
    bar = tqdm(total=len(pipeline.train), desc="gradient store", unit="ex", disable=not config.output.progress)
    start = time.perf_counter()
    report = pipeline.build_gradient_store(lambda done: bar.update(done.rows))
    bar.close()
    store = pipeline.open_gradient_store()
    print(f"built {len(report.computed)} shard(s), reused {len(report.reused)} of {report.num_shards}")
    print(_store_line(pipeline, store, time.perf_counter() - start))
    return 0


def _query(args: argparse.Namespace) -> int:
    from ..pipeline import Pipeline, format_timings, print_report, write_results
    from .options import _pipeline_config

    config = _pipeline_config(args, {"candidates.method": "gradients"})
    _check_outputs(config, index=False)
    pipeline = Pipeline(config)
    print(_describe_model(pipeline.loaded.info, pipeline.loaded.label_names), flush=True)
    start = time.perf_counter()
    store = pipeline.open_gradient_store()
    print(_store_line(pipeline, store, time.perf_counter() - start), flush=True)
    report = pipeline.explain()
    print()
    print_report(report)
    for number, item in enumerate(report["explained"], start=1):
        for side, estimate in item.get("recall", {}).items():
            line = (
                f"[{number}] {side}: recall of the exact top-{config.scoring.top_k} among the {item['candidates']} "
                f"reranked candidates ≈ {estimate['estimate']:.2f} [{estimate['lower']:.2f}, {estimate['upper']:.2f}]"
            )
            print(line + (f"; {estimate['warning']}" if estimate["warning"] else ""))
    paths = write_results(report, config, config.output.folder)
    print(f"times: {format_timings(pipeline.timings)}")
    print(f"wrote {', '.join(str(path) for path in paths)}")
    return 0


def add_store_commands(commands: argparse._SubParsersAction) -> None:
    """``fastif store build|query``."""
    store = commands.add_parser("store", help="the gradient store: build it once, then query it (retrieve + rerank)")
    actions = store.add_subparsers(dest="store_command", required=True, parser_class=type(store))
    build = actions.add_parser("build", help="project every training point's gradient once, to disk (resumable)")
    _add_options(build, MODEL, DATA, PARAMETERS, STORE, OUTPUT, GLOBAL)
    build.set_defaults(handler=_build)
    query = actions.add_parser("query", help="explain test points from the store: retrieve, rerank exactly, recall")
    _add_options(query, MODEL, DATA, PARAMETERS, STORE, CANDIDATES, SOLVER, SCORING, OUTPUT, GLOBAL)
    query.set_defaults(handler=_query)
