"""K-FAC and EK-FAC: Kronecker-factored Fisher approximations of the Hessian, as solvers and as CG preconditioners."""

from .layers import KroneckerLayer, find_blocks
from .solvers import EKFAC, KFAC, PCG, EKFACConfig, KFACConfig, KroneckerBlock, PCGConfig

__all__ = [
    "EKFAC",
    "KFAC",
    "PCG",
    "EKFACConfig",
    "KFACConfig",
    "KroneckerBlock",
    "KroneckerLayer",
    "PCGConfig",
    "find_blocks",
]
