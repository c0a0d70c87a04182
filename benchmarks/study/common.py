"""Shared set-up of the speed/quality study (issue 3, part 6): the embedded NLI model on the core frozen-bottom path,
the facade over it, test-point selection, spectrum, timing and results files.

Influence is taken over the **pooler + classifier** of the embedded 3-class MiniLM NLI model (148,995 parameters;
FastIF took BERT's top two layers + pooler + classifier). Everything below the pooler does not depend on those
parameters, so the core frozen-bottom path (:mod:`fastif.model.frozen`, ``Influence(..., frozen="on")``) computes the
[CLS] hidden state that the pooler reads once per example (one no-grad forward, kept in a
:class:`~fastif.store.Store` under the cache root) and every gradient, HVP and score runs on the model's own pooler and
classifier alone. :func:`equivalence_check` verifies that its per-example gradients equal those of
``HFClassifierAdapter(include=(pooler, classifier))`` on the full model. The parts score through the facade
(:meth:`Setup.facade`: ``candidate_scores`` / ``solve`` / ``score_s_test``).
"""

from __future__ import annotations

import json
import os
import platform
import shlex
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from fastif import AdapterConfig, HFClassifierAdapter, Influence, ScoreConfig
from fastif.candidates import CandidateIndex
from fastif.errors import StoreError
from fastif.files import atomic_write_json, cache_dir
from fastif.fingerprint import fingerprint_parameters
from fastif.grads import per_example_grads
from fastif.hvp import Hessian
from fastif.model.adapter import ModelAdapter
from fastif.model.frozen import ActivationData
from fastif.model.hf import L2_EXCLUDE
from fastif.solvers import Solver
from fastif.store import Store
from fastif.store.artifacts import index_cache_folder

RESULTS = Path(__file__).resolve().parent / "results"


# ---------------------------------------------------------------------------------------------- environment


def environment() -> dict[str, Any]:
    """Where and how a result was produced: command, load average, cores, threads, versions, time."""
    return {
        "command": "python " + " ".join(shlex.quote(a) for a in sys.argv),
        "loadavg_1_5_15": list(os.getloadavg()),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


def write_results(path: Path, results: dict[str, Any]) -> None:
    """Write a results JSON atomically, stamping the load average at the end of the run."""
    results = {**results, "loadavg_at_end": list(os.getloadavg())}
    atomic_write_json(path, results)


class Timer:
    """Accumulating wall-clock timer: ``with timer: ...`` adds the block's seconds to ``timer.seconds``."""

    def __init__(self) -> None:
        self.seconds = 0.0

    def __enter__(self) -> Timer:
        self._start = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.seconds += time.perf_counter() - self._start


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    """``(fn(), seconds)``."""
    start = time.perf_counter()
    value = fn()
    return value, time.perf_counter() - start


# ---------------------------------------------------------------------------------------------- the set-up


def influence_parameters(model: nn.Module) -> tuple[str, str]:
    """The study's parameters: the pooler and the classifier (module prefixes)."""
    names = [name for name, _ in model.named_parameters()]
    pooler = next(name.rsplit(".dense.", 1)[0] for name in names if name.endswith("pooler.dense.weight"))
    return pooler, "classifier"


def full_adapter(model: nn.Module, l2: float) -> HFClassifierAdapter:
    """The HF model's adapter over pooler + classifier; objective = mean CE + (l2/2)·‖weights‖² (the one L2 rule)."""
    return HFClassifierAdapter(model, AdapterConfig(include=influence_parameters(model), l2=l2, l2_exclude=L2_EXCLUDE))


@dataclass
class Setup:
    """Everything the study parts share: model, texts, the frozen path's head adapter and cached activations, the
    kNN index over the training features (from the same pass), predictions."""

    model: nn.Module
    train_text: Any  # TextPairData over the influence training split
    test_text: Any  # TextPairData over the MNLI test split
    adapter: ModelAdapter  # the frozen path's working adapter: pooler + classifier on the cached [CLS] state
    train: ActivationData
    test: ActivationData
    index: CandidateIndex
    l2: float
    predictions: Tensor  # [M] predicted labels on the test split
    info: dict[str, Any]

    @property
    def n_train(self) -> int:
        return len(self.train)

    def test_subset(self, indices: Sequence[int]) -> ActivationData:
        """The test points ``indices`` with their cached activations."""
        return self.test.subset(list(indices))

    def hessian(self, batch_size: int = 1024) -> Hessian:
        """The training objective's Hessian over the head's parameters and all N training points."""
        return Hessian(self.adapter, self.train, self.adapter.flat_params(), batch_size)

    def facade(self, solver: Solver | None = None, score: ScoreConfig | None = None) -> Influence:
        """The facade over the cached head with ``solver`` and ``score`` (Hessian batches of 1,024), sharing the
        set-up's kNN index: every part's s_test, candidates and scores go through it."""
        influence = Influence(self.adapter, self.train, solver, score, hessian_batch_size=1024)
        influence.build_index(self.index)
        return influence


def _open_waiting(folder: Path, identity: dict[str, Any], wait_seconds: float = 3600.0) -> Store:
    """The study's store, waiting while another part holds its lock: parts started together share one pass."""
    deadline = time.monotonic() + wait_seconds
    while True:
        try:
            return Store.open(folder, **identity)
        except StoreError as error:
            if not str(error).startswith("another fastif run") or time.monotonic() > deadline:
                raise
            time.sleep(5.0)


def _frozen_path(model: nn.Module, train_text: Any, l2: float) -> tuple[Influence, bool, float]:
    """The core frozen path over ``train_text`` (``frozen="on"``), its one pass kept in a Store under the cache root
    (keyed by the model's weights and the tokenised data); returns it, whether the pass was loaded, and its seconds."""
    adapter = full_adapter(model, l2)
    identity = {
        "model_fingerprint": fingerprint_parameters(dict(model.state_dict())),
        "data_fingerprint": train_text.fingerprint(),
        "config": {"parameters": list(adapter.names)},
    }
    with _open_waiting(index_cache_folder(identity, cache_dir("study")), identity) as store:
        influence = Influence(adapter, train_text, frozen="on", cache=store)
        loaded, seconds = timed(influence.cached_training_pass)
    return influence, loaded, seconds


def load_setup(
    n_train: int = 4000,
    n_test: int = 400,
    model: nn.Module | None = None,
    tokenizer: Any = None,
    l2: float | None = None,
) -> Setup:
    """The study set-up on the first ``n_train`` pairs of the embedded MNLI train split (the model's own training
    data) and the first ``n_test`` pairs of the MNLI test split (the pool test points are drawn from). Without
    ``model`` the embedded NLI model is trained, or loaded from its cache."""
    from fastif.data.text import TextPairData
    from fastif.recipes.nli import NLITrainConfig, load_embedded, train_nli_classifier

    info: dict[str, Any] = {}
    if model is None:
        trained, seconds = timed(lambda: train_nli_classifier(NLITrainConfig(), progress=False))
        model, tokenizer, l2 = trained.model, trained.tokenizer, trained.config.l2
        info.update(model_path=str(trained.path), model_metrics=trained.metrics, model_load_seconds=seconds)
    model.eval()
    l2 = float(l2 or 0.0)
    train_text = TextPairData(load_embedded("mnli_train")[:n_train], tokenizer)
    test_text = TextPairData(load_embedded("mnli_test")[:n_test], tokenizer)
    influence, loaded, t_train = _frozen_path(model, train_text, l2)
    test, t_test = timed(lambda: influence.prepare(test_text).data)
    info.update(
        cache_seconds_train=None if loaded else t_train, train_pass_from_cache=loaded, cache_seconds_test=t_test
    )
    adapter = influence.work_adapter
    flat = adapter.flat_params()
    with torch.no_grad():
        predictions = adapter.outputs(flat, test.batch(range(len(test)))).argmax(-1)
    info.update(
        n_train=n_train,
        n_test=len(test_text),
        parameters=adapter.num_params,
        parameter_names=adapter.names,
        l2=l2,
        test_accuracy=float((predictions == test_text.labels).float().mean()),
    )
    index, info["index_build_seconds"] = timed(influence.build_index)
    return Setup(model, train_text, test_text, adapter, influence.train_view, test, index, l2, predictions, info)


def equivalence_check(setup: Setup, n: int = 4) -> float:
    """Max relative difference between the frozen path's per-example gradients and the full HF model's (pooler +
    classifier selected), on the first ``n`` training pairs: the cache must change nothing."""
    full = full_adapter(setup.model, setup.l2)
    indices = list(range(n))
    reference = per_example_grads(full, full.flat_params(), setup.train_text.batch(indices))
    cached = per_example_grads(setup.adapter, setup.adapter.flat_params(), setup.train.batch(indices))
    return float((reference - cached).norm() / reference.norm())


def pick_test_points(setup: Setup, n_correct: int, n_wrong: int, seed: int = 0) -> tuple[list[int], list[bool]]:
    """``n_correct`` correctly and ``n_wrong`` wrongly predicted test indices, seeded; returns (indices, correct)."""
    rng = np.random.default_rng(seed)
    correct = (setup.predictions == setup.test_text.labels).numpy()
    right = rng.choice(np.flatnonzero(correct), size=n_correct, replace=False)
    wrong = rng.choice(np.flatnonzero(~correct), size=n_wrong, replace=False)
    indices = [int(i) for i in np.concatenate([right, wrong])]
    return indices, [True] * n_correct + [False] * n_wrong


# ---------------------------------------------------------------------------------------------- spectrum


def hessian_extremes(hessian: Hessian, tolerance: float = 1e-3, seed: int = 0) -> dict[str, float]:
    """Largest and smallest (algebraic) eigenvalues of the full training Hessian by Lanczos (scipy ``eigsh``)."""
    from scipy.sparse.linalg import LinearOperator, eigsh

    dtype = hessian.flat.dtype
    calls = [0]

    def matvec(x: np.ndarray) -> np.ndarray:
        calls[0] += 1
        vector = torch.as_tensor(np.asarray(x).reshape(-1), dtype=dtype)
        return hessian.matvec(vector).double().numpy()

    operator = LinearOperator((hessian.dim, hessian.dim), matvec=matvec, dtype=np.float64)
    start = np.random.default_rng(seed).standard_normal(hessian.dim)
    top = float(eigsh(operator, k=1, which="LA", tol=tolerance, v0=start, return_eigenvectors=False)[0])
    bottom = float(eigsh(operator, k=1, which="SA", tol=tolerance, v0=start, return_eigenvectors=False)[0])
    return {"max": top, "min": bottom, "matvecs": calls[0]}


def relative_error(estimate: Tensor, reference: Tensor) -> np.ndarray:
    """Per-row ‖estimate − reference‖ / ‖reference‖."""
    return ((estimate - reference).norm(dim=1) / reference.norm(dim=1)).numpy()


def load_json(path: Path) -> dict[str, Any]:
    """Read a results JSON."""
    return json.loads(Path(path).read_text())


# ---------------------------------------------------------------------------------------------- LiSSA snapshots


def chain_snapshots(
    lissa: Any, vectors: Tensor, repeat: int, checkpoints: Sequence[int], tail_average: float = 0.0
) -> dict[str, Any]:
    """One LiSSA chain (number ``repeat``, exactly :meth:`fastif.solvers.LiSSA.run_chain`'s recursion and batch
    draws) read out at every depth J in ``checkpoints``: a chain of depth J is the first J steps of a longer one.

    Returns ``last`` / ``tail`` {J: estimate [k, P]} (last iterate; mean of the last ``tail_average``·J iterates)
    and ``seconds`` {J: wall time of the first J steps}.
    """
    hessian, scale = lissa._fitted(), lissa.scale
    rng = np.random.default_rng((lissa.config.seed, repeat))
    decay = 1.0 - lissa.config.damping / scale
    windows = {j: j - max(1, round(tail_average * j)) for j in checkpoints}
    sums = {j: torch.zeros_like(vectors) for j in checkpoints}
    last: dict[int, Tensor] = {}
    tail: dict[int, Tensor] = {}
    seconds: dict[int, float] = {}
    estimate = vectors.clone()
    start = time.perf_counter()
    for step in range(max(checkpoints)):
        product = hessian.batch_matvec(estimate, lissa._draw(rng, hessian.num_examples))
        estimate = vectors + decay * estimate - product / scale
        if not bool(torch.isfinite(estimate).all()):
            raise FloatingPointError(f"LiSSA chain {repeat} diverged at step {step + 1}")
        for j, first in windows.items():
            if first <= step < j:
                sums[j] += estimate
        if step + 1 in windows:
            seconds[step + 1] = time.perf_counter() - start
            last[step + 1] = estimate / scale
            tail[step + 1] = sums[step + 1] / ((step + 1 - windows[step + 1]) * scale)
    return {"last": last, "tail": tail, "seconds": seconds}


# ---------------------------------------------------------------------------------------------- multi-shift CG


def lanczos_solves(
    hessian: Hessian, vectors: Tensor, dampings: Sequence[float], iterations: int
) -> dict[float, dict[str, Any]]:
    """``(H + λI)⁻¹ v`` for every damping λ from **one** Lanczos run per row of ``vectors`` [k, P] (full
    reorthogonalisation): the Krylov space of ``H`` is that of ``H + λI``, so this equals CG for each λ after
    ``iterations`` steps, at the cost of one. Returns per λ the solutions [k, P], the relative residuals [k] and
    whether ``H + λI`` is positive definite on the Krylov space (its smallest Ritz value + λ > 0)."""
    k = vectors.shape[0]
    norms = vectors.norm(dim=1)
    basis = [vectors / norms[:, None]]
    alphas: list[Tensor] = []
    betas: list[Tensor] = []
    for j in range(iterations):
        product = hessian.matvec(basis[j])
        alphas.append((product * basis[j]).sum(dim=1))
        stack = torch.stack(basis, dim=1)  # [k, j+1, P]
        for _ in range(2):
            product = product - torch.einsum("kj,kjp->kp", torch.einsum("kjp,kp->kj", stack, product), stack)
        beta = product.norm(dim=1)
        betas.append(beta)
        if j + 1 < iterations:
            basis.append(product / beta[:, None].clamp_min(1e-30))
    stack = torch.stack(basis, dim=1)
    out: dict[float, dict[str, Any]] = {}
    for damping in dampings:
        solutions, residuals, definite = [], [], []
        for row in range(k):
            alpha = torch.stack([a[row] for a in alphas]).double()
            beta = torch.stack([b[row] for b in betas]).double()
            tridiagonal = torch.diag(alpha) + torch.diag(beta[:-1], 1) + torch.diag(beta[:-1], -1)
            ritz = torch.linalg.eigvalsh(tridiagonal)
            definite.append(bool(ritz.min() + damping > 0))
            rhs = torch.zeros(len(alpha), dtype=torch.float64)
            rhs[0] = float(norms[row])
            coefficients = torch.linalg.solve(tridiagonal + damping * torch.eye(len(alpha), dtype=torch.float64), rhs)
            residuals.append(float(beta[-1] * coefficients[-1].abs() / norms[row]))
            solutions.append(coefficients.to(stack.dtype) @ stack[row])
        out[damping] = {
            "x": torch.stack(solutions).to(vectors.dtype),
            "relative_residual": residuals,
            "positive_definite": definite,
        }
    return out
