"""K-FAC and EK-FAC: Kronecker-factored Fisher approximations of the Hessian, as solvers and as CG preconditioners."""

from .layers import KroneckerLayer, find_blocks
from .ranks import FactorRanks
from .solvers import EKFAC, KFAC, PCG, EKFACConfig, KFACConfig, KroneckerBlock, PCGConfig
from .storage import factor_store

__all__ = [
    "EKFAC",
    "KFAC",
    "PCG",
    "EKFACConfig",
    "FactorRanks",
    "KFACConfig",
    "KroneckerBlock",
    "KroneckerLayer",
    "PCGConfig",
    "factor_store",
    "find_blocks",
]
