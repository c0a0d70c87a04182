"""K-FAC and EK-FAC inverse-HVP solvers, and PCG: conjugate gradients preconditioned by either of them.

Both replace ``H`` by a block-diagonal Fisher approximation: one block per Linear / Conv2d (groups 1, zero numeric
padding) / HF Conv1D layer among the selected parameters (its weight and, when selected, bias, with the input
augmented by a 1), and a **diagonal** block for every other selected parameter (LayerNorm, embeddings, stray
biases): the diagonal of the Fisher, the mean over examples of the squared per-example gradient.

* Kronecker block: ``F ≈ A ⊗ S`` with ``A = mean over tokens of a aᵀ`` (padding tokens, attention_mask 0,
  excluded) and ``S = mean over examples of Σ_tokens g gᵀ`` (g: gradient of the example's loss with respect to
  the layer's output). Tokens are sequence positions or conv output locations. Unlike kronfluence, which averages
  both factors over tokens, S sums over an example's tokens, so ``A ⊗ S`` has the scale of the per-example Fisher
  (equal for one token per example) and an absolute damping means the same as for CG.
* K-FAC eigenvalues are ``λ_S λ_Aᵀ``; EK-FAC refits them as the Fisher's diagonal in the Kronecker eigenbasis,
  ``mean_i (Q_Sᵀ G_i Q_A)²`` from a second pass (George et al. 2018).
* ``fisher="empirical"`` uses the data's targets; ``"true"`` draws them from the model (seeded per example).
* Solve: per block, rotate v's [out, in(+1)] matrix into the eigenbasis, divide by ``eigenvalues + damping +
  l2·mean(mask over the block)`` and rotate back. The L2 term is exact on diagonal blocks and on Kronecker blocks
  whose parameters are all (or none) L2-penalised; otherwise its block mean is used. ``damping="heuristic"`` is
  kronfluence's 0.1 × the mean eigenvalue, per block.

Factors are sums with counts: :meth:`KFAC.partial_factors` on disjoint index sets, :meth:`KFAC.combine` and
:meth:`KFAC.absorb` give what one pass does (a runner can split the data over ranks and sum). ``fit(hessian,
store=...)`` keeps each stage's per-shard sums and the fitted blocks in a :class:`~fastif.store.Store`, so an
interrupted fit resumes at its first unfinished shard and a finished one reloads without a data pass
(:mod:`fastif.store.kfac`).

On the frozen path (:mod:`fastif.model.frozen`) the hooks sit on the model's own modules, run on cached activations, and
padding is read from the cached batch's ``attention_mask``: the factors equal the full model's, except where a BERT
last layer runs at [CLS] only, whose query and feed-forward blocks then average A over that one token per example
(the only position whose gradient is not zero) rather than over every token.
"""

from __future__ import annotations

import math
import typing
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor

from ...config import DEFAULT_DAMPING, check_choice, check_number, shown
from ...data import index_chunks
from ...errors import ConfigError, SolverError
from ...hvp import Hessian
from ..base import Solver, SolveResult, check_seed
from ..cg import check_cg_options, indefinite_error
from .factors import Likelihood, diagonal_squares, layer_tokens, masked_tokens, resolve_likelihood, sample_targets
from .layers import KroneckerLayer, find_blocks

HEURISTIC_DAMPING_SCALE = 0.1  # kronfluence's heuristic: 0.1 × the mean eigenvalue of the block

Damping = float | Literal["heuristic"]


@dataclass(frozen=True)
class KFACConfig:
    """K-FAC: eigenvalues ``λ_S λ_Aᵀ`` of ``A ⊗ S``. ``memory_budget`` (bytes) caps what all factors need."""

    damping: Damping = 0.0
    fisher: Literal["empirical", "true"] = "empirical"
    likelihood: Likelihood = "auto"
    seed: int = 0
    memory_budget: int = 8 * 2**30

    def __post_init__(self) -> None:
        """Refuse a damping that is neither a finite number >= 0 nor 'heuristic', and bad choices or sizes."""
        check_factor_options(self)


@dataclass(frozen=True)
class EKFACConfig:
    """EK-FAC: K-FAC's eigenbasis with the eigenvalues refitted to the Fisher's diagonal in it (one more pass)."""

    damping: Damping = 0.0
    fisher: Literal["empirical", "true"] = "empirical"
    likelihood: Likelihood = "auto"
    seed: int = 0
    memory_budget: int = 8 * 2**30

    def __post_init__(self) -> None:
        """Refuse a damping that is neither a finite number >= 0 nor 'heuristic', and bad choices or sizes."""
        check_factor_options(self)


def check_factor_options(config: KFACConfig | EKFACConfig) -> None:
    """The checks K-FAC and EK-FAC share (keys ``solver.*``, as the pipeline's [solver] table names them)."""
    if config.damping != "heuristic":
        check_number("solver.damping", config.damping, minimum=0)
    check_choice("solver.fisher", config.fisher, ("empirical", "true"))
    check_choice("solver.likelihood", config.likelihood, typing.get_args(Likelihood))
    check_seed(config.seed)
    check_number("solver.memory_budget", config.memory_budget, integer=True, minimum=1)


@dataclass
class KroneckerBlock:
    """A fitted Kronecker block: eigenvectors Q_A [in+1, in+1], Q_S [out, out], eigenvalues [out, in+1] and the
    total damping added to them (damping or heuristic, plus the block's L2 term)."""

    activation_eigenvectors: Tensor
    gradient_eigenvectors: Tensor
    eigenvalues: Tensor
    damping: float


def _covariance_keys(layer: KroneckerLayer) -> tuple[str, str, str]:
    return f"{layer.name}.A", f"{layer.name}.S", f"{layer.name}.tokens"


class KFAC(Solver, name="kfac"):
    """K-FAC solver (see the module docstring); ``fit`` runs one factor pass over the training data."""

    config_class: ClassVar[type] = KFACConfig
    stages: ClassVar[tuple[str, ...]] = ("covariance",)

    def begin(self, hessian: Hessian) -> KFAC:
        """Check the config, map the selected parameters to blocks and check the memory budget; no data pass."""
        config = self.config
        if config.fisher == "true":
            resolve_likelihood(hessian.adapter, config.likelihood)
        self.hessian = hessian
        self.layers, self.diagonal = find_blocks(hessian.adapter)
        self._check_memory(hessian)
        self.stage = 0
        self.blocks: dict[str, KroneckerBlock] = {}
        self.diagonals: dict[str, Tensor] = {}
        self.examples = 0
        return self

    @property
    def pending(self) -> str | None:
        """The factor stage a data pass must compute next, or None when fitted."""
        return self.stages[self.stage] if self.stage < len(self.stages) else None

    def fit(self, hessian: Hessian) -> KFAC:
        """Fit the factors in one pass per stage (:func:`fastif.store.kfac.fit_stored` does it shard by shard in a
        Store, resuming finished shards and reloading finished blocks without a data pass)."""
        self.begin(hessian)
        while self.pending is not None:
            self.absorb(self.partial_factors(range(hessian.num_examples)))
        return self

    def state(self) -> dict[str, Tensor]:
        """The fitted blocks and diagonals as flat tensors (what the store's ``-fitted`` entry holds)."""
        if self.pending is not None:
            raise SolverError(f"{type(self).__name__} is not fitted: its {self.pending!r} factors are missing")
        state = {"examples": torch.tensor(self.examples, dtype=torch.int64)}
        for name, block in self.blocks.items():
            state[f"{name}.activation_eigenvectors"] = block.activation_eigenvectors
            state[f"{name}.gradient_eigenvectors"] = block.gradient_eigenvectors
            state[f"{name}.eigenvalues"] = block.eigenvalues
            state[f"{name}.damping"] = torch.tensor(block.damping, dtype=torch.float64)
        state.update({f"diagonal.{name}": squares for name, squares in self.diagonals.items()})
        return state

    def restore(self, state: dict[str, Tensor]) -> KFAC:
        """Take fitted blocks from :meth:`state`'s output, on a solver begun on the same Hessian; no data pass."""
        hessian = self._fitted()
        expected = set(self.state_keys())
        if set(state) != expected:
            raise SolverError(
                f"stored {type(self).__name__} factors do not match this parameter selection (they hold "
                f"{len(state)} tensors, this selection needs {len(expected)}); refit without the stored entry"
            )
        device, dtype = hessian.flat.device, hessian.flat.dtype

        def tensor(key: str) -> Tensor:
            return state[key].to(device=device, dtype=dtype)

        for layer in self.layers:
            name = layer.name
            self.blocks[name] = KroneckerBlock(
                tensor(f"{name}.activation_eigenvectors"),
                tensor(f"{name}.gradient_eigenvectors"),
                tensor(f"{name}.eigenvalues"),
                float(state[f"{name}.damping"]),
            )
        self.diagonals = {name: tensor(f"diagonal.{name}") for name, _ in self.diagonal}
        self.examples = int(state["examples"])
        self.stage = len(self.stages)
        return self

    def state_keys(self) -> list[str]:
        """The keys :meth:`state` gives for this solver's blocks (after :meth:`begin`)."""
        parts = ("activation_eigenvectors", "gradient_eigenvectors", "eigenvalues", "damping")
        keys = ["examples"] + [f"{layer.name}.{part}" for layer in self.layers for part in parts]
        return keys + [f"diagonal.{name}" for name, _ in self.diagonal]

    # ------------------------------------------------------------------------------------------ memory

    def factor_bytes(self, hessian: Hessian) -> dict[str, int]:
        """Bytes each block needs while fitting, by layer (Kronecker) or parameter (diagonal) name.

        Kronecker: sums and eigenvectors of A and S, eigenvalues [out, in+1]; EK-FAC adds its sums and one batch of
        rotated per-example gradients [batch, out, in+1]. Diagonal: the sum and the result.
        """
        layers, diagonal = find_blocks(hessian.adapter)
        size = hessian.flat.element_size()
        needs = {}
        for layer in layers:
            square = layer.columns**2 + layer.out_features**2
            grid = layer.columns * layer.out_features
            extra = grid * (1 + hessian.batch_size) if len(self.stages) > 1 else 0
            needs[layer.name] = size * (2 * square + grid + extra)
        for name, piece in diagonal:
            needs[name] = size * 2 * (piece.stop - piece.start)
        return needs

    def _check_memory(self, hessian: Hessian) -> None:
        needs = self.factor_bytes(hessian)
        total = sum(needs.values())
        if total > self.config.memory_budget:
            largest = max(needs, key=needs.__getitem__)
            raise SolverError(
                f"{type(self).__name__} factors need {total / 2**20:.3g} MiB but memory_budget is "
                f"{self.config.memory_budget / 2**20:.3g} MiB; the largest is layer {largest!r} with "
                f"{needs[largest] / 2**20:.3g} MiB ({needs[largest]} bytes). Raise memory_budget, exclude that layer "
                "from the parameter selection, lower the batch size (EK-FAC), or use CG or LiSSA"
            )

    # ------------------------------------------------------------------------------------------ factors

    def partial_factors(self, data_indices: Sequence[int]) -> dict[str, Tensor]:
        """Sums (and counts) of the pending stage's factors over the training examples ``data_indices``."""
        hessian = self._fitted()
        if self.pending is None:
            raise SolverError(f"{type(self).__name__} is already fitted; start again with .begin(hessian)")
        totals: dict[str, Tensor] = {"examples": torch.tensor(0, dtype=torch.int64)}
        adapter = hessian.adapter
        for indices in index_chunks(data_indices, hessian.batch_size):
            batch = adapter.to_device(hessian.data.batch(indices))
            adapter.check_batch(batch)
            if self.config.fisher == "true":
                batch = sample_targets(adapter, hessian.flat, batch, indices, self.config.seed, self.config.likelihood)
            _accumulate(totals, self._batch_factors(hessian, batch))
            totals["examples"] += len(indices)
        return totals

    def _batch_factors(self, hessian: Hessian, batch: Any) -> dict[str, Tensor]:
        """The pending stage's sums over one batch."""
        found: dict[str, Tensor] = {}
        tokens = layer_tokens(hessian.adapter, hessian.flat, batch, self.layers) if self.layers else []
        if self.pending == "covariance":
            for layer, (inputs, gradients) in zip(self.layers, tokens, strict=True):
                key_a, key_s, key_tokens = _covariance_keys(layer)
                kept, count = masked_tokens(inputs, batch)
                flat_inputs = kept.reshape(-1, layer.columns)
                flat_gradients = gradients.reshape(-1, layer.out_features)
                found[key_a] = flat_inputs.T @ flat_inputs
                found[key_s] = flat_gradients.T @ flat_gradients
                found[key_tokens] = count
            if self.diagonal:
                index = self._diagonal_index(hessian)
                found["diagonal"] = diagonal_squares(hessian.adapter, hessian.flat, batch, index)
        else:
            for layer, (inputs, gradients) in zip(self.layers, tokens, strict=True):
                block = self.blocks[layer.name]
                rotated = torch.einsum(
                    "bto,bti->boi", gradients @ block.gradient_eigenvectors, inputs @ block.activation_eigenvectors
                )
                found[f"{layer.name}.lambda"] = rotated.square().sum(dim=0)
        return found

    def _diagonal_index(self, hessian: Hessian) -> Tensor:
        positions = [torch.arange(piece.start, piece.stop) for _, piece in self.diagonal]
        return torch.cat(positions).to(hessian.flat.device)

    @staticmethod
    def combine(partials: Sequence[dict[str, Tensor]]) -> dict[str, Tensor]:
        """Sum partial factors from disjoint splits of the data (what a cross-rank all-reduce does)."""
        if not partials:
            raise SolverError("combine needs at least one set of partial factors")
        total = {key: value.clone() for key, value in partials[0].items()}
        for partial in partials[1:]:
            if set(partial) != set(total):
                raise SolverError("partial factors come from different stages or blocks; compute them all alike")
            _accumulate(total, partial)
        return total

    def absorb(self, factors: dict[str, Tensor]) -> KFAC:
        """Finish the pending stage from summed factors (covariance: eigendecompose; EK-FAC: refit eigenvalues)."""
        hessian = self._fitted()
        examples = int(factors["examples"])
        if examples == 0:
            raise SolverError("the factors cover no training example; give partial_factors a non-empty index set")
        if self.pending == "covariance":
            self._absorb_covariance(hessian, factors, examples)
        else:
            for layer in self.layers:
                block = self.blocks[layer.name]
                block.eigenvalues = factors[f"{layer.name}.lambda"] / examples
                block.damping = self._block_damping(hessian, layer.weight, layer.bias, block.eigenvalues)
        self.examples = examples
        self.stage += 1
        return self

    def _absorb_covariance(self, hessian: Hessian, factors: dict[str, Tensor], examples: int) -> None:
        for layer in self.layers:
            key_a, key_s, key_tokens = _covariance_keys(layer)
            tokens = max(int(factors[key_tokens]), 1)
            values_a, vectors_a = _eigh(factors[key_a] / tokens)
            values_s, vectors_s = _eigh(factors[key_s] / examples)
            eigenvalues = values_s[:, None] * values_a[None, :]
            damping = self._block_damping(hessian, layer.weight, layer.bias, eigenvalues)
            self.blocks[layer.name] = KroneckerBlock(vectors_a, vectors_s, eigenvalues, damping)
        if self.diagonal:
            squares = factors["diagonal"] / examples
            start = 0
            for name, piece in self.diagonal:
                width = piece.stop - piece.start
                self.diagonals[name] = squares[start : start + width]
                start += width

    def _block_damping(self, hessian: Hessian, weight: slice, bias: slice | None, eigenvalues: Tensor) -> float:
        """Damping plus the L2 term's mean over the block's parameters."""
        mask = hessian.adapter.l2_mask
        pieces = [mask[weight]] + ([mask[bias]] if bias is not None else [])
        l2 = hessian.adapter.config.l2 * float(torch.cat(pieces).mean())
        return self._damping(eigenvalues) + l2

    def _damping(self, eigenvalues: Tensor) -> float:
        if self.config.damping == "heuristic":
            return HEURISTIC_DAMPING_SCALE * float(eigenvalues.mean())
        return float(self.config.damping)

    # ------------------------------------------------------------------------------------------ solve

    def solve(self, vectors: Tensor) -> SolveResult:
        hessian = self._fitted()
        if self.pending is not None:
            raise SolverError(f"{type(self).__name__} is not fitted: its {self.pending!r} factors are missing")
        result = torch.empty_like(vectors)
        smallest = math.inf
        for layer in self.layers:
            block = self.blocks[layer.name]
            denominator = block.eigenvalues + block.damping
            smallest = min(smallest, float(denominator.min()))
            rotated = block.gradient_eigenvectors.T @ layer.matrices(vectors) @ block.activation_eigenvectors
            layer.write(block.gradient_eigenvectors @ (rotated / denominator) @ block.activation_eigenvectors.T, result)
        mask, l2 = hessian.adapter.l2_mask, hessian.adapter.config.l2
        for name, piece in self.diagonal:
            squares = self.diagonals[name]
            denominator = squares + self._damping(squares) + l2 * mask[piece]
            smallest = min(smallest, float(denominator.min()))
            result[:, piece] = vectors[:, piece] / denominator
        if not smallest > 0:
            raise SolverError(
                f"{type(self).__name__}'s curvature plus damping has a zero eigenvalue; set damping > 0 (or "
                "'heuristic')"
            )
        return SolveResult(result, {"min_eigenvalue": smallest, "examples": self.examples})


class EKFAC(KFAC, name="ekfac"):
    """EK-FAC solver: K-FAC's pass, eigendecomposition, then a second pass refitting the eigenvalues."""

    config_class: ClassVar[type] = EKFACConfig
    stages: ClassVar[tuple[str, ...]] = ("covariance", "eigenvalues")


def _eigh(matrix: Tensor) -> tuple[Tensor, Tensor]:
    """Eigenpairs of a symmetric PSD factor (symmetrised; round-off negatives clipped to 0)."""
    values, vectors = torch.linalg.eigh(0.5 * (matrix + matrix.T))
    return values.clamp_min(0.0), vectors


def _accumulate(total: dict[str, Tensor], part: dict[str, Tensor]) -> None:
    for key, value in part.items():
        total[key] = total[key] + value if key in total else value


# ---------------------------------------------------------------------------------------------- PCG


@dataclass(frozen=True)
class PCGConfig:
    """Preconditioned CG on ``H + damping·I`` (full-data HVPs), stopping at relative residual ``tolerance``.

    ``preconditioner`` None = EK-FAC with the same damping; otherwise its config is used as given.
    """

    damping: float = DEFAULT_DAMPING
    max_iterations: int = 200
    tolerance: float = 1e-8
    preconditioner: EKFACConfig | KFACConfig | None = field(default=None)

    def __post_init__(self) -> None:
        """CG's checks (damping, max_iterations, tolerance), and a preconditioner that is a K-FAC/EK-FAC config."""
        check_cg_options(self)
        check_preconditioner(self.preconditioner)


def check_preconditioner(preconditioner: object) -> None:
    """Refuse a preconditioner that is not an EK-FAC or K-FAC config (or None); PCG and LiSSA share it."""
    if not isinstance(preconditioner, EKFACConfig | KFACConfig | None):
        raise ConfigError(
            f"solver.preconditioner must be an EKFACConfig, a KFACConfig or None, got {shown(preconditioner)}",
            "solver.preconditioner",
        )


class PCG(Solver, name="pcg"):
    """Conjugate gradients preconditioned by a K-FAC or EK-FAC solve; reports iterations and the residual trace."""

    config_class: ClassVar[type] = PCGConfig
    iterative = True

    def fit(self, hessian: Hessian, preconditioner: KFAC | None = None) -> PCG:
        """Fit the preconditioner on ``hessian`` (or use an already fitted one); returns self."""
        super().fit(hessian)
        self.preconditioner = self.unfitted_preconditioner().fit(hessian) if preconditioner is None else preconditioner
        return self

    def unfitted_preconditioner(self) -> KFAC:
        """The K-FAC or EK-FAC solver of ``config.preconditioner`` (default: EK-FAC at PCG's damping), not fitted."""
        options = self.config.preconditioner or EKFACConfig(damping=self.config.damping)
        return (EKFAC if isinstance(options, EKFACConfig) else KFAC)(options)

    def solve(self, vectors: Tensor) -> SolveResult:
        hessian, config = self._fitted(), self.config
        tiny = torch.finfo(vectors.dtype).tiny
        x = torch.zeros_like(vectors)
        residual = vectors.clone()
        preconditioned = self.preconditioner.solve(residual).x
        direction = preconditioned.clone()
        inner = (residual * preconditioned).sum(dim=1)
        norms = vectors.norm(dim=1).clamp_min(tiny)
        trace: list[float] = []
        for _ in range(config.max_iterations):
            relative = residual.norm(dim=1) / norms
            active = relative > config.tolerance
            if not bool(active.any()):
                break
            product = hessian.matvec(direction) + config.damping * direction
            curvature = (direction * product).sum(dim=1)
            if bool((curvature[active] <= 0).any()):
                raise indefinite_error("PCG", hessian, config.damping, direction[active], curvature[active], len(trace))
            step = torch.where(active, inner / torch.where(active, curvature, 1.0), 0.0)
            x += step[:, None] * direction
            residual -= step[:, None] * product
            preconditioned = self.preconditioner.solve(residual).x
            new_inner = (residual * preconditioned).sum(dim=1)
            direction = preconditioned + (new_inner / inner.clamp_min(tiny))[:, None] * direction
            inner = new_inner
            trace.append(float((residual.norm(dim=1) / norms).max()))
            if not math.isfinite(trace[-1]):
                raise SolverError(f"PCG diverged at iteration {len(trace)}; increase damping (now {config.damping})")
        converged = bool((residual.norm(dim=1) / norms <= config.tolerance).all())
        if not converged:
            warnings.warn(
                f"PCG stopped after {config.max_iterations} iterations at relative residual {trace[-1]:.2e} > "
                f"{config.tolerance:g}; raise max_iterations or damping",
                RuntimeWarning,
                stacklevel=2,
            )
        return SolveResult(x, {"converged": converged, "iterations": len(trace), "residual_trace": trace})
