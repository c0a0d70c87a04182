"""Shared set-up of the speed/quality study (issue 3, part 6): the embedded NLI model, its frozen-bottom cache, the
influence head, test-point selection, spectrum, timing and results files.

Influence is taken over the **pooler + classifier** of the embedded 3-class MiniLM NLI model (148,995 parameters;
FastIF took BERT's top two layers + pooler + classifier). Everything below the pooler does not depend on those
parameters, so the [CLS] hidden state that the pooler reads is computed once per example (a no-grad forward of the
whole model) and cached; every gradient, HVP and score then runs on :class:`PoolerHead`, which holds the *same*
parameter tensors as the HF model. :func:`equivalence_check` verifies that its per-example gradients equal those
of ``HFClassifierAdapter(include=(pooler, classifier))`` on the full model.
"""

from __future__ import annotations

import hashlib
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

from fastif import AdapterConfig, HFClassifierAdapter, TensorData, TorchAdapter
from fastif.data import iter_batches
from fastif.files import atomic_write_json
from fastif.grads import per_example_grads
from fastif.hvp import Hessian

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


# ---------------------------------------------------------------------------------------------- the head


class PoolerHead(nn.Module):
    """``classifier(tanh(pooler(h_cls)))``: the part of a BERT classifier above the [CLS] hidden state (eval mode).

    ``pooler`` and ``classifier`` are the HF model's own modules (shared tensors), so editing one edits the other.
    """

    def __init__(self, pooler: nn.Linear, classifier: nn.Linear) -> None:
        super().__init__()
        self.pooler = pooler
        self.classifier = classifier

    def pooled(self, hidden: Tensor) -> Tensor:
        """The pooled [CLS] vector: the classifier's input and FastIF's kNN feature."""
        return torch.tanh(self.pooler(hidden))

    def forward(self, hidden: Tensor) -> Tensor:
        return self.classifier(self.pooled(hidden))


def cross_entropy(logits: Tensor, labels: Tensor) -> Tensor:
    """Per-example cross-entropy (no reduction)."""
    return nn.functional.cross_entropy(logits, labels, reduction="none")


def head_adapter(head: PoolerHead, l2: float) -> TorchAdapter:
    """Adapter over the head's parameters; objective = mean CE + (l2/2)·‖weights‖² (biases excluded, as trained)."""
    return TorchAdapter(
        head,
        cross_entropy,
        AdapterConfig(l2=l2, l2_exclude=("*.bias",)),
        feature_fn=lambda model, hidden: model.pooled(hidden),
    )


@torch.no_grad()
def cls_hidden_states(model: nn.Module, data: Any, batch_size: int = 64) -> Tensor:
    """Last-layer [CLS] hidden state [n, d] of every example (what the pooler reads), batched by length."""
    model.eval()
    lengths = getattr(data, "lengths", None)
    order = sorted(range(len(data)), key=lambda i: lengths[i]) if lengths is not None else list(range(len(data)))
    out: Tensor | None = None
    for chunk, batch in iter_batches(data, batch_size, order):
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        hidden = model.base_model(**inputs).last_hidden_state[:, 0]
        if out is None:
            out = torch.empty(len(data), hidden.shape[1], dtype=hidden.dtype)
        out[torch.as_tensor(chunk)] = hidden
    assert out is not None
    return out


# ---------------------------------------------------------------------------------------------- the set-up


@dataclass
class Setup:
    """Everything the study parts share: model, texts, cached hidden states, head, adapter, predictions."""

    model: nn.Module
    train_text: Any  # TextPairData over the influence training split
    test_text: Any  # TextPairData over the MNLI test split
    train: TensorData  # (hidden [N, d], labels [N])
    test: TensorData  # (hidden [M, d], labels [M])
    head: PoolerHead
    adapter: TorchAdapter
    l2: float
    predictions: Tensor  # [M] predicted labels on the test split
    info: dict[str, Any]

    @property
    def n_train(self) -> int:
        return len(self.train)

    def test_subset(self, indices: Sequence[int]) -> TensorData:
        """The test points ``indices`` as a dataset of cached hidden states."""
        return self.test.subset(list(indices))

    def hessian(self, batch_size: int = 1024) -> Hessian:
        """The training objective's Hessian over the head's parameters and all N training points."""
        return Hessian(self.adapter, self.train, self.adapter.flat_params(), batch_size)


def _cache_file(model_path: Path, split: str, n: int) -> Path:
    digest = hashlib.sha256(str(model_path).encode()).hexdigest()[:16]
    root = Path(os.environ.get("FASTIF_STUDY_CACHE") or Path.home() / ".cache" / "fastif" / "study")
    return root / f"{digest}-{split}-{n}.npy"


def _cached_hidden(model: nn.Module, data: Any, path: Path) -> tuple[Tensor, float]:
    """Cached [CLS] hidden states (``.npy``), computed once; returns (states, seconds the computation took)."""
    sidecar = path.with_suffix(".json")
    if path.is_file():
        seconds = float(json.loads(sidecar.read_text())["seconds"]) if sidecar.is_file() else float("nan")
        return torch.from_numpy(np.load(path)), seconds
    states, seconds = timed(lambda: cls_hidden_states(model, data))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npy")
    np.save(tmp, states.numpy())
    os.replace(tmp, path)
    atomic_write_json(sidecar, {"seconds": seconds, "examples": len(data), "loadavg": list(os.getloadavg())})
    return states, seconds


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
        model_path = Path(trained.path)
        info.update(model_path=str(model_path), model_metrics=trained.metrics, model_load_seconds=seconds)
    else:
        model_path = Path(f"in-memory-{id(model)}")
    model.eval()
    train_text = TextPairData(load_embedded("mnli_train")[:n_train], tokenizer)
    test_text = TextPairData(load_embedded("mnli_test")[:n_test], tokenizer)
    if str(model_path).startswith("in-memory"):
        hidden_train, t_train = timed(lambda: cls_hidden_states(model, train_text))
        hidden_test, t_test = timed(lambda: cls_hidden_states(model, test_text))
    else:
        hidden_train, t_train = _cached_hidden(model, train_text, _cache_file(model_path, "train", n_train))
        hidden_test, t_test = _cached_hidden(model, test_text, _cache_file(model_path, "test", len(test_text)))
    info.update(cache_seconds_train=t_train, cache_seconds_test=t_test)
    base = model.base_model
    head = PoolerHead(base.pooler.dense, model.classifier)
    adapter = head_adapter(head, float(l2 or 0.0))
    with torch.no_grad():
        predictions = head(hidden_test).argmax(-1)
    test_labels = test_text.labels
    info.update(
        n_train=n_train,
        n_test=len(test_text),
        parameters=adapter.num_params,
        parameter_names=adapter.names,
        l2=float(l2 or 0.0),
        test_accuracy=float((predictions == test_labels).float().mean()),
    )
    return Setup(
        model,
        train_text,
        test_text,
        TensorData((hidden_train, train_text.labels)),
        TensorData((hidden_test, test_labels)),
        head,
        adapter,
        float(l2 or 0.0),
        predictions,
        info,
    )


def equivalence_check(setup: Setup, n: int = 4) -> float:
    """Max relative difference between the head's per-example gradients and the full HF model's (pooler +
    classifier selected), on the first ``n`` training pairs: the cache must change nothing."""
    names = [name for name, _ in setup.model.named_parameters()]
    pooler = next(name.rsplit(".dense.", 1)[0] for name in names if name.endswith("pooler.dense.weight"))
    full = HFClassifierAdapter(setup.model, AdapterConfig(include=(pooler, "classifier")))
    indices = list(range(n))
    reference = per_example_grads(full, full.flat_params(), setup.train_text.batch(indices))
    cached = per_example_grads(setup.adapter, setup.adapter.flat_params(), setup.train.batch(indices))
    return float((reference - cached).norm() / reference.norm())


def pick_test_points(setup: Setup, n_correct: int, n_wrong: int, seed: int = 0) -> tuple[list[int], list[bool]]:
    """``n_correct`` correctly and ``n_wrong`` wrongly predicted test indices, seeded; returns (indices, correct)."""
    rng = np.random.default_rng(seed)
    correct = (setup.predictions == setup.test.tensors[1]).numpy()
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
