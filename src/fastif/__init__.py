"""fastif: fast influence functions. ``score = ∇L(test)ᵀ (H + damping·I)⁻¹ ∇L(train)``; positive = helpful."""

from .checkpoints import CheckpointInfluence
from .data import Dataset, TensorData
from .data.documents import LMDocuments
from .errors import FastIFError
from .hvp import Hessian
from .influence import CandidateScores, Influence, TopK
from .model.adapter import (
    AdapterConfig,
    HFClassifierAdapter,
    MeasuredAdapter,
    ModelAdapter,
    ParameterSelection,
    TorchAdapter,
)
from .model.causal_lm import HFCausalLMAdapter
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
from .solvers.kfac import EKFAC, KFAC, PCG, EKFACConfig, KFACConfig, PCGConfig

__version__ = "0.1.0"

__all__ = [
    "CG",
    "EKFAC",
    "KFAC",
    "PCG",
    "AdapterConfig",
    "Arnoldi",
    "ArnoldiConfig",
    "CGConfig",
    "CandidateScores",
    "CheckpointInfluence",
    "Dataset",
    "EKFACConfig",
    "Exact",
    "ExactConfig",
    "FastIFError",
    "HFCausalLMAdapter",
    "HFClassifierAdapter",
    "Hessian",
    "Identity",
    "IdentityConfig",
    "Influence",
    "KFACConfig",
    "LMDocuments",
    "LiSSA",
    "LiSSAConfig",
    "MeasuredAdapter",
    "ModelAdapter",
    "PCGConfig",
    "ParameterSelection",
    "ScoreConfig",
    "Solver",
    "TensorData",
    "TopK",
    "TorchAdapter",
]
