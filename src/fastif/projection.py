"""Random projections of per-example gradients: a seeded JL map R^P -> R^D that is never materialised at full size.

Two kinds of block make up the map, both defined on the adapter's flat θ ordering (``adapter.space``):

* **Factored** (LoGra-style), for the weight of every selected ``nn.Linear`` and transformers ``Conv1D``: a weight
  gradient G = Σ_t g_t a_tᵀ (g_t the output gradient, a_t the input of token t) is projected to
  P_out G P_inᵀ = Σ_t (P_out g_t)(P_in a_t)ᵀ, i.e. (P_out ⊗ P_in) vec(G), from forward/backward hooks that capture
  a and g, so the per-example weight gradient is never formed. ``Conv1D`` stores its weight as [in, out], so its
  block is P_in G P_outᵀ. Each side has ``min(layer_dim, width)`` rows, a side no wider than that is left
  unprojected (the identity is exact), and then the other side gets the rest of the layer's ``layer_dim²`` budget.
  One Kronecker map is a weak JL map for low-rank gradients: its error has first-order terms like those of a
  k-row sketch of one side (k = layer_dim), far above a dense sketch of its k² rows when gradients share
  directions. ``terms = R`` sums R independent Kronecker maps, Σ_r (P_out^r ⊗ P_in^r) / √R: the output keeps its
  size, those terms' variance falls by R and the map nears a dense one of k² rows, at R times the (small) cost of
  the side projections. Where one side is the identity one term is used (a sum of independent one-sided maps is
  just another one-sided map).
* **Dense**, for every other selected parameter (biases, LayerNorm weights, embeddings, and everything when
  ``layer_dim = 0``): one JL matrix R [dim, P_dense], generated 4,096 columns at a time from a ``torch.Generator``
  seeded by (seed, parameter name, column block), so projecting costs O(B·dim + dim·4096) memory. If
  ``dim >= P_dense`` the dense part is the identity. Their per-example gradients come from the same hooks where
  they can: a factored module's bias (Σ_t g_t) and an affine ``nn.LayerNorm``'s weight and bias (Σ_t g_t ⊙ x̂_t,
  Σ_t g_t); the rest from vmap of grad over those parameters only (a loop of grad where vmap fails, e.g. RNNs).

Entries are N(0, 1/k) ("gaussian") or ±1/√k ("rademacher") for a k-row matrix, so E‖Rx‖² = ‖x‖² and
E⟨Rx, Ry⟩ = ⟨x, y⟩; ``kind="identity"`` makes every block the identity (the projected gradient is the gradient).
The same map applies to any flat vector (:meth:`Projector.project_flat`, e.g. s_test), so ⟨P s_test, P ∇L_j⟩
approximates the influence score s_testᵀ ∇L_j. The output holds the factored blocks in adapter order, then the
dense part.
"""

from __future__ import annotations

import hashlib
import json
import typing
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from .config import check_number
from .data import Batch, batch_len, map_tensors
from .errors import ConfigError, DataError
from .grads import example_grads
from .model.adapter import ModelAdapter

Kind = Literal["gaussian", "rademacher", "identity"]

BLOCK_COLUMNS = 4096
"""Columns of the dense JL matrix generated at a time; part of the map's definition (it keys the generator)."""


@dataclass(frozen=True)
class ProjectionConfig:
    """The random projection of a gradient store: its kind, dense dimension, per-side layer dimension and seed."""

    kind: Kind = "rademacher"
    dim: int = 2048  # rows of the dense JL matrix (for parameters not factored); >= their count = identity
    layer_dim: int = 0  # rows per side of each factored Linear/Conv1D weight (0 = no factoring: all dense)
    seed: int = 0
    terms: int = 1  # independent Kronecker maps summed per factored weight (more = closer to a dense map)

    def __post_init__(self) -> None:
        """Refuse unknown kinds and non-positive sizes at construction time."""
        if self.kind not in typing.get_args(Kind):
            raise ConfigError(f"ProjectionConfig.kind must be one of {typing.get_args(Kind)}, got {self.kind!r}")
        for name, low in (("dim", 1), ("layer_dim", 0), ("seed", 0), ("terms", 1)):
            check_number(f"candidates.gradients.projection.{name}", getattr(self, name), integer=True, minimum=low)


def _generator(seed: int, key: tuple[object, ...]) -> torch.Generator:
    """A CPU generator seeded from SHA-256 of (seed, key), so each block's entries depend on nothing else."""
    digest = hashlib.sha256(json.dumps([seed, *key]).encode("utf-8")).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))


def random_matrix(kind: Kind, rows: int, cols: int, seed: int, key: tuple[object, ...]) -> Tensor:
    """A float32 [rows, cols] JL block keyed by (seed, key), entries of variance 1/rows (E‖Rx‖² = ‖x‖²)."""
    generator = _generator(seed, key)
    if kind == "gaussian":
        matrix = torch.randn(rows, cols, generator=generator)
    elif kind == "rademacher":
        matrix = torch.randint(0, 2, (rows, cols), generator=generator).float().mul_(2).sub_(1)
    else:
        raise ConfigError(f"random_matrix needs kind 'gaussian' or 'rademacher', got {kind!r}")
    return matrix.mul_(rows**-0.5)


class DenseProjection:
    """The dense JL map of named flat blocks [B, numel] to [B, dim], generated blockwise from the seed.

    Blocks are keyed by name, so a parameter is projected the same way whatever else is selected. Generated blocks
    are kept while their total stays under ``cache_bytes`` (a speed-up only: the values are regenerated otherwise).
    """

    def __init__(self, names: list[str], numels: list[int], config: ProjectionConfig, cache_bytes: int = 1 << 28):
        self.names, self.numels, self.config = list(names), list(numels), config
        self.size = sum(self.numels)
        self.identity = config.kind == "identity" or config.dim >= self.size
        self.dim = self.size if self.identity else config.dim
        self._cache: dict[tuple[str, int], Tensor] = {}
        self._cache_left = cache_bytes

    def _block(self, name: str, index: int, cols: int) -> Tensor:
        """Columns [index·BLOCK_COLUMNS, +cols) of the JL matrix's block for parameter ``name``."""
        key = (name, index)
        if key in self._cache:
            return self._cache[key]
        block = random_matrix(self.config.kind, self.dim, cols, self.config.seed, ("dense", name, index))
        if block.numel() * block.element_size() <= self._cache_left:
            self._cache[key] = block
            self._cache_left -= block.numel() * block.element_size()
        return block

    def project(self, blocks: dict[str, Tensor]) -> Tensor:
        """Project the named blocks (each [B, numel], all selected names present) to [B, dim]."""
        missing = [name for name in self.names if name not in blocks]
        if missing:
            raise DataError(f"dense projection is missing blocks {missing[:3]}; pass one [B, numel] block per name")
        if self.identity:
            return torch.cat([blocks[name] for name in self.names], dim=1)
        first = blocks[self.names[0]]
        out = torch.zeros(first.shape[0], self.dim, dtype=first.dtype, device=first.device)
        for name in self.names:
            values = blocks[name]
            for index, start in enumerate(range(0, values.shape[1], BLOCK_COLUMNS)):
                piece = values[:, start : start + BLOCK_COLUMNS]
                out += piece @ self._block(name, index, piece.shape[1]).to(piece).T
        return out

    def project_flat(self, vectors: Tensor) -> Tensor:
        """Project [k, size] vectors laid out as the blocks in order."""
        pieces = torch.split(vectors, self.numels, dim=1)
        return self.project(dict(zip(self.names, pieces, strict=True)))


def _conv1d_type() -> type | None:
    """transformers' Conv1D class (weight [in, out]), or None when transformers is not installed."""
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:
        return None
    return Conv1D


@dataclass(frozen=True)
class FactoredBlock:
    """A selected Linear/Conv1D weight projected by its two sides; ``rows``/``cols`` follow the weight's layout."""

    name: str
    module: str
    transposed: bool  # True for Conv1D: weight [in, out], so rows are inputs and cols are outputs
    rows: int
    cols: int
    k_rows: int
    k_cols: int
    offset: int  # start of the weight in the flat θ
    terms: int  # Kronecker maps summed (1 where a side is the identity)

    @property
    def dim(self) -> int:
        return self.k_rows * self.k_cols


class Projector:
    """The projection of an adapter's flat θ space: per-example projected gradients and projected flat vectors."""

    def __init__(self, adapter: ModelAdapter, config: ProjectionConfig, cache_bytes: int = 1 << 28) -> None:
        self.adapter, self.config = adapter, config
        self.factored = self._factored_blocks()
        factored_names = {block.name for block in self.factored}
        offsets = _offsets(adapter.space.numels)
        self.rest = [i for i, name in enumerate(adapter.space.names) if name not in factored_names]
        self.dense_offsets = [offsets[i] for i in self.rest]
        names = [adapter.space.names[i] for i in self.rest]
        self.dense = DenseProjection(names, [adapter.space.numels[i] for i in self.rest], config, cache_bytes)
        self.dim = sum(block.dim for block in self.factored) + (self.dense.dim if self.rest else 0)
        hooked = {_bias_name(block.module) for block in self.factored} & set(names)
        self.hooked_biases = sorted(hooked, key=adapter.space.names.index)
        self.norms = _hooked_norms(adapter.model, set(names))
        norm_names = [name for norm in self.norms for name in (norm.weight, norm.bias) if name]
        self._hooked_dense = [*self.hooked_biases, *norm_names]  # dense parameters whose gradients the hooks give
        self.vmapped = [i for i in self.rest if adapter.space.names[i] not in {*hooked, *norm_names}]
        self._sides: dict[tuple[str, str], Tensor | None] = {}
        self._modules = dict(adapter.model.named_modules())

    def _factored_blocks(self) -> list[FactoredBlock]:
        """The selected Linear/Conv1D weights, in adapter order (none when ``layer_dim`` is 0)."""
        if self.config.layer_dim == 0:
            return []
        conv1d = _conv1d_type()
        space = self.adapter.space
        identity = self.config.kind == "identity"
        offsets = _offsets(space.numels)
        blocks = []
        for module_name, module in self.adapter.model.named_modules():
            transposed = conv1d is not None and isinstance(module, conv1d)
            name = f"{module_name}.weight" if module_name else "weight"
            if not (isinstance(module, nn.Linear) or transposed) or name not in space.names:
                continue
            index = space.names.index(name)
            rows, cols = space.shapes[index]
            k_rows, k_cols = _side_dims(rows, cols, self.config.layer_dim, identity)
            terms = self.config.terms if k_rows < rows and k_cols < cols else 1
            blocks.append(
                FactoredBlock(name, module_name, transposed, rows, cols, k_rows, k_cols, offsets[index], terms)
            )
        return sorted(blocks, key=lambda block: block.offset)

    def describe(self) -> dict[str, object]:
        """A JSON-able description of the map (config and layout), for store manifests."""
        return {
            "kind": self.config.kind,
            "dim": self.config.dim,
            "layer_dim": self.config.layer_dim,
            "seed": self.config.seed,
            "terms": self.config.terms,
            "block_columns": BLOCK_COLUMNS,
            "out_dim": self.dim,
            "factored": [[b.name, b.k_rows, b.k_cols] for b in self.factored],
            "dense": [self.dense.names, self.dense.dim],
        }

    def _side(self, block: FactoredBlock, side: str, term: int = 0) -> Tensor | None:
        """P_in [k_in, in] or P_out [k_out, out] of one Kronecker term of a factored weight; None where that side is
        the identity. Term 0 is the one-term map's matrix, so adding terms keeps it."""
        key = (block.name, side) if term == 0 else (block.name, side, term)
        if key not in self._sides:
            width, k = (block.cols, block.k_cols) if (side == "in") != block.transposed else (block.rows, block.k_rows)
            identity = self.config.kind == "identity" or k >= width
            self._sides[key] = None if identity else random_matrix(self.config.kind, k, width, self.config.seed, key)
        return self._sides[key]

    def _apply(self, block: FactoredBlock, side: str, values: Tensor, term: int = 0) -> Tensor:
        """``values [..., width] @ Pᵀ`` for one side of one term (unchanged where it is the identity)."""
        matrix = self._side(block, side, term)
        return values if matrix is None else values @ matrix.to(values).T

    def _stacked(self, block: FactoredBlock, side: str, values: Tensor) -> Tensor:
        """``values [B, t, width]`` through one side of every term at once: [B, t, terms, k], so the terms' sum
        is one einsum (a side is the identity only in one-term blocks, which pass through as [B, t, 1, width])."""
        matrices = [self._side(block, side, term) for term in range(block.terms)]
        if matrices[0] is None:
            return values.unsqueeze(2)
        return (values @ torch.cat(matrices).to(values).T).unflatten(-1, (block.terms, -1))

    def project_flat(self, vectors: Tensor) -> Tensor:
        """Project flat vectors [k, P] in the adapter's θ ordering (e.g. s_test) to [k, dim]."""
        if vectors.dim() != 2 or vectors.shape[1] != self.adapter.num_params:
            raise DataError(
                f"vectors to project must be [k, {self.adapter.num_params}] (the adapter's selected parameters), "
                f"got shape {tuple(vectors.shape)}; compute them with the same adapter and parameter selection"
            )
        parts = []
        for block in self.factored:
            weight = vectors[:, block.offset : block.offset + block.rows * block.cols].reshape(
                -1, block.rows, block.cols
            )
            left, right = ("in", "out") if block.transposed else ("out", "in")
            total = 0
            for term in range(block.terms):
                part = self._apply(block, right, weight, term)  # [k, rows, k_cols]
                total = total + self._apply(block, left, part.transpose(1, 2), term).transpose(1, 2)
            parts.append((total * block.terms**-0.5).reshape(vectors.shape[0], -1))
        if self.rest:
            numels = self.dense.numels
            pieces = [vectors[:, o : o + n] for o, n in zip(self.dense_offsets, numels, strict=True)]
            parts.append(self.dense.project(dict(zip(self.dense.names, pieces, strict=True))))
        return torch.cat(parts, dim=1)

    def project_batch(self, flat: Tensor, batch: Batch, chunk_size: int = 32) -> Tensor:
        """Projected per-example loss gradients [B, dim] at parameters ``flat``, without forming the factored ones."""
        adapter = self.adapter
        batch = adapter.to_device(batch)
        adapter.check_batch(batch)
        parts, hooked = [], {}
        if self.factored or self.norms:
            parts, hooked = self._hooked(flat, batch)
        if self.rest:
            parts.append(self.dense.project({**hooked, **self._vmapped(flat, batch, chunk_size)}))
        return torch.cat(parts, dim=1)

    @contextmanager
    def _recording(self) -> Iterator[list[tuple[FactoredBlock | HookedNorm, Tensor, Tensor]]]:
        """Forward hooks on the factored and the hooked norm modules that record (what, input, output) per call."""
        records: list[tuple[FactoredBlock | HookedNorm, Tensor, Tensor]] = []
        handles = []
        for what in [*self.factored, *self.norms]:

            def hook(
                _module: nn.Module, args: tuple[Tensor, ...], output: Tensor, what: FactoredBlock | HookedNorm = what
            ) -> None:
                records.append((what, args[0], output))

            handles.append(self._modules[what.module].register_forward_hook(hook))
        try:
            yield records
        finally:
            for handle in handles:
                handle.remove()

    def _hooked(self, flat: Tensor, batch: Batch) -> tuple[list[Tensor], dict[str, Tensor]]:
        """One forward/backward pass: projected weight gradients [B, k_rows·k_cols] per factored block, and the
        per-example gradients of the selected biases of those modules (Σ_t g_t) and of the hooked LayerNorms."""
        size = batch_len(batch)
        theta = flat.detach().requires_grad_(True)
        with torch.enable_grad(), self._recording() as records:
            losses = self.adapter.per_example_loss(theta, batch)
            outputs = [output for _, _, output in records]
            grads = torch.autograd.grad(losses.sum(), outputs, allow_unused=True)
        weights = {b.name: flat.new_zeros(size, b.k_rows, b.k_cols) for b in self.factored}
        space = self.adapter.space
        dense = {name: flat.new_zeros(size, space.numels[space.names.index(name)]) for name in self._hooked_dense}
        for (block, inputs, output), out_grad in zip(records, grads, strict=True):
            if out_grad is None:
                continue
            if isinstance(block, HookedNorm):
                self._add_norm_grads(block, inputs.detach(), out_grad, dense)
                continue
            inputs = inputs.detach().reshape(size, -1, inputs.shape[-1])
            g = out_grad.reshape(size, -1, output.shape[-1])
            a, b = self._stacked(block, "in", inputs), self._stacked(block, "out", g)
            left, right = (a, b) if block.transposed else (b, a)
            weights[block.name] += torch.einsum("btsr,btsc->brc", left, right) * block.terms**-0.5
            bias = _bias_name(block.module)
            if bias in dense:
                dense[bias] += g.sum(dim=1)
        return [weights[b.name].reshape(size, -1) for b in self.factored], dense

    def _add_norm_grads(self, norm: HookedNorm, inputs: Tensor, out_grad: Tensor, grads: dict[str, Tensor]) -> None:
        """Add one LayerNorm call's per-example gradients: Σ_t g_t ⊙ x̂_t for its weight, Σ_t g_t for its bias
        (x̂ = the normalised input, recomputed with the module's own shape and eps)."""
        module = self._modules[norm.module]
        shape = tuple(module.normalized_shape)
        size = inputs.shape[0]
        g = out_grad.reshape(size, -1, *shape)
        if norm.weight:
            normalised = nn.functional.layer_norm(inputs, shape, eps=module.eps).reshape(g.shape)
            grads[norm.weight] += (g * normalised).sum(dim=1).reshape(size, -1)
        if norm.bias:
            grads[norm.bias] += g.sum(dim=1).reshape(size, -1)

    def _vmapped(self, flat: Tensor, batch: Batch, chunk_size: int) -> dict[str, Tensor]:
        """Per-example gradients of the dense parameters not served by hooks (vmap of grad, or the loop where vmap
        fails on this model), the others held fixed."""
        indices = self.vmapped
        if not indices:
            return {}
        space, adapter = self.adapter.space, self.adapter
        pieces = list(torch.split(flat.detach(), space.numels))
        numels = [space.numels[i] for i in indices]

        def loss(part: Tensor, example: Batch) -> Tensor:
            full = list(pieces)
            for i, piece in zip(indices, torch.split(part, numels), strict=True):
                full[i] = piece
            one = map_tensors(lambda t: t.unsqueeze(0), example)
            return adapter.per_example_loss(torch.cat(full), one).squeeze(0)

        part = torch.cat([pieces[i] for i in indices])
        size = batch_len(batch)
        with torch.no_grad():
            chunks = [_rows(batch, start, chunk_size) for start in range(0, size, chunk_size)]
            rows = [example_grads(adapter, loss, part, chunk) for chunk in chunks]
        columns = torch.split(torch.cat(rows), numels, dim=1)
        return {space.names[i]: column for i, column in zip(indices, columns, strict=True)}


def _side_dims(rows: int, cols: int, k: int, identity: bool) -> tuple[int, int]:
    """Projected sizes of a factored weight's two sides: ``min(k, width)`` each, except that a side narrower than
    ``k`` (kept whole) leaves the other side the rest of the block's k² budget, ``min(width, k² // narrow)``; a
    classifier head's 3 outputs would otherwise leave its inputs a k-row sketch, the block's weakest part."""
    if identity:
        return rows, cols
    if rows < k <= cols:
        return rows, min(cols, k * k // rows)
    if cols < k <= rows:
        return min(rows, k * k // cols), cols
    return min(k, rows), min(k, cols)


@dataclass(frozen=True)
class HookedNorm:
    """An affine ``nn.LayerNorm`` whose selected weight / bias get per-example gradients from hooks, not vmap."""

    module: str
    weight: str | None  # the weight's parameter name, None where it is not selected
    bias: str | None


def _hooked_norms(model: nn.Module, selected: set[str]) -> list[HookedNorm]:
    """The model's affine LayerNorms with a selected weight or bias (names taken from ``selected``)."""
    norms = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.LayerNorm) or not module.elementwise_affine:
            continue
        prefix = f"{name}." if name else ""
        weight, bias = (f"{prefix}{p}" if f"{prefix}{p}" in selected else None for p in ("weight", "bias"))
        if weight or bias:
            norms.append(HookedNorm(name, weight, bias))
    return norms


def _rows(batch: Batch, start: int, count: int) -> Batch:
    """Examples [start, start + count) of a batch."""
    return map_tensors(lambda t: t[start : start + count], batch)


def _bias_name(module: str) -> str:
    """The bias parameter's name of module ``module`` ("" = the model itself)."""
    return f"{module}.bias" if module else "bias"


def _offsets(numels: list[int]) -> list[int]:
    """Start of each block in a flat vector laid out as ``numels``."""
    starts, total = [], 0
    for numel in numels:
        starts.append(total)
        total += numel
    return starts
