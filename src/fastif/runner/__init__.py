"""Runner stage: LiSSA chains and candidate score shards on one process, local worker processes or torchrun ranks.

One SPMD code path serves every backend: each public method runs on every rank of a ``torch.distributed`` group,
the main rank (0) supplies the inputs and owns the store, and every rank returns the same result.

* ``"serial"``: this process alone, no process group.
* ``"processes"``: this process is rank 0 and starts ``workers - 1`` local ranks once, when the runner is made
  (fork on CPU, spawn on GPUs); they join a gloo (NCCL on GPUs) group through a TCPStore on a port the OS picks,
  then run every call the main rank forwards to them over a pipe: torchrun minus the launcher.
* ``"distributed"``: inside a group launched by ``torchrun`` (``env://``; gloo on CPU, NCCL on GPU); every rank
  calls the same methods.

Work split: LiSSA chain ``r`` runs on rank ``r mod W`` (its batches are seeded by ``(seed, r)``, so the rank does
not matter) and the chain sums are all-reduced, so ``s_test`` equals the serial mean up to summation order.
Candidate indices are cut into contiguous shards of ``shard_size``; unfinished shards are dealt one per rank per
round, each round is gathered on the main rank, which saves each shard as a store entry and never recomputes a
finished one. Only the main rank touches the store, so other nodes need no shared disk, and a run killed
mid-way (even by SIGKILL) resumes from its store with identical results.
"""

from __future__ import annotations

from .config import Backend, Build, DeviceKind, Problem, RunnerConfig, StartMethod, usable_cores
from .core import Runner

__all__ = ["Backend", "Build", "DeviceKind", "Problem", "Runner", "RunnerConfig", "StartMethod", "usable_cores"]
