"""Fact-tracing metrics, as TrackStar and bergson report them: MRR and Recall@k of the documents that hold each
query's fact, and the tail-patch check (one SGD step on a method's top-k documents, then the change in the
completion's log-probability)."""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad

Batch = dict[str, Tensor]


def reciprocal_rank(ranking: Sequence[int], relevant: Sequence[int]) -> float:
    """1 / (1 + position of the first relevant document in ``ranking``); 0 when none is ranked."""
    wanted = set(relevant)
    return next((1.0 / (position + 1) for position, doc in enumerate(ranking) if doc in wanted), 0.0)


def recall_at_k(ranking: Sequence[int], relevant: Sequence[int], k: int = 10) -> float:
    """The fraction of the relevant documents found among the first ``k`` of ``ranking``."""
    if not relevant:
        raise ValueError("recall needs at least one relevant document")
    return len(set(ranking[:k]) & set(relevant)) / len(set(relevant))


def tracing_metrics(rankings: Sequence[Sequence[int]], relevant: Sequence[Sequence[int]], k: int = 10) -> dict:
    """Mean reciprocal rank and mean Recall@k over queries (one ranking and one relevant set per query)."""
    if len(rankings) != len(relevant):
        raise ValueError(f"{len(rankings)} rankings for {len(relevant)} relevant sets")
    ranks = [reciprocal_rank(r, s) for r, s in zip(rankings, relevant, strict=True)]
    recalls = [recall_at_k(r, s, k) for r, s in zip(rankings, relevant, strict=True)]
    return {"mrr": statistics.fmean(ranks), f"recall@{k}": statistics.fmean(recalls)}


def summary(values: Sequence[float]) -> dict[str, float]:
    """Mean, standard deviation, standard error, median and the fraction above zero of per-query values."""
    values = list(values)
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return {
        "mean": statistics.fmean(values),
        "std": spread,
        "sem": spread / math.sqrt(len(values)),
        "median": statistics.median(values),
        "fraction_positive": sum(v > 0 for v in values) / len(values),
    }


def sequence_logprob(model: nn.Module, params: dict[str, Tensor], batch: Batch) -> Tensor:
    """Per row, the summed log-probability [B] of the tokens whose label is not -100 (next-token shifted)."""
    logits = functional_call(
        model, params, (), {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    )
    logits = logits.logits[:, :-1]
    labels = batch["labels"][:, 1:]
    token = -nn.functional.cross_entropy(logits.transpose(1, 2), labels.clamp_min(0), reduction="none")
    return (token * (labels != -100)).sum(1)


def mean_token_loss(model: nn.Module, params: dict[str, Tensor], batch: Batch) -> Tensor:
    """The language-modelling loss of a batch: the mean over its labelled tokens (what training minimised)."""
    return -sequence_logprob(model, params, batch).sum() / (batch["labels"][:, 1:] != -100).sum()


def tail_patch_gain(model: nn.Module, documents: Batch, query: Batch, lr: float) -> Tensor:
    """The change in each query row's completion log-probability [Q] after one SGD step of rate ``lr`` on the mean
    token loss of ``documents``, over all of the model's parameters (the model itself is left unchanged)."""
    params = {name: p.detach() for name, p in model.named_parameters()}
    with torch.no_grad():
        before = sequence_logprob(model, params, query)
    step = grad(lambda p: mean_token_loss(model, p, documents))(params)
    moved = {name: value - lr * step[name] for name, value in params.items()}
    with torch.no_grad():
        return sequence_logprob(model, moved, query) - before


def tail_patch(
    model: nn.Module, collate: Any, rankings: Sequence[Sequence[int]], queries: Sequence[Batch], lr: float, k: int = 10
) -> list[float]:
    """Per query, the tail-patch gain of stepping on its top-``k`` documents (``collate(indices) -> Batch``)."""
    return [
        float(tail_patch_gain(model, collate(list(ranking[:k])), query, lr)[0])
        for ranking, query in zip(rankings, queries, strict=True)
    ]
