"""``fastif influence --task causal-lm``: which training documents made a causal language model complete a prompt
as it does. A thin command over the :class:`~fastif.influence.Influence` facade: the classification pipeline
(labels, predictions, NLI recipes) does not apply to language models, so this command loads the LM, its corpus
and the queries itself, and prints each query's most helpful and most harmful documents with the span of tokens
that drove each score (the window of highest, or lowest, per-token score).
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..config import check_number, save_config
from ..errors import ConfigError, DataError
from .options import KEY_PREFIX, _flags_by_key

TASKS = ("classification", "causal-lm")
LM_DAMPING = 0.01
"""The command's damping default: the Gauss-Newton matrix is PSD but rank-deficient (far more parameters than
documents), so a small absolute damping makes it invertible. Not tuned; set --damping for your model's scale."""
RESULTS_FILE = "causal_lm_influence.json"
USED_KEYS = {
    "model.model": "model",
    "data.train": "train",
    "data.max_length": "max_length",
    "parameters.include": "include",
    "parameters.top_layers": "top_layers",
    "parameters.l2": "l2",
    "parameters.frozen": "frozen",
    "solver.method": "solver",
    "solver.damping": "damping",
    "scoring.top_k": "top_k",
    "candidates.count": "candidates",
    "output.folder": "output",
    "output.overwrite": "overwrite",
    "device": "device",
}
"""The pipeline options this task reads (config key -> :class:`CausalLMConfig` field); any other is refused."""


@dataclass(frozen=True)
class CausalLMConfig:
    """One causal-LM influence run: model folder, training corpus (JSONL), queries (one prompt + completion, or a
    JSONL of them), parameter selection (default: the top ``top_layers`` decoder layers, final norm and LM head),
    solver, and what to show. Saved as ``causal_lm_config.json`` beside the results."""

    model: str
    train: str
    prompt: str | None = None
    completion: str | None = None
    queries: str | None = None
    include: tuple[str, ...] = ()
    top_layers: int = 1
    l2: float = 0.0
    frozen: str = "auto"
    solver: str = "cg"
    damping: float = LM_DAMPING
    hessian: str = "gauss-newton"
    top_k: int = 5
    candidates: int | None = None
    max_length: int = 128
    loss_on: str = "completion"
    reduction: str = "sum"
    span: int = 4
    output: str | None = None
    overwrite: bool = False
    device: str = "cpu"

    def __post_init__(self) -> None:
        """Refuse out-of-range numbers, unknown choices and a missing or doubled query source."""
        for key, minimum in (("top_layers", 0), ("top_k", 1), ("max_length", 2), ("span", 1)):
            check_number(key, getattr(self, key), integer=True, minimum=minimum)
        check_number("candidates", self.candidates, integer=True, minimum=1, optional=True)
        check_number("damping", self.damping, minimum=0.0)
        check_number("l2", self.l2, minimum=0.0)
        for key, choices in (
            ("frozen", ("auto", "on", "off")),
            ("hessian", ("hessian", "gauss-newton")),
            ("loss_on", ("completion", "all")),
            ("reduction", ("sum", "mean")),
        ):
            if getattr(self, key) not in choices:
                raise ConfigError(f"{key} must be one of {choices}, got {getattr(self, key)!r}", key)
        pair = (self.prompt is not None, self.completion is not None)
        if pair[0] != pair[1]:
            raise ConfigError("give --prompt and --completion together (the completion is what is explained)")
        if pair[0] == (self.queries is not None):
            raise ConfigError("give either --prompt and --completion, or --queries FILE.jsonl (one of the two)")


def add_causal_lm_options(parser: argparse.ArgumentParser) -> None:
    """The ``influence`` command's language-model options (``--task causal-lm`` and what only it reads)."""
    group = parser.add_argument_group("language models (--task causal-lm)")
    group.add_argument(
        "--task", choices=TASKS, default="classification", help="what the model does (default: %(default)s)"
    )
    group.add_argument("--prompt", default=None, help="the query's prompt (no loss on it)")
    group.add_argument("--completion", default=None, help="the query's completion: whose loss is explained")
    group.add_argument("--queries", default=None, help="a JSONL file of queries: prompt + completion objects")
    group.add_argument(
        "--loss-on",
        choices=("completion", "all"),
        default="completion",
        help="training documents' loss on completion tokens or all (a 'text' document: all; default: %(default)s)",
    )
    group.add_argument("--reduction", choices=("sum", "mean"), default="sum", help="token losses summed or averaged")
    group.add_argument(
        "--hessian",
        choices=("gauss-newton", "hessian"),
        default="gauss-newton",
        help="curvature inverted (default: %(default)s, PSD on a non-convex LM)",
    )
    group.add_argument("--span", type=int, default=4, help="tokens in the shown span of each document (default: 4)")


def causal_lm_config(args: argparse.Namespace) -> CausalLMConfig:
    """The run's config from the parsed options; an option of the classification pipeline that this task does
    not read is refused, naming it."""
    if args.config is not None:
        raise ConfigError("--config configures the classification pipeline; give --task causal-lm's options directly")
    given = {key.removeprefix(KEY_PREFIX): value for key, value in vars(args).items() if key.startswith(KEY_PREFIX)}
    unused = sorted(set(given) - set(USED_KEYS))
    if unused:
        flags = _flags_by_key()
        raise ConfigError(f"{', '.join(flags.get(key, key) for key in unused)} not used with --task causal-lm")
    for key in ("model.model", "data.train"):
        if key not in given:
            raise ConfigError(f"--task causal-lm needs {_flags_by_key()[key]}")
    values: dict[str, Any] = {USED_KEYS[key]: value for key, value in given.items()}
    for name in ("prompt", "completion", "queries", "loss_on", "reduction", "hessian", "span"):
        values[name] = getattr(args, name)
    if values.get("output") is not None:
        values["output"] = str(values["output"])
    return CausalLMConfig(**values)


def _solver(config: CausalLMConfig) -> Any:
    from ..solvers import SOLVERS

    if config.solver not in SOLVERS:
        raise ConfigError(f"--solver must be one of {sorted(SOLVERS)}, got {config.solver!r}")
    solver = SOLVERS[config.solver]
    fields = {field.name for field in dataclasses.fields(solver.config_class)}
    return solver(**({"damping": config.damping} if "damping" in fields else {}))


def _load(config: CausalLMConfig) -> tuple[Any, Any, Any]:
    """The adapter, training corpus and queries of a run."""
    from ..data.documents import LMDocuments
    from ..model.adapter import AdapterConfig
    from ..model.causal_lm import HFCausalLMAdapter, top_decoder_parameters
    from ..model.hf import load_causal_lm, load_tokenizer
    from ..pipeline.core import resolve_device

    tokenizer = load_tokenizer(config.model)
    model = load_causal_lm(config.model).to(resolve_device(config.device))
    include = config.include or top_decoder_parameters(model, config.top_layers)
    adapter = HFCausalLMAdapter(model, AdapterConfig(include=include, l2=config.l2), config.reduction)
    train = LMDocuments.from_jsonl(config.train, tokenizer, config.max_length, config.loss_on)
    if config.queries is not None:
        queries = LMDocuments.from_jsonl(config.queries, tokenizer, config.max_length, "completion")
    else:
        record = {"prompt": config.prompt, "completion": config.completion}
        queries = LMDocuments(tokenizer, [record], config.max_length, "completion")
    if any("text" in record for record in queries.records):
        raise DataError(f"{config.queries}: every query needs a 'prompt' and a 'completion' (not 'text')")
    return adapter, train, queries


def _documents(adapter: Any, train: Any, indices: torch.Tensor, scores: torch.Tensor, s_test: torch.Tensor,
               span: int, helpful: bool) -> list[dict[str, Any]]:  # fmt: skip
    """Ranked documents with their driving spans (per-token scores along ``s_test``, on the full model)."""
    from ..model.causal_lm import driving_span

    order = indices.tolist()
    tokens = adapter.token_scores(adapter.flat_params(), train.batch(order), s_test)
    rows = []
    for rank, (index, score) in enumerate(zip(order, scores.tolist(), strict=True), start=1):
        length = train.lengths[index]
        start, end = driving_span(tokens[rank - 1, 1:length], span, helpful)  # position 0 never carries a loss
        pieces = train.tokens(index)[start + 1 : end + 1]
        rows.append(
            {
                "rank": rank,
                "train_index": index,
                "id": train.records[index].get("id", index),
                "score": score,
                "text": train.texts(index),
                "span": " ".join(piece.strip() for piece in pieces),
                "span_tokens": [start + 1, end + 1],
                "span_score": float(tokens[rank - 1, start + 1 : end + 1].sum()),
            }
        )
    return rows


def explain(config: CausalLMConfig) -> list[dict[str, Any]]:
    """Each query's top-k helpful and harmful training documents, with spans, through the Influence facade."""
    from ..influence import Influence

    adapter, train, queries = _load(config)
    influence = Influence(adapter, train, _solver(config), frozen=config.frozen, hessian_kind=config.hessian)
    k = min(config.top_k, len(train) if config.candidates is None else config.candidates)
    results = []
    for i in range(len(queries)):
        query = queries.subset([i])
        found = influence.candidate_scores(query, config.candidates)
        top = found.top_k(k)
        s_test = found.solve.x[0]
        with torch.no_grad():
            loss = float(adapter.per_example_loss(adapter.flat_params(), query.batch([0]))[0])
        results.append(
            {
                "query": i,
                "prompt": query.records[0]["prompt"],
                "completion": query.records[0]["completion"],
                "loss": loss,
                "helpful": _documents(adapter, train, top.helpful_indices[0], top.helpful_scores[0], s_test,
                                      config.span, True),
                "harmful": _documents(adapter, train, top.harmful_indices[0], top.harmful_scores[0], s_test,
                                      config.span, False),
            }
        )  # fmt: skip
    return results


def format_results(results: list[dict[str, Any]]) -> str:
    """The results as text: per query, its loss, then the helpful and harmful documents with their spans."""
    lines = ["score > 0 = helpful (removing the document is predicted to raise the completion's loss)"]
    for result in results:
        lines.append(f"\nquery {result['query']}: {result['prompt']!r} -> {result['completion']!r} "
                     f"(loss {result['loss']:.3f})")  # fmt: skip
        for side in ("helpful", "harmful"):
            lines.append(f"  most {side}:")
            for row in result[side]:
                text = row["text"] if len(row["text"]) <= 90 else row["text"][:87] + "..."
                lines.append(f"    {row['rank']:>2}. {row['score']:+.3e}  doc {row['id']}: {text}")
                lines.append(f"        span: {row['span']!r} ({row['span_score']:+.2e})")
    return "\n".join(lines)


def run_causal_lm(args: argparse.Namespace) -> int:
    """``fastif influence --task causal-lm``: explain, print, and write the results where --output says."""
    from ..files import atomic_write_json, check_fresh, check_writable

    config = causal_lm_config(args)
    if config.output is not None:
        check_writable(config.output)
        check_fresh(config.output, RESULTS_FILE, config.overwrite)
    results = explain(config)
    print(format_results(results))
    if config.output is not None:
        save_config(config, Path(config.output) / "causal_lm_config.json")
        print(f"\nwrote {atomic_write_json(Path(config.output) / RESULTS_FILE, results)}")
    return 0
