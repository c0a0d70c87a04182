"""Run the fact-tracing benchmark: build the corpus, train (or load) the model, attribute every query's completion
with each method, and score the rankings (MRR, Recall@10, tail-patch).

    python -m benchmarks.lm.run --quick   # a smoke run (12 s measured at load 1.5): a tiny corpus and model
    python -m benchmarks.lm.run --full    # the committed results: benchmarks/results/lm/fact_tracing.{json,md}
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from fastif.data.documents import LMDocuments
from fastif.files import atomic_write_json, atomic_write_text
from fastif.telemetry import machine_info

from .corpus import Corpus, CorpusConfig, build_corpus
from .methods import Attribution, MethodsConfig, bm25_scores, influence_methods, rankings
from .metrics import summary, tail_patch, tracing_metrics
from .report import markdown_report
from .train import TrainConfig, fact_accuracy, trained_model

RESULTS = Path(__file__).resolve().parents[1] / "results" / "lm"
K = 10


@dataclass(frozen=True)
class Profile:
    """Everything one run is set by: the corpus, the model's training, the methods and the tail-patch step."""

    corpus: CorpusConfig
    train: TrainConfig
    methods: MethodsConfig
    tail_patch_lr: float = 0.05
    seed: int = 0


PROFILES = {
    "full": Profile(CorpusConfig(), TrainConfig(), MethodsConfig()),
    "quick": Profile(
        CorpusConfig(num_facts=8, filler_documents=40),
        TrainConfig(layers=2, width=64, heads=2, batch_size=8, max_epochs=40),
        MethodsConfig(solvers=("cg", "ekfac"), hessian_examples=None, cg_iterations=10, trace_probes=2),
    ),
}


def random_rankings(queries: int, documents: int, seed: int) -> list[list[int]]:
    """A seeded random order of the documents per query: the tail-patch baseline."""
    generator = torch.Generator().manual_seed(seed)
    return [torch.randperm(documents, generator=generator).tolist() for _ in range(queries)]


def evaluate(
    attributions: list[Attribution],
    corpus: Corpus,
    model: Any,
    train: LMDocuments,
    queries: LMDocuments,
    lr: float,
    learned: list[bool],
) -> dict[str, dict[str, Any]]:
    """Per method: MRR and Recall@10 of the fact documents, the tail-patch gain's summary and its wall time, over
    every query and over the facts the model completes (``learned``; None when it completes none)."""
    query_batches = [queries.batch([i]) for i in range(len(queries))]
    kept = [i for i, ok in enumerate(learned) if ok]
    results = {}
    for attribution in attributions:
        ranked = rankings(attribution.scores)
        gains = tail_patch(model, train.batch, ranked, query_batches, lr, K)
        subset = None
        if kept:
            found = tracing_metrics([ranked[i] for i in kept], [corpus.fact_documents[i] for i in kept], K)
            subset = {**found, "tail_patch": summary([gains[i] for i in kept])}
        results[attribution.name] = {
            **tracing_metrics(ranked, corpus.fact_documents, K),
            "tail_patch": summary(gains),
            "learned_facts": subset,
            "tail_patch_per_query": gains,
            "seconds": attribution.seconds,
            "info": attribution.info,
        }
    return results


def run(profile: Profile, log: Any = print) -> dict[str, Any]:
    """The benchmark's whole run under ``profile``; returns the results payload (not yet written)."""
    started, load_before, clock = datetime.datetime.now().isoformat(timespec="seconds"), os.getloadavg(), time.time()
    corpus = build_corpus(profile.corpus)
    log(f"corpus: {len(corpus.documents)} documents, {len(corpus.facts)} facts, vocabulary {len(corpus.vocabulary)}")
    trained = trained_model(corpus, profile.train, log)
    learned = fact_accuracy(trained.model, trained.tokenizer, corpus.queries)
    log(f"model: {trained.folder.name}, facts completed {sum(learned)}/{len(learned)}")
    train = LMDocuments(trained.tokenizer, corpus.documents, max_length=profile.train.positions, loss_on="all")
    queries = LMDocuments(trained.tokenizer, corpus.queries, max_length=profile.train.positions)
    attributions, setup = influence_methods(trained.model, train, queries, profile.methods, log)
    texts = [f"{q['prompt']}{q['completion']}" for q in corpus.queries]
    attributions.append(bm25_scores([d["text"] for d in corpus.documents], texts))
    randoms = random_rankings(len(queries), len(train), profile.seed)
    attributions.append(Attribution("random", _as_scores(randoms), 0.0))
    methods = evaluate(attributions, corpus, trained.model, train, queries, profile.tail_patch_lr, learned)
    return {
        "command": "python -m benchmarks.lm.run " + " ".join(sys.argv[1:]),
        "date": started,
        "wall_seconds": round(time.time() - clock, 1),
        "load_before": [round(x, 2) for x in load_before],
        "load_after": [round(x, 2) for x in os.getloadavg()],
        "machine": {**machine_info(), "platform": platform.platform()},
        "settings": {**asdict(profile), "top_k": K},
        "corpus": {
            "documents": len(corpus.documents),
            "vocabulary": len(corpus.vocabulary),
            "facts": len(corpus.facts),
        },
        "model": {"folder": trained.folder.name, **{k: v for k, v in trained.metrics.items() if k != "curve"}},
        "training_curve": trained.metrics["curve"],
        "facts_completed": learned,
        "influence_setup": setup,
        "methods": methods,
        "queries": corpus.queries,
        "fact_documents": corpus.fact_documents,
    }


def _as_scores(ranked: list[list[int]]) -> torch.Tensor:
    """Scores whose descending order is ``ranked`` (first = highest)."""
    scores = torch.empty(len(ranked), len(ranked[0]), dtype=torch.float64)
    for row, order in enumerate(ranked):
        scores[row, order] = -torch.arange(len(order), dtype=torch.float64)
    return scores


def main(argv: list[str] | None = None) -> int:
    """Parse ``--quick`` / ``--full``, run, write ``fact_tracing.json`` and ``.md`` (``quick_`` prefixed for quick)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--quick", action="store_true", help="a smoke run on a tiny corpus and model")
    mode.add_argument("--full", action="store_true", help="the benchmark whose results are committed")
    parser.add_argument("--output", type=Path, default=RESULTS, help="folder for the results files")
    args = parser.parse_args(argv)
    name = "full" if args.full else "quick"
    payload = run(PROFILES[name])
    stem = "fact_tracing" if args.full else "quick_fact_tracing"
    atomic_write_json(args.output / f"{stem}.json", payload)
    atomic_write_text(args.output / f"{stem}.md", markdown_report(payload))
    print(markdown_report(payload))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
