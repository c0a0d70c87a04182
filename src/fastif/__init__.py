"""fastif: fast influence functions. ``score = ∇L(test)ᵀ (H + damping·I)⁻¹ ∇L(train)``; positive = helpful."""

from .data import Dataset, TensorData
from .errors import FastIFError
from .hvp import Hessian
from .influence import Influence, TopK
from .model.adapter import AdapterConfig, HFClassifierAdapter, ModelAdapter, ParameterSelection, TorchAdapter
from .scores import ScoreConfig
from .solvers import (
    CG,
    Arnoldi,
    ArnoldiConfig,
    CGConfig,
    Exact,
    ExactConfig,
    Identity,
    IdentityConfig,
    LiSSA,
    LiSSAConfig,
    Solver,
)

__version__ = "0.1.0"

__all__ = [
    "CG",
    "AdapterConfig",
    "Arnoldi",
    "ArnoldiConfig",
    "CGConfig",
    "Dataset",
    "Exact",
    "ExactConfig",
    "FastIFError",
    "HFClassifierAdapter",
    "Hessian",
    "Identity",
    "IdentityConfig",
    "Influence",
    "LiSSA",
    "LiSSAConfig",
    "ModelAdapter",
    "ParameterSelection",
    "ScoreConfig",
    "Solver",
    "TensorData",
    "TopK",
    "TorchAdapter",
]
