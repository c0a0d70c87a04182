"""Which selected parameters form Kronecker blocks (Linear, Conv2d, HF Conv1D) and how a block's slice of a flat
vector maps to its [out, in(+1)] matrix; every other selected parameter gets a diagonal block.

A layer's per-example gradient is ``G = Σ_t g_t a_tᵀ`` over its tokens t (sequence positions, conv output
locations; one token for a plain [B, in] input), with ``a_t`` the input (a 1 appended when the bias is selected)
and ``g_t`` the gradient of the example's loss with respect to the layer's output at t.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn
from torch.nn import functional

from ...model.adapter import ModelAdapter

LayerKind = Literal["linear", "conv1d", "conv2d"]


@dataclass(frozen=True)
class KroneckerLayer:
    """A module whose weight (and, when selected, bias) is one Kronecker block ``A ⊗ S`` of the Hessian."""

    name: str
    module: nn.Module
    kind: LayerKind
    weight: slice
    bias: slice | None
    in_features: int
    out_features: int

    @property
    def columns(self) -> int:
        """Width of the block's gradient matrix: the inputs, plus one column for the bias."""
        return self.in_features + (self.bias is not None)

    def matrices(self, vectors: Tensor) -> Tensor:
        """This block of each row of ``vectors`` [k, P] as gradient-shaped matrices [k, out, columns]."""
        weight = vectors[:, self.weight]
        if self.kind == "conv1d":
            matrix = weight.reshape(-1, self.in_features, self.out_features).transpose(1, 2)
        else:
            matrix = weight.reshape(-1, self.out_features, self.in_features)
        if self.bias is None:
            return matrix
        return torch.cat([matrix, vectors[:, self.bias, None]], dim=2)

    def write(self, matrices: Tensor, into: Tensor) -> None:
        """Inverse of :meth:`matrices`: put [k, out, columns] back into this block's slice of ``into`` [k, P]."""
        weight = matrices[:, :, : self.in_features]
        if self.kind == "conv1d":
            weight = weight.transpose(1, 2)
        into[:, self.weight] = weight.reshape(matrices.shape[0], -1)
        if self.bias is not None:
            into[:, self.bias] = matrices[:, :, -1]

    def tokens(self, inputs: Tensor) -> Tensor:
        """The layer's input as tokens [B, T, columns] (conv: patches per output location), bias column appended."""
        if self.kind == "conv2d":
            module = self.module
            patches = functional.unfold(
                inputs, module.kernel_size, dilation=module.dilation, padding=module.padding, stride=module.stride
            )
            tokens = patches.transpose(1, 2)
        else:
            tokens = inputs.reshape(inputs.shape[0], -1, self.in_features)
        if self.bias is None:
            return tokens
        return torch.cat([tokens, tokens.new_ones((*tokens.shape[:2], 1))], dim=2)

    def output_tokens(self, output_gradient: Tensor) -> Tensor:
        """The gradient with respect to the layer's output as tokens [B, T, out]."""
        if self.kind == "conv2d":
            return output_gradient.flatten(2).transpose(1, 2)
        return output_gradient.reshape(output_gradient.shape[0], -1, self.out_features)


def _kind(module: nn.Module) -> LayerKind | None:
    """The Kronecker layer kind of ``module``, or None when it gets diagonal blocks."""
    if isinstance(module, nn.Linear):
        return "linear"
    if isinstance(module, nn.Conv2d):
        plain = module.groups == 1 and module.padding_mode == "zeros" and not isinstance(module.padding, str)
        return "conv2d" if plain else None
    if type(module).__name__ == "Conv1D" and type(module).__module__.startswith("transformers"):
        return "conv1d"
    return None


def _features(module: nn.Module, kind: LayerKind) -> tuple[int, int]:
    """(in, out) sizes of the layer's weight as a matrix, in the layout of its gradient."""
    weight = module.weight
    if kind == "conv1d":
        return weight.shape[0], weight.shape[1]
    return math.prod(weight.shape[1:]), weight.shape[0]


def find_blocks(adapter: ModelAdapter) -> tuple[list[KroneckerLayer], list[tuple[str, slice]]]:
    """The selected parameters split into Kronecker layers and diagonal blocks (name, slice), in model order."""
    offsets, start = {}, 0
    for name, numel in zip(adapter.space.names, adapter.space.numels, strict=True):
        offsets[name] = slice(start, start + numel)
        start += numel
    layers, covered = [], set()
    for module_name, module in adapter.model.named_modules():
        kind = _kind(module)
        weight_name = f"{module_name}.weight" if module_name else "weight"
        if kind is None or weight_name not in offsets:
            continue
        bias_name = f"{module_name}.bias" if module_name else "bias"
        bias = offsets.get(bias_name) if getattr(module, "bias", None) is not None else None
        in_features, out_features = _features(module, kind)
        layers.append(KroneckerLayer(module_name, module, kind, offsets[weight_name], bias, in_features, out_features))
        covered.update({weight_name} | ({bias_name} if bias is not None else set()))
    diagonal = [(name, offsets[name]) for name in adapter.space.names if name not in covered]
    return layers, diagonal
