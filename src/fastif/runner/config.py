"""Runner settings: the backend config, what each rank needs (a :class:`Problem`), and how ranks and devices are
counted. No process is started here."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch

from ..config import check_number
from ..data import Dataset
from ..errors import ConfigError
from ..hvp import HVPMethod
from ..model.adapter import ModelAdapter

Backend = Literal["serial", "processes", "distributed"]
DeviceKind = Literal["cpu", "cuda"]
StartMethod = Literal["auto", "fork", "spawn"]


@dataclass(frozen=True)
class RunnerConfig:
    """Where the work runs: backend, local ranks, torch threads per rank, device, shard size, start method, timeout.

    ``workers`` (processes only) counts every local rank, this process included; default one per usable CPU core,
    or per GPU. ``threads`` defaults to usable cores // local ranks (at least 1), so W = cores gives 1 thread each.
    """

    backend: Backend = "serial"
    workers: int | None = None
    threads: int | None = None
    device: DeviceKind = "cpu"
    shard_size: int = 1024
    start_method: StartMethod = "auto"
    timeout_s: float = 3600.0

    def __post_init__(self) -> None:
        """Refuse unknown choices, non-positive sizes and option combinations that cannot work."""
        for name, allowed in (("backend", Backend), ("device", DeviceKind), ("start_method", StartMethod)):
            if getattr(self, name) not in allowed.__args__:
                raise ConfigError(f"RunnerConfig.{name} must be one of {allowed.__args__}, got {getattr(self, name)!r}")
        for name in ("workers", "threads"):
            check_number(f"runner.{name}", getattr(self, name), integer=True, minimum=1, optional=True)
        check_number("runner.shard_size", self.shard_size, integer=True, minimum=1)
        check_number("runner.timeout_s", self.timeout_s, above=0)
        if self.workers not in (None, 1) and self.backend != "processes":
            fix = "torchrun --nproc_per_node sets it" if self.backend == "distributed" else "use backend='processes'"
            raise ConfigError(f"RunnerConfig.workers={self.workers} needs backend='processes' ({fix})")
        if self.start_method == "fork" and self.device == "cuda":
            raise ConfigError("CUDA cannot be used in forked processes; set start_method='spawn' (or 'auto')")


@dataclass(frozen=True)
class Problem:
    """What every rank needs: the model adapter, the training set and how to form training-Hessian products."""

    adapter: ModelAdapter
    train: Dataset
    hessian_batch_size: int = 64
    hvp_method: HVPMethod = "double-backward"


Build = Callable[[torch.device], Problem]


def usable_cores() -> int:
    """CPU cores this process may run on (its affinity mask), which is what one rank per core should count."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def check_cuda(config: RunnerConfig) -> None:
    """Refuse ``device='cuda'`` on a machine without a usable GPU."""
    if config.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("RunnerConfig.device='cuda' but torch sees no GPU; use device='cpu'")


def local_ranks(config: RunnerConfig) -> int:
    """Number of ranks of a processes runner: ``workers``, else one per GPU or per usable CPU core."""
    if config.workers is not None:
        if config.device == "cuda" and config.workers > torch.cuda.device_count():
            raise ConfigError(
                f"RunnerConfig.workers={config.workers} exceeds the {torch.cuda.device_count()} visible GPUs; "
                "use at most one rank per GPU"
            )
        return config.workers
    return torch.cuda.device_count() if config.device == "cuda" else usable_cores()


def start_method(config: RunnerConfig, threads: int) -> str:
    """Fork on CPU with one thread per rank (fast, no pickling); spawn otherwise (GNU OpenMP hangs after fork)."""
    if config.start_method == "fork" and threads > 1:
        raise ConfigError(
            f"start_method='fork' with {threads} threads per rank can deadlock OpenMP in the children; "
            "set threads=1 or start_method='spawn'"
        )
    if config.start_method != "auto":
        return config.start_method
    return "fork" if config.device == "cpu" and threads == 1 else "spawn"


def rank_device(kind: DeviceKind, local_rank: int) -> torch.device:
    """The device of a rank: the CPU, or the GPU numbered by its local rank."""
    if kind == "cpu":
        return torch.device("cpu")
    torch.cuda.set_device(local_rank)
    return torch.device("cuda", local_rank)
