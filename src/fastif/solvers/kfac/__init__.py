"""K-FAC and EK-FAC: Kronecker-factored Fisher approximations of the Hessian, as solvers and as CG preconditioners.

Their factors can be kept in a Store and resumed shard by shard (:mod:`fastif.store.kfac`) and summed over ranks
(:mod:`fastif.runner.kfac`)."""

from .layers import KroneckerLayer, find_blocks
from .solvers import EKFAC, KFAC, PCG, EKFACConfig, KFACConfig, KroneckerBlock, PCGConfig, check_preconditioner

__all__ = [
    "EKFAC",
    "KFAC",
    "PCG",
    "EKFACConfig",
    "KFACConfig",
    "KroneckerBlock",
    "KroneckerLayer",
    "PCGConfig",
    "check_preconditioner",
    "find_blocks",
]
