"""The embedded NLI model's learning curve (issue 18): held-out MNLI accuracy against the number of trainable
layers, the learning rate, epochs and training pairs, on the premise-grouped split (no premise in two parts).

Each named recipe is an :class:`NLITrainConfig` trained by the recipe's own :func:`train_nli_classifier` (so the
model cache is shared with the demo) and scored on the MNLI validation and test splits. Two-class recipes are
also scored on HANS, per heuristic and gold label, to check HANS's known signature (high on entailment, low on
non-entailment). Results are written after every recipe, and a rerun skips the recipes already in the file.

    python benchmarks/bench_nli_recipe.py --output benchmarks/results/nli_recipe.json
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch

from fastif.config import config_to_dict
from fastif.data.text import TextPairData
from fastif.files import atomic_write_json, atomic_write_text, read_json
from fastif.model.predict import dataset_labels, evaluate_classifier, predict_logits
from fastif.recipes.nli.data import HANS_HEURISTICS, load_embedded, nli_label_scheme
from fastif.recipes.nli.model import NLITrainConfig, train_nli_classifier

GOAL_ACCURACY = 0.70
HANS_PER_SUBCASE = 100

RECIPES: dict[str, dict[str, Any]] = {
    "top2_lr5e-4_1ep (the old default)": {"frozen_layers": 4, "freeze_embeddings": True, "lr": 5e-4, "epochs": 1},
    "top2_lr5e-4_3ep": {"frozen_layers": 4, "freeze_embeddings": True, "lr": 5e-4, "epochs": 3},
    "top4_lr1e-4_1ep": {"frozen_layers": 2, "freeze_embeddings": True, "lr": 1e-4, "epochs": 1},
    "all6_lr5e-5_1ep": {"frozen_layers": 0, "freeze_embeddings": False, "lr": 5e-5, "epochs": 1},
    "all6_lr1e-4_1ep": {"frozen_layers": 0, "freeze_embeddings": False, "lr": 1e-4, "epochs": 1},
    "all6_lr5e-5_2ep": {"frozen_layers": 0, "freeze_embeddings": False, "lr": 5e-5, "epochs": 2},
    "all6_lr1e-4_2ep": {"frozen_layers": 0, "freeze_embeddings": False, "lr": 1e-4, "epochs": 2},
    "all6_lr2e-4_2ep": {"frozen_layers": 0, "freeze_embeddings": False, "lr": 2e-4, "epochs": 2},
    "2-class, the default recipe": {"num_labels": 2},
    "all6_lr1e-4_2ep_2000pairs": {
        "frozen_layers": 0,
        "freeze_embeddings": False,
        "lr": 1e-4,
        "epochs": 2,
        "train_size": 2000,
    },
    "all6_lr1e-4_2ep_4000pairs": {
        "frozen_layers": 0,
        "freeze_embeddings": False,
        "lr": 1e-4,
        "epochs": 2,
        "train_size": 4000,
    },
    "all6_lr1e-4_3ep": {"frozen_layers": 0, "freeze_embeddings": False, "lr": 1e-4, "epochs": 3},
}
"""Recipe name -> NLITrainConfig overrides (the split's 8,001 training pairs; the first runs, before the
default took the whole split, used 8,000, as the results file records)."""


def hans_signature(trained: Any) -> dict[str, dict[str, float]]:
    """Accuracy per HANS heuristic and gold label, on the first ``HANS_PER_SUBCASE`` pairs of each subcase."""
    per_subcase: dict[str, list] = defaultdict(list)
    for record in load_embedded("hans_eval", 2):
        if len(per_subcase[record.extra["subcase"]]) < HANS_PER_SUBCASE:
            per_subcase[record.extra["subcase"]].append(record)
    records = [record for group in per_subcase.values() for record in group]
    data = TextPairData(records, trained.tokenizer, 128, nli_label_scheme(2)[0])
    correct = (predict_logits(trained.model, data).argmax(-1) == dataset_labels(data)).tolist()
    cells: dict[tuple[str, str], list[bool]] = defaultdict(list)
    for record, hit in zip(records, correct, strict=True):
        cells[record.extra["heuristic"], record.label_name].append(hit)
    return {
        heuristic: {
            label: round(sum(cells[heuristic, label]) / len(cells[heuristic, label]), 4)
            for label in nli_label_scheme(2)[0]
        }
        for heuristic in HANS_HEURISTICS
    }


def measure(name: str, overrides: dict[str, Any], cache: Path) -> dict[str, Any]:
    """Train (or load) one recipe and score it on validation, test and, for 2 classes, HANS."""
    config = NLITrainConfig(**overrides)
    load = os.getloadavg()
    start = time.perf_counter()
    trained = train_nli_classifier(config, cache_dir=cache, progress=False)
    names = nli_label_scheme(config.num_labels)[0]
    test = evaluate_classifier(
        trained.model,
        TextPairData(load_embedded("mnli_test", config.num_labels), trained.tokenizer, config.max_length, names),
    )
    result = {
        "config": config_to_dict(config),
        "validation_accuracy": round(trained.metrics["validation_accuracy"], 4),
        "test_accuracy": round(test["accuracy"], 4),
        "train_seconds": round(trained.metrics["train_seconds"], 1),
        "trainable_parameters": trained.metrics["trainable_parameters"],
        "from_cache": trained.from_cache,
        "seconds": round(time.perf_counter() - start, 1),
        "load_average_before": [round(x, 2) for x in load],
    }
    if config.num_labels == 2:
        result["hans"] = hans_signature(trained)
    print(
        f"{name}: validation {result['validation_accuracy']:.3f} · test {result['test_accuracy']:.3f} · "
        f"train {result['train_seconds']:.0f} s",
        flush=True,
    )
    return result


def markdown(results: dict[str, Any]) -> str:
    """The learning curve as a markdown table (and the HANS signature of the 2-class recipes)."""
    lines = [
        "| recipe | classes | trainable parameters | epochs | lr | training pairs | validation | test | train s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, row in results["recipes"].items():
        config = row["config"]
        lines.append(
            f"| {name} | {config['num_labels']} | {row['trainable_parameters'] / 1e6:.1f}M | "
            f"{config['epochs']} | {config['lr']:g} | {config['train_size']} | "
            f"{row['validation_accuracy']:.3f} | {row['test_accuracy']:.3f} | {row['train_seconds']:.0f} |"
        )
    hans = {name: row["hans"] for name, row in results["recipes"].items() if "hans" in row}
    if hans:
        lines += ["", "| 2-class recipe | heuristic | entailment | non-entailment |", "|---|---|---|---|"]
        for name, cells in hans.items():
            for heuristic, accuracy in cells.items():
                lines.append(
                    f"| {name} | {heuristic} | {accuracy['entailment']:.3f} | {accuracy['non-entailment']:.3f} |"
                )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", type=Path, default=Path("fastif-results/bench/nli_recipe.json"))
    parser.add_argument("--cache", type=Path, default=Path("fastif-results/bench/nli_models"))
    parser.add_argument("--only", nargs="*", help="recipe names to run (default: all)")
    args = parser.parse_args()
    results = read_json(args.output) if args.output.is_file() else {}
    results.setdefault("recipes", {})
    results["command"] = "python benchmarks/bench_nli_recipe.py --output " + str(args.output)
    results["machine"] = {
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
    }
    results["goal_accuracy"] = GOAL_ACCURACY
    for name, overrides in RECIPES.items():
        if name in results["recipes"] or (args.only and name not in args.only):
            continue
        results["recipes"][name] = measure(name, overrides, args.cache)
        atomic_write_json(args.output, results)
        atomic_write_text(args.output.with_suffix(".md"), markdown(results))


if __name__ == "__main__":
    main()
