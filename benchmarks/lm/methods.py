"""Attribution methods for the fact-tracing benchmark, every gradient method through the influence facade.

* ``influence-<solver>``: ``∇L(query)ᵀ (H + damping·I)⁻¹ ∇L(doc)`` over the top decoder block(s), the final LayerNorm
  and the LM head (the frozen path: the blocks below run once per document), with H the Gauss-Newton matrix of
  the training objective (PSD, so CG applies) for CG, LiSSA and Arnoldi, and EK-FAC's own Fisher approximation.
* ``gradient-cosine`` (TrackStar-like, without its optimizer-state correction): the identity solver's gradient dot
  products divided by both gradients' norms (the documents' norms from the identity self-influence).
* ``gradient-dot`` (single-checkpoint TracIn): the identity solver's raw dot products.
* ``bm25``: lexical retrieval with the ``bm25s`` package, the query being the prompt and its completion.

Every method gives a score matrix [queries, documents], larger = more responsible.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from fastif import AdapterConfig, Influence
from fastif.data.documents import LMDocuments
from fastif.model.causal_lm import HFCausalLMAdapter
from fastif.solvers import CG, EKFAC, Arnoldi, Identity, LiSSA, Solver

SOLVERS = ("cg", "lissa", "arnoldi", "ekfac")


@dataclass(frozen=True)
class MethodsConfig:
    """The influence set-up: how many top blocks, the damping rule, the Hessian sample, each solver's budget."""

    top_layers: int = 1
    solvers: tuple[str, ...] = SOLVERS
    damping_scale: float = 0.1  # damping = this × the Gauss-Newton's mean eigenvalue (kronfluence's heuristic)
    trace_probes: int = 8
    hessian_examples: int | None = 64  # a seeded subsample of the documents for the Hessian (None = all)
    cg_iterations: int = 20
    cg_tolerance: float = 1e-3
    lissa_depth: int = 100
    lissa_batch_size: int = 8
    arnoldi_rank: int = 50
    seed: int = 0


@dataclass
class Attribution:
    """One method's scores [queries, documents] (larger = more responsible), wall seconds and diagnostics."""

    name: str
    scores: Tensor
    seconds: float
    info: dict[str, Any] = field(default_factory=dict)


def selection(model: nn.Module, top_layers: int) -> AdapterConfig:
    """The top ``top_layers`` GPT-2 blocks, the final LayerNorm and the LM head (its output use alone)."""
    layers = model.config.n_layer
    blocks = tuple(f"transformer.h.{i}" for i in range(layers - top_layers, layers))
    return AdapterConfig(include=(*blocks, "transformer.ln_f", "lm_head"))


def hessian_subset(train: LMDocuments, config: MethodsConfig) -> LMDocuments | None:
    """A seeded subsample of ``hessian_examples`` documents for the Hessian, or None for all of them."""
    if config.hessian_examples is None or config.hessian_examples >= len(train):
        return None
    generator = torch.Generator().manual_seed(config.seed)
    return train.subset(torch.randperm(len(train), generator=generator)[: config.hessian_examples].tolist())


def mean_eigenvalue(influence: Influence, probes: int, seed: int) -> float:
    """Hutchinson's estimate of trace(H) / P, from ``probes`` Rademacher vectors (one batched HVP pass)."""
    generator = torch.Generator().manual_seed(seed)
    dim = influence.flat.numel()
    signs = torch.randint(0, 2, (probes, dim), generator=generator).to(influence.flat) * 2 - 1
    return float((signs * influence.hessian.matvec(signs)).sum(1).mean()) / dim


def build_solver(name: str, damping: float, config: MethodsConfig) -> Solver:
    """The named solver at ``damping`` with this benchmark's budget."""
    if name == "cg":
        return CG(damping=damping, max_iterations=config.cg_iterations, tolerance=config.cg_tolerance)
    if name == "lissa":
        return LiSSA(
            damping=damping, depth=config.lissa_depth, batch_size=config.lissa_batch_size, tail_average=0.5,
            seed=config.seed,
        )  # fmt: skip
    if name == "arnoldi":
        return Arnoldi(damping=damping, rank=config.arnoldi_rank, seed=config.seed)
    if name == "ekfac":
        return EKFAC(damping=damping, seed=config.seed)
    raise ValueError(f"unknown solver {name!r}; known: {SOLVERS}")


def _timed(name: str, run: Callable[[], tuple[Tensor, dict[str, Any]]]) -> Attribution:
    start = time.perf_counter()
    scores, info = run()
    return Attribution(name, scores.detach().double().cpu(), time.perf_counter() - start, info)


def _solver_info(info: dict[str, Any]) -> dict[str, Any]:
    """The JSON-able scalars of a solver's diagnostics (residuals, iterations), not its traces."""
    return {key: value for key, value in info.items() if isinstance(value, int | float | str | bool)}


def influence_methods(
    model: nn.Module, train: LMDocuments, queries: LMDocuments, config: MethodsConfig, log: Any = print
) -> tuple[list[Attribution], dict[str, Any]]:
    """Influence with each configured solver, gradient cosine and gradient dot; plus the set-up they shared."""
    adapter = HFCausalLMAdapter(model, selection(model, config.top_layers), reduction="sum")
    hessian_data = hessian_subset(train, config)

    def facade(solver: Solver) -> Influence:
        return Influence(adapter, train, solver=solver, hessian_kind="gauss-newton", hessian_data=hessian_data)

    scout = facade(Identity())
    start = time.perf_counter()
    damping = config.damping_scale * mean_eigenvalue(scout, config.trace_probes, config.seed)
    setup = {
        "parameters": adapter.num_params,
        "selected": list(adapter.names),
        "frozen_path": scout.split is not None,
        "damping": damping,
        "damping_seconds": time.perf_counter() - start,
        "hessian_examples": len(hessian_data) if hessian_data is not None else len(train),
    }
    log(f"  {adapter.num_params} parameters, damping {damping:.3g}, frozen path {setup['frozen_path']}")
    results = list(identity_methods(scout, queries))
    log(f"  gradient-cosine and gradient-dot: {results[0].seconds:.1f}s")
    for name in config.solvers:
        influence = facade(build_solver(name, damping, config))

        def run(influence: Influence = influence) -> tuple[Tensor, dict[str, Any]]:
            found = influence.candidate_scores(queries)
            return found.scores, {**_solver_info(found.solve.info), **found.timings}

        results.append(_timed(f"influence-{name}", run))
        log(f"  influence-{name}: {results[-1].seconds:.1f}s")
    return results, setup


def identity_methods(influence: Influence, queries: LMDocuments) -> tuple[Attribution, Attribution]:
    """Gradient cosine and gradient dot products, from one identity-solver pass and the documents' self-influence."""
    start = time.perf_counter()
    found = influence.candidate_scores(queries)
    dot_seconds = time.perf_counter() - start
    document_norms = influence.self_influence().clamp_min(0).sqrt()
    query_norms = found.solve.x.norm(dim=1)  # the identity's s_test is the query's gradient
    cosine = found.scores / document_norms[None] / query_norms[:, None]
    return (
        Attribution("gradient-cosine", cosine.double(), time.perf_counter() - start, dict(found.timings)),
        Attribution("gradient-dot", found.scores.double(), dot_seconds, dict(found.timings)),
    )


def bm25_scores(documents: list[str], queries: list[str]) -> Attribution:
    """BM25 (``bm25s``, English stop words removed) of every document for every query text."""
    import bm25s

    start = time.perf_counter()
    retriever = bm25s.BM25()
    retriever.index(bm25s.tokenize(documents, stopwords="en", show_progress=False), show_progress=False)
    tokens = bm25s.tokenize(queries, stopwords="en", show_progress=False)
    found, values = retriever.retrieve(tokens, k=len(documents), show_progress=False)
    scores = torch.zeros(len(queries), len(documents), dtype=torch.float64)
    scores.scatter_(1, torch.as_tensor(found, dtype=torch.long), torch.as_tensor(values, dtype=torch.float64))
    return Attribution("bm25", scores, time.perf_counter() - start)


def rankings(scores: Tensor) -> list[list[int]]:
    """Per query, every document index from the highest score down (ties by index)."""
    return torch.sort(-scores, dim=1, stable=True).indices.tolist()
