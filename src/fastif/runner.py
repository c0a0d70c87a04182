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

import contextlib
import ctypes
import datetime
import functools
import hashlib
import json
import math
import os
import signal
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from multiprocessing.connection import Connection
from typing import Any, Literal, TypeVar

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import Tensor

from . import errors
from .adapters import ModelAdapter
from .config import config_to_dict
from .data import Dataset
from .errors import ConfigError, DataError, FastIFError, ModelError, StoreError
from .hvp import Hessian, HVPMethod
from .scores import ScoreConfig, choose_method, score_matrix
from .solvers import LiSSA, LiSSAConfig, SolveResult, solver_from_config
from .store import Store, fingerprint_parameters, fingerprint_tensors

Backend = Literal["serial", "processes", "distributed"]
DeviceKind = Literal["cpu", "cuda"]
StartMethod = Literal["auto", "fork", "spawn"]
T = TypeVar("T")

LOCALHOST = "127.0.0.1"
TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


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
        for name in ("workers", "threads", "shard_size"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value <= 0):
                raise ConfigError(f"RunnerConfig.{name} must be a positive integer, got {value!r}")
        if not self.timeout_s > 0:
            raise ConfigError(f"RunnerConfig.timeout_s must be positive, got {self.timeout_s!r}")
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


def _check_cuda(config: RunnerConfig) -> None:
    """Refuse ``device='cuda'`` on a machine without a usable GPU."""
    if config.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("RunnerConfig.device='cuda' but torch sees no GPU; use device='cpu'")


def _local_ranks(config: RunnerConfig) -> int:
    """Number of ranks of a processes runner: ``workers``, else one per GPU or per usable CPU core."""
    if config.workers is not None:
        if config.device == "cuda" and config.workers > torch.cuda.device_count():
            raise ConfigError(
                f"RunnerConfig.workers={config.workers} exceeds the {torch.cuda.device_count()} visible GPUs; "
                "use at most one rank per GPU"
            )
        return config.workers
    return torch.cuda.device_count() if config.device == "cuda" else usable_cores()


def _start_method(config: RunnerConfig, threads: int) -> str:
    """Fork on CPU with one thread per rank (fast, no pickling); spawn otherwise (GNU OpenMP hangs after fork)."""
    if config.start_method == "fork" and threads > 1:
        raise ConfigError(
            f"start_method='fork' with {threads} threads per rank can deadlock OpenMP in the children; "
            "set threads=1 or start_method='spawn'"
        )
    if config.start_method != "auto":
        return config.start_method
    return "fork" if config.device == "cpu" and threads == 1 else "spawn"


def _rank_device(kind: DeviceKind, local_rank: int) -> torch.device:
    """The device of a rank: the CPU, or the GPU numbered by its local rank."""
    if kind == "cpu":
        return torch.device("cpu")
    torch.cuda.set_device(local_rank)
    return torch.device("cuda", local_rank)


def _die_with_parent(parent_pid: int) -> None:
    """Have Linux SIGKILL this worker when its parent dies, so a killed run leaves no orphan behind."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGKILL))  # 1 = PR_SET_PDEATHSIG
    except (AttributeError, OSError):  # not Linux: the worker still exits when its pipe closes
        return
    if os.getppid() != parent_pid:
        os._exit(1)


def _heap_trimmer() -> Callable[[int], int] | None:
    """glibc's ``malloc_trim``, or None where the C library has none (musl, macOS)."""
    try:
        return ctypes.CDLL(None).malloc_trim
    except (AttributeError, OSError):
        return None


_MALLOC_TRIM = _heap_trimmer()


def _trim_heap() -> None:
    """Hand freed heap pages back to the OS after a shard.

    Without it glibc keeps the fragments of each batch's [B, P] gradients resident and RSS creeps up with the number
    of shards (benchmarks/bench_scaleout.py: peak 1,041 MiB for a 29k pool vs 649 MiB for 3k; 778 vs 783 with it).
    """
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


def _describe(error: BaseException, rank: int) -> tuple[int, str, str]:
    """A picklable (rank, class name, message) summary of an exception, sent to the other ranks."""
    return rank, type(error).__name__, str(error)


def _rebuild(description: tuple[int, str, str]) -> Exception:
    """The exception another rank raised: the same fastif error class, or a RuntimeError naming its type."""
    rank, name, message = description
    cls = getattr(errors, name, None)
    if isinstance(cls, type) and issubclass(cls, FastIFError):
        return cls(f"{message} (on rank {rank})")
    return RuntimeError(f"rank {rank} failed with {name}: {message}")


def _tensor_sha256(tensor: Tensor) -> str:
    """SHA-256 of a tensor's dtype, shape and bytes."""
    return fingerprint_tensors(tensor.detach().cpu())


def _json_ready(info: dict[str, Any]) -> dict[str, Any]:
    """The JSON-serialisable part of a solver's diagnostics (drops tensors such as norm traces)."""
    return {key: value for key, value in info.items() if not isinstance(value, Tensor)}


def _dispatched(method: Callable[..., T]) -> Callable[..., T]:
    """Mark a collective method: on a processes runner's main rank, first tell every worker to run it too."""

    @functools.wraps(method)
    def wrapper(self: Runner, *args: Any, **kwargs: Any) -> T:
        self._check_open()
        for conn in self._pipes:
            try:
                conn.send(method.__name__)
            except OSError as err:
                raise RuntimeError("a local worker process has exited; close this Runner and create a new one") from err
        return method(self, *args, **kwargs)

    return wrapper


class Runner:
    """Runs s_test solves and candidate scoring on the backend of ``config``; ``build(device)`` makes each rank's
    :class:`Problem` (a processes runner on CPU builds it once here and forks it to the workers).

    Use it as a context manager (or call :meth:`close`) so local workers and the process group are released.
    """

    def __init__(self, build: Build, config: RunnerConfig | None = None) -> None:
        self.config = config or RunnerConfig()
        _check_cuda(self.config)
        self._pipes: list[Connection] = []
        self._context: Any = None
        self._owns_group = False
        self._saved_threads: int | None = None
        self._closed = False
        self._agreed_failure = False
        self.last_run: dict[str, Any] = {}
        try:
            if self.config.backend == "serial":
                self._set_threads(self.config.threads)
                self._setup(build(_rank_device(self.config.device, 0)), 0, 1)
            elif self.config.backend == "processes":
                self._start_local_group(build)
            else:
                self._join_torchrun(build)
        except BaseException:
            self.close()  # release whatever was started: workers, the process group, the thread setting
            raise

    # ------------------------------------------------------------------------------------------------ set-up

    def _setup(self, problem: Problem, rank: int, world_size: int) -> None:
        """Record this rank's problem, place in the group, and the device collectives use."""
        if not isinstance(problem, Problem):
            raise ConfigError(f"build(device) must return a fastif.runner.Problem, got {type(problem).__name__}")
        self.problem, self.rank, self.world_size = problem, rank, world_size
        self.device = problem.adapter.device
        nccl = world_size > 1 and dist.get_backend() == "nccl"
        self._comm_device = self.device if nccl else torch.device("cpu")

    @classmethod
    def _worker(cls, problem: Problem, config: RunnerConfig, rank: int, world_size: int) -> Runner:
        """The runner object of a local worker process (rank >= 1), which only follows the main rank."""
        runner = cls.__new__(cls)
        runner.config, runner._pipes, runner._context, runner._owns_group = config, [], None, True
        runner._saved_threads, runner._closed, runner._agreed_failure, runner.last_run = None, False, False, {}
        runner._setup(problem, rank, world_size)
        return runner

    def _set_threads(self, threads: int | None) -> None:
        """Set torch's intra-op threads for this rank, remembering the old value for :meth:`close`."""
        if threads is not None:
            self._saved_threads = torch.get_num_threads()
            torch.set_num_threads(threads)

    def _start_local_group(self, build: Build) -> None:
        """Build rank 0's problem, start the local worker ranks once, and form the process group with them."""
        if dist.is_initialized():
            raise ConfigError(
                "this process is already in a torch.distributed process group (launched by torchrun?); "
                "use RunnerConfig(backend='distributed')"
            )
        world = _local_ranks(self.config)
        threads = self.config.threads or max(1, usable_cores() // world)
        method = _start_method(self.config, threads)
        self._set_threads(threads)
        problem = build(_rank_device(self.config.device, 0))
        if world == 1:
            self._setup(problem, 0, 1)
            return
        parents, children = zip(*(mp.Pipe() for _ in range(world - 1)), strict=True)
        forked = method == "fork"
        inherited = [conn.fileno() for conn in parents] if forked else []
        args = (list(children), inherited, problem if forked else build, self.config, world, threads, os.getpid())
        self._context = mp.start_processes(_worker_main, args, world - 1, join=False, daemon=True, start_method=method)
        self._pipes = list(parents)
        for conn in children:
            conn.close()
        timeout = datetime.timedelta(seconds=self.config.timeout_s)
        store = dist.TCPStore(LOCALHOST, 0, world, is_master=True, wait_for_workers=False, timeout=timeout)
        for conn in self._pipes:
            conn.send(store.port)
        self._await_workers()
        backend = "nccl" if self.config.device == "cuda" else "gloo"
        dist.init_process_group(backend, store=store, rank=0, world_size=world, timeout=timeout)
        self._owns_group = True
        self._setup(problem, 0, world)

    def _await_workers(self) -> None:
        """Wait until every worker has built its problem; raise its error, or say which one died."""
        deadline = time.monotonic() + self.config.timeout_s
        for index, conn in enumerate(self._pipes):
            process = self._context.processes[index]
            while not conn.poll(0.05):
                if not process.is_alive():
                    raise RuntimeError(f"local rank {index + 1} exited during start-up (exit code {process.exitcode})")
                if time.monotonic() > deadline:
                    raise RuntimeError(f"local rank {index + 1} did not start within {self.config.timeout_s} s")
            status, detail = conn.recv()
            if status != "ready":
                raise _rebuild(detail)

    def _join_torchrun(self, build: Build) -> None:
        """Join (or reuse) the torchrun process group: env:// rendezvous, gloo on CPU, NCCL on GPU."""
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        device = _rank_device(self.config.device, local_rank)
        if not dist.is_initialized():
            missing = [name for name in TORCHRUN_ENV if name not in os.environ]
            if missing:
                raise ConfigError(
                    f"backend='distributed' runs inside torchrun, but {', '.join(missing)} are unset; launch with "
                    "`torchrun --nproc_per_node N script.py`, or use backend='processes' on one machine"
                )
            backend = "nccl" if self.config.device == "cuda" else "gloo"
            timeout = datetime.timedelta(seconds=self.config.timeout_s)
            dist.init_process_group(backend, init_method="env://", timeout=timeout)
            self._owns_group = True
        self._set_threads(self.config.threads or max(1, usable_cores() // local_world))
        self._setup(build(device), dist.get_rank(), dist.get_world_size())

    def close(self) -> None:
        """Stop the local workers, leave a process group this runner created, and restore torch's thread count."""
        if self._closed:
            return
        self._closed = True
        for conn in self._pipes:
            with contextlib.suppress(OSError):  # that worker is already gone
                conn.send(None)
            conn.close()
        if self._owns_group and dist.is_initialized():
            dist.destroy_process_group()
        if self._context is not None:
            self._join_workers()
        if self._saved_threads is not None:
            torch.set_num_threads(self._saved_threads)

    def _join_workers(self) -> None:
        """Wait briefly for the workers to exit after their pipes close, then terminate any straggler."""
        deadline = time.monotonic() + 10.0
        for process in self._context.processes:
            process.join(max(0.0, deadline - time.monotonic()))
            if process.is_alive():
                process.terminate()
                process.join()

    def __enter__(self) -> Runner:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _check_open(self) -> None:
        if self._closed:
            raise ConfigError("this Runner is closed; create a new one")

    @property
    def is_main(self) -> bool:
        """Whether this is rank 0: the rank that takes inputs, owns the store and may write outputs."""
        return self.rank == 0

    # ------------------------------------------------------------------------------------------------ collectives

    def _on_main(self, fn: Callable[[], tuple[Any, Any]]) -> tuple[Any, Any]:
        """Run ``fn() -> (header, private)`` on the main rank and send ``header`` (or its error) to every rank."""
        header, private, error = None, None, None
        if self.is_main:
            try:
                header, private = fn()
            except Exception as exc:
                error = exc
        if self.world_size > 1:
            box = [("error", _describe(error, 0)) if error is not None else ("ok", header)]
            dist.broadcast_object_list(box, src=0)
            status, header = box[0]
            if status == "error" and error is None:
                self._agreed_failure = True
                raise _rebuild(header)
        if error is not None:
            raise error
        return header, private

    def _agree(self, error: Exception | None) -> None:
        """Collective check after work every rank did: if any rank failed, raise that failure on all of them."""
        if self.world_size == 1:
            if error is not None:
                raise error
            return
        flag = torch.tensor([0 if error is None else 1], device=self._comm_device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if not int(flag.item()):
            return
        described: list[Any] = [None] * self.world_size
        dist.all_gather_object(described, None if error is None else _describe(error, self.rank))
        self._agreed_failure = True
        if error is not None:
            raise error
        raise _rebuild(next(item for item in described if item is not None))

    def _attempt(self, fn: Callable[[], T]) -> tuple[T | None, Exception | None]:
        """Run ``fn`` and return ``(result, None)`` or ``(None, error)``, so the error can be agreed on first."""
        try:
            return fn(), None
        except Exception as exc:
            return None, exc

    def _broadcast(self, tensor: Tensor | None, shape: Sequence[int], dtype: torch.dtype) -> Tensor:
        """The main rank's ``tensor`` on every rank, on this rank's device."""
        if self.world_size == 1:
            assert tensor is not None
            return tensor.to(self.device)
        if self.is_main:
            buffer = tensor.to(self._comm_device, dtype).contiguous()
        else:
            buffer = torch.empty(tuple(shape), dtype=dtype, device=self._comm_device)
        dist.broadcast(buffer, src=0)
        return buffer.to(self.device)

    def _all_reduce(self, tensor: Tensor) -> Tensor:
        """Sum of ``tensor`` over the ranks, on every rank."""
        if self.world_size == 1:
            return tensor
        buffer = tensor.to(self._comm_device)
        dist.all_reduce(buffer)
        return buffer.to(tensor.device)

    def _gather(self, tensor: Tensor) -> list[Tensor]:
        """Every rank's ``tensor`` (same shape everywhere) on the main rank, in rank order; [] elsewhere."""
        if self.world_size == 1:
            return [tensor]
        buffer = tensor.to(self._comm_device).contiguous()
        parts = [torch.empty_like(buffer) for _ in range(self.world_size)] if self.is_main else None
        dist.gather(buffer, parts, dst=0)
        return [part.to(tensor.device) for part in parts] if parts is not None else []

    def _check_model(self, fingerprint: str) -> None:
        """Refuse to go on if any rank's selected parameters differ from the main rank's."""
        if self.world_size == 1:
            return
        own = fingerprint_parameters({"flat": self.problem.adapter.flat_params()})
        mismatch = None
        if own != fingerprint:
            mismatch = ModelError(
                f"rank {self.rank}'s model parameters differ from rank 0's: build every rank's model identically "
                "(same checkpoint and seed) and do not change the model after creating the Runner"
            )
        self._agree(mismatch)

    def _fingerprint(self) -> str:
        return fingerprint_parameters({"flat": self.problem.adapter.flat_params()})

    def _hessian(self) -> Hessian:
        """This rank's training Hessian at the model's current selected parameters."""
        p = self.problem
        return Hessian(p.adapter, p.train, p.adapter.flat_params(), p.hessian_batch_size, p.hvp_method)

    # ------------------------------------------------------------------------------------------------ s_test

    @_dispatched
    def solve(
        self, config: Any = None, vectors: Tensor | None = None, store: Store | None = None, name: str = "s_test"
    ) -> SolveResult:
        """``s_test = (H + damping·I)⁻¹ v`` for the rows of ``vectors`` [k, P] with solver ``config``.

        LiSSA chains are spread over the ranks; other solvers run on the main rank. Arguments are read on the main
        rank only. With a ``store`` the result is saved as entry ``name`` and later calls load it instead.
        """
        header, private = self._on_main(lambda: self._solve_plan(config, vectors, store, name))
        self._check_model(header["model"])
        if header["stored"]:
            return SolveResult(self._broadcast(private, header["shape"], header["dtype"]), header["info"])
        vectors = self._broadcast(private, header["shape"], header["dtype"])
        hessian = self._hessian()
        if isinstance(header["config"], LiSSAConfig):
            result = self._lissa(header["config"], hessian, vectors)
        else:
            result = self._solve_on_main(header["config"], hessian, vectors)
        if self.is_main and store is not None:
            meta = {**header["meta"], "info": _json_ready(result.info)}
            self._agree(self._attempt(lambda: store.save(name, result.x, meta))[1])
        else:
            self._agree(None)
        return result

    def _solve_plan(
        self, config: Any, vectors: Tensor | None, store: Store | None, name: str
    ) -> tuple[dict[str, Any], Tensor | None]:
        """Main rank: validate the inputs and load a finished s_test entry if the store has one."""
        solver_from_config(config)  # refuses anything that is not a solver config
        vectors = self._check_vectors(vectors, "vectors")
        meta = {"vectors_sha256": _tensor_sha256(vectors), "solver": config_to_dict(config)}
        header = {"model": self._fingerprint(), "config": config, "shape": list(vectors.shape)}
        header.update(dtype=vectors.dtype, meta=meta, stored=False, info={})
        if store is not None and store.has(name):
            stored = store.meta(name)
            if {key: stored.get(key) for key in meta} != json.loads(json.dumps(meta)):
                raise StoreError(
                    f"store entry {name!r} in {store.folder} holds s_test for other test vectors or another solver "
                    "config; pass another name, or rerun with --overwrite"
                )
            header.update(stored=True, info={**stored.get("info", {}), "loaded": True})
            return header, store.load(name)
        return header, vectors

    def _check_vectors(self, vectors: Tensor | None, what: str) -> Tensor:
        """Refuse anything but a non-empty floating [k, P] tensor with P = the number of selected parameters."""
        size = self.problem.adapter.num_params
        if not isinstance(vectors, Tensor) or vectors.dim() != 2 or not vectors.is_floating_point():
            raise DataError(f"{what} must be a floating tensor [k, P] (one row per test point) on the main rank")
        if vectors.shape[0] == 0 or vectors.shape[1] != size:
            raise DataError(f"{what} has shape {tuple(vectors.shape)}; expected [k >= 1, {size}] (P selected params)")
        return vectors.detach()

    def _solve_on_main(self, config: Any, hessian: Hessian, vectors: Tensor) -> SolveResult:
        """A non-LiSSA solver: fit and solve on the main rank, then share the result."""
        result, error = (None, None)
        if self.is_main:
            result, error = self._attempt(lambda: solver_from_config(config).fit(hessian).solve(vectors))
        self._agree(error)
        x = self._broadcast(result.x if result is not None else None, vectors.shape, vectors.dtype)
        info, _ = self._on_main(lambda: (_json_ready(result.info), None))
        return SolveResult(x, result.info if result is not None else info)

    def _lissa(self, config: Any, hessian: Hessian, vectors: Tensor) -> SolveResult:
        """LiSSA with chain r on rank r mod W; the chain sums and norm traces are all-reduced."""
        fitted, _ = self._on_main(lambda: self._fit_lissa(config, hessian))
        solver = LiSSA(replace(config, scale=fitted["scale"]))
        solver.fit(hessian)
        solver.top_eigenvalue = fitted["top_eigenvalue"]
        local = torch.zeros_like(vectors)
        traces = torch.zeros(config.repeats, config.depth, dtype=torch.float64)

        def run_chains() -> None:
            for repeat in range(self.rank, config.repeats, self.world_size):
                estimate, trace = solver.run_chain(vectors, repeat)
                local.add_(estimate)
                traces[repeat] = trace

        self._agree(self._attempt(run_chains)[1])
        total, traces = self._all_reduce(local), self._all_reduce(traces)
        info = solver.diagnostics(traces)
        if self.is_main:
            solver.warn_if_unsettled(info, stacklevel=5)  # points at the caller of Runner.solve
        return SolveResult(total / config.repeats, info)

    def _fit_lissa(self, config: Any, hessian: Hessian) -> tuple[dict[str, float | None], None]:
        """Main rank: fit LiSSA (estimating its scale if unset) so every rank uses the same scale."""
        solver = LiSSA(config).fit(hessian)
        return {"scale": solver.scale, "top_eigenvalue": solver.top_eigenvalue}, None

    # ------------------------------------------------------------------------------------------------ scores

    @_dispatched
    def scores(
        self,
        s_test: Tensor | None = None,
        indices: Sequence[int] | None = None,
        store: Store | None = None,
        prefix: str = "scores",
        score: ScoreConfig | None = None,
    ) -> Tensor:
        """Scores [k, n] of training points ``indices`` (default: all) against the s_test rows [k, P], in order.

        The candidates are cut into shards of ``shard_size``, dealt over the ranks and gathered back in order;
        with a ``store`` each shard is saved as entry ``<prefix>-<shard>`` and finished shards are loaded, never
        recomputed. Arguments are read on the main rank only; every rank returns the full matrix.
        """
        header, private = self._on_main(lambda: self._score_plan(s_test, indices, store, prefix, score))
        self._check_model(header["model"])
        k, n, size = header["k"], header["n"], header["shard_size"]
        s_test = self._broadcast(private and private["s_test"], (k, header["p"]), header["dtype"])
        positions = self._broadcast(private and private["indices"], (n,), torch.int64).cpu()
        result = private["result"] if self.is_main else None
        todo, error = header["todo"], None
        for start in range(0, len(todo), self.world_size):
            round_shards = todo[start : start + self.world_size]
            mine = round_shards[self.rank] if self.rank < len(round_shards) else None
            part, failure = self._attempt(lambda m=mine: self._score_shard(s_test, positions, m, size, header))
            self._agree(error or failure)
            parts = self._gather(part)
            if self.is_main:
                error = self._attempt(lambda p=parts, r=round_shards: self._keep(p, r, result, store, header))[1]
        self._agree(error)
        result = self._broadcast(result, (k, n), header["dtype"])
        if self.is_main:
            self.last_run = {"shards": header["shards"], "loaded": header["done"], "computed": todo}
        return result

    def _score_plan(
        self,
        s_test: Tensor | None,
        indices: Sequence[int] | None,
        store: Store | None,
        prefix: str,
        score: ScoreConfig | None,
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        """Main rank: validate the inputs, fingerprint the shard plan and load the finished shards from the store."""
        s_test = self._check_vectors(s_test, "s_test")
        score = score or ScoreConfig()
        choose_method(score, s_test.shape[0])  # refuses an unknown method
        positions = self._check_indices(indices)
        size = self.config.shard_size
        shards = math.ceil(len(positions) / size)
        plan = self._plan_fingerprint(s_test, positions, score)
        header = {"model": self._fingerprint(), "k": s_test.shape[0], "p": s_test.shape[1], "n": len(positions)}
        header.update(dtype=s_test.dtype, shard_size=size, score=score, plan=plan, prefix=prefix, shards=shards)
        result = torch.zeros(s_test.shape[0], len(positions), dtype=s_test.dtype, device=self.device)
        done = self._load_shards(store, header, result) if store is not None else []
        header.update(done=done, todo=[shard for shard in range(shards) if shard not in set(done)])
        return header, {"s_test": s_test, "indices": positions, "result": result}

    def _check_indices(self, indices: Sequence[int] | None) -> Tensor:
        """The candidate indices as an int64 tensor; DataError if empty or out of range."""
        n = len(self.problem.train)
        if indices is None:
            return torch.arange(n, dtype=torch.int64)
        positions = torch.as_tensor(list(indices) if not isinstance(indices, Tensor) else indices, dtype=torch.int64)
        if positions.dim() != 1 or positions.numel() == 0:
            raise DataError("indices must be a non-empty list of training indices (or None for all)")
        if int(positions.min()) < 0 or int(positions.max()) >= n:
            raise DataError(f"indices must lie in [0, {n - 1}] for a training set of {n} examples")
        return positions

    def _plan_fingerprint(self, s_test: Tensor, positions: Tensor, score: ScoreConfig) -> str:
        """SHA-256 of what decides every shard's content: s_test, candidate indices, shard size and score config."""
        digest = hashlib.sha256(b"fastif-score-plan-v1\0")
        digest.update(_tensor_sha256(s_test).encode() + _tensor_sha256(positions).encode())
        digest.update(json.dumps([self.config.shard_size, config_to_dict(score)], sort_keys=True).encode())
        return digest.hexdigest()

    def _load_shards(self, store: Store, header: dict[str, Any], result: Tensor) -> list[int]:
        """Main rank: copy the store's finished shards into ``result`` after checking they belong to this plan."""
        prefix, size, n = header["prefix"], header["shard_size"], header["n"]
        done = store.completed_shards(prefix)
        for shard in done:
            name = Store.shard_name(prefix, shard)
            start, stop = shard * size, min(n, (shard + 1) * size)
            if store.meta(name) != {"plan": header["plan"], "start": start, "stop": stop}:
                raise StoreError(
                    f"store entry {name!r} in {store.folder} was computed for other s_test vectors, candidates, "
                    "shard size or score config; pass another prefix, or rerun with --overwrite"
                )
            result[:, start:stop] = store.load(name).to(result.device)
        return done

    def _score_shard(
        self, s_test: Tensor, positions: Tensor, shard: int | None, size: int, header: dict[str, Any]
    ) -> Tensor:
        """Scores of one shard, zero-padded to [k, shard_size] so every rank sends the same shape (a blank if idle)."""
        padded = torch.zeros(header["k"], size, dtype=header["dtype"], device=self.device)
        if shard is None:
            return padded
        chunk = positions[shard * size : (shard + 1) * size].tolist()
        problem = self.problem
        flat = problem.adapter.flat_params()
        padded[:, : len(chunk)] = score_matrix(problem.adapter, flat, s_test, problem.train, chunk, header["score"])
        _trim_heap()
        return padded

    def _keep(
        self, parts: list[Tensor], shards: list[int], result: Tensor, store: Store | None, header: dict[str, Any]
    ) -> None:
        """Main rank: place a round's gathered shards into ``result`` and save each as a store entry."""
        size, n = header["shard_size"], header["n"]
        for part, shard in zip(parts, shards, strict=False):
            start, stop = shard * size, min(n, (shard + 1) * size)
            result[:, start:stop] = part[:, : stop - start]
            if store is not None:
                meta = {"plan": header["plan"], "start": start, "stop": stop}
                store.save(Store.shard_name(header["prefix"], shard), result[:, start:stop], meta)

    # ------------------------------------------------------------------------------------------------ workers

    def _serve(self, conn: Connection) -> None:
        """Worker loop: run each method the main rank names, until it says stop or its pipe closes."""
        while True:
            try:
                name = conn.recv()
            except (EOFError, OSError):
                return
            if name is None:
                return
            self._agreed_failure = False
            try:
                getattr(self, name)()
            except Exception:
                if not self._agreed_failure:  # a broken group, not an error every rank agreed on: give up
                    raise


def _worker_main(
    index: int,
    pipes: list[Connection],
    inherited: list[int],
    payload: Problem | Build,
    config: RunnerConfig,
    world: int,
    threads: int,
    parent_pid: int,
) -> None:
    """Entry point of local rank ``index + 1``: build (or inherit, if forked) its problem, join the group, serve calls.

    A forked worker closes its copies of the parent's pipe ends (``inherited``), so it sees EOF when the parent dies.
    """
    _die_with_parent(parent_pid)
    torch.set_num_threads(threads)
    rank, conn = index + 1, pipes[index]
    for fd in inherited:
        os.close(fd)
    for other in pipes:
        if other is not conn:
            other.close()
    try:
        port = conn.recv()
        problem = payload if isinstance(payload, Problem) else payload(_rank_device(config.device, rank))
        conn.send(("ready", None))
    except Exception as exc:
        conn.send(("error", _describe(exc, rank)))
        return
    timeout = datetime.timedelta(seconds=config.timeout_s)
    store = dist.TCPStore(LOCALHOST, port, world, is_master=False, timeout=timeout)
    backend = "nccl" if config.device == "cuda" else "gloo"
    dist.init_process_group(backend, store=store, rank=rank, world_size=world, timeout=timeout)
    runner = Runner._worker(problem, config, rank, world)
    try:
        runner._serve(conn)
    finally:
        runner.close()
