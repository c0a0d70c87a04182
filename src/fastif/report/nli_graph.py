"""The influence graph of FastIF's visualisation on the bundled data: HANS heuristics + MNLI vs MNLI training points.

The 2-class (entailment vs non-entailment) MiniLM MNLI model; test groups are the three HANS heuristics and the
MNLI test split; by default each group's test points are ones the model gets wrong (as FastIF drew them). Each test
point is scored against its kNN training candidates with LiSSA s_test, and the run plus its report (figure,
explorer, statistics) are written to one folder.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np

from ..app_utils import Subset, dataset_labels, index_cache_folder, machine_info, predict
from ..config import config_to_dict
from ..data import Dataset
from ..errors import ConfigError, DataError
from ..files import check_writable
from ..influence import Influence
from ..model.adapter import AdapterConfig, HFClassifierAdapter
from ..scores import ScoreConfig
from ..solvers import LiSSA, LiSSAConfig
from .from_run import InfluenceRun, compute_run, report_run, summary_lines, write_run

HANS_HEURISTICS: tuple[str, ...] = ("lexical_overlap", "subsequence", "constituent")
SCREENSHOT_FILE = "explorer_screenshot.png"


@dataclass(frozen=True)
class NLIGraphConfig:
    """Sizes of the HANS + MNLI influence graph (defaults: ~10-15 min on 2 shared CPU cores).

    ``scan`` examples per group (seeded order) are predicted to find ``per_group`` test points (``select="wrong"``:
    mispredicted ones, as in FastIF's figure). Influence is over ``params`` with LiSSA (absolute ``damping``).
    """

    per_group: int = 10
    scan: int = 60
    select: Literal["wrong", "any"] = "wrong"
    candidates: int = 100
    top: int = 5
    params: tuple[str, ...] = ("bert.encoder.layer.5", "bert.pooler", "classifier")
    l2: float = 1e-3
    l2_exclude: tuple[str, ...] = ("*bias", "*LayerNorm*")
    damping: float = 3.0
    lissa_depth: int = 60
    lissa_batch_size: int = 2
    lissa_scale_samples: int = 4
    lissa_power_iterations: int = 10
    batch_size: int = 32
    seed: int = 0

    def __post_init__(self) -> None:
        """Refuse sizes that cannot run."""
        if not (1 <= self.per_group <= self.scan and self.candidates >= 1 and self.top >= 1 and self.damping >= 0):
            raise ConfigError(
                f"NLIGraphConfig: need 1 <= per_group ({self.per_group}) <= scan ({self.scan}), candidates >= 1, "
                f"top >= 1 and damping >= 0"
            )
        if self.select not in ("wrong", "any"):
            raise ConfigError(f"NLIGraphConfig.select must be 'wrong' or 'any', got {self.select!r}")

    @classmethod
    def quick(cls, **overrides: Any) -> NLIGraphConfig:
        """A small version for a smoke run."""
        return cls(**{**dict(per_group=3, scan=30, candidates=30, top=3, lissa_depth=10), **overrides})


def pick_points(model: Any, data: Dataset, config: NLIGraphConfig, rng: np.random.Generator) -> list[int]:
    """``per_group`` indices from the first ``scan`` of a seeded order: mispredicted ones when ``select="wrong"``."""
    order = rng.permutation(len(data))[: min(config.scan, len(data))].tolist()
    if config.select == "any":
        return order[: config.per_group]
    predicted = predict(model, data, order, config.batch_size).argmax(-1)
    gold = dataset_labels(Subset(data, order))
    wrong = [i for i, p, g in zip(order, predicted.tolist(), gold.tolist(), strict=True) if p != g]
    if len(wrong) < config.per_group:
        raise DataError(
            f"only {len(wrong)} mispredicted points among {len(order)} scanned; raise scan or use select='any'"
        )
    return wrong[: config.per_group]


def nli_groups(trained: Any, config: NLIGraphConfig, rng: np.random.Generator) -> dict[str, Dataset]:
    """The test groups: each HANS heuristic of ``hans_eval`` and the MNLI test split (2-class labels)."""
    from ..data.text import TextPairData
    from ..recipes.nli import load_embedded, nli_label_scheme

    names, _ = nli_label_scheme(2)
    hans = load_embedded("hans_eval", 2)
    sources = {h: [r for r in hans if r.extra.get("heuristic") == h] for h in HANS_HEURISTICS}
    sources["mnli"] = load_embedded("mnli_test", 2)
    groups = {}
    for group, records in sources.items():
        data = TextPairData(records, trained.tokenizer, trained.config.max_length, names)
        groups[group] = Subset(data, pick_points(trained.model, data, config, rng))
    return groups


def build_nli_run(config: NLIGraphConfig, log: Callable[[str], None] | None = None) -> InfluenceRun:
    """Score the HANS + MNLI test groups against their kNN candidates on the cached 2-class MNLI model."""
    from ..data.text import TextPairData
    from ..recipes.nli import NLITrainConfig, load_embedded, nli_label_scheme, train_nli_classifier

    log = log or (lambda _message: None)
    start_machine, start = machine_info(), time.perf_counter()
    trained = train_nli_classifier(NLITrainConfig(num_labels=2), progress=False)
    names, _ = nli_label_scheme(2)
    records = load_embedded("mnli_train", 2)[: trained.config.train_size]
    train = TextPairData(records, trained.tokenizer, trained.config.max_length, names)
    log(f"2-class model {trained.path.name} (validation accuracy {trained.metrics['validation_accuracy']:.3f})")
    groups = nli_groups(trained, config, np.random.default_rng(config.seed))
    log(f"picked {config.per_group} {config.select} test points per group ({time.perf_counter() - start:.0f}s)")
    adapter = HFClassifierAdapter(
        trained.model, AdapterConfig(include=config.params, l2=config.l2, l2_exclude=config.l2_exclude)
    )
    influence = Influence(adapter, train, _solver(config), ScoreConfig(batch_size=config.batch_size), config.batch_size)
    meta = {"config": config_to_dict(config), "model": {"path": str(trained.path), "metrics": trained.metrics}}
    run = compute_run(influence, groups, config.candidates, index_cache_folder(trained.path, len(train)), meta)
    run.meta.update(
        num_params=adapter.num_params,
        seconds=round(time.perf_counter() - start, 1),
        machine={"start": start_machine, "end": machine_info()},
    )
    log(f"scored {len(run.test_points)} test points x {config.candidates} candidates ({run.meta['seconds']}s)")
    return run


def _solver(config: NLIGraphConfig) -> LiSSA:
    """LiSSA with an automatic contraction-safe scale and the config's absolute damping."""
    return LiSSA(
        LiSSAConfig(
            damping=config.damping,
            depth=config.lissa_depth,
            batch_size=config.lissa_batch_size,
            seed=config.seed,
            scale_samples=config.lissa_scale_samples,
            power_iterations=config.lissa_power_iterations,
            tail_average=0.3,
        )
    )


def screenshot_explorer(html: Path, png: Path, click_test: int = 0) -> Path | None:
    """Open the explorer in headless Chromium (Playwright + /usr/bin/chromium), click a test point, save a PNG.

    Returns None when the browser or Playwright is missing (the report itself does not need them).
    """
    chromium = Path("/usr/bin/chromium")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        return None
    if not chromium.exists():
        return None
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=str(chromium), args=["--headless", "--no-sandbox", "--disable-gpu"]
        )
        try:
            page = browser.new_page(viewport={"width": 1500, "height": 950})
            page.goto(html.resolve().as_uri())
            page.locator(f'#panel-helpful circle.test-point[data-index="{click_test}"]').click(force=True)
            page.screenshot(path=str(png), full_page=True)
        finally:
            browser.close()
    return png


def add_graph_command(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``experiment influence-graph`` (creating or reusing the ``experiment`` group)."""
    from ..simulatability import experiment_group

    parser = experiment_group(subparsers).add_parser(
        "influence-graph",
        help="influence graph of HANS heuristics + MNLI test points vs MNLI training points (2-class model)",
        description="Writes influence_run.json and its report (PNG/SVG, HTML explorer, graph_stats.json).",
    )
    parser.add_argument("--quick", action="store_true", help="small sizes for a smoke run")
    parser.add_argument("--per-group", type=int, default=None, help="test points per group (default 10)")
    parser.add_argument("--candidates", type=int, default=None, help="kNN candidates per test point (default 100)")
    parser.add_argument("--select", choices=("wrong", "any"), default=None, help="test points (default: wrong)")
    parser.add_argument("--output", type=Path, default=Path("benchmarks/results/graph"), help="run folder")
    parser.add_argument("--no-screenshot", action="store_true", help="skip the headless-Chromium screenshot")
    parser.add_argument("--seed", type=int, default=0, help="random seed")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    parser.set_defaults(handler=_graph_command)
    return parser


def _graph_command(args: argparse.Namespace) -> int:
    """CLI handler: build the run, write it and its report, and optionally a browser screenshot."""
    overrides: dict[str, Any] = {"seed": args.seed}
    for name in ("per_group", "candidates", "select"):
        if getattr(args, name) is not None:
            overrides[name] = getattr(args, name)
    config = replace(NLIGraphConfig.quick() if args.quick else NLIGraphConfig(), **overrides)
    check_writable(args.output)
    run = build_nli_run(config, log=lambda message: print(message, flush=True))
    write_run(run, args.output)
    paths = report_run(args.output, args.output, config.top, "FastIF influence explorer: HANS + MNLI")
    if not args.no_screenshot:
        shot = screenshot_explorer(paths["html"], args.output / SCREENSHOT_FILE)
        print(f"wrote {shot}" if shot else "no screenshot: needs playwright and /usr/bin/chromium")
    print("\n".join(summary_lines(json.loads(paths["stats"].read_text(encoding="utf-8")))))
    print(f"wrote {args.output}")
    return 0
