"""Process-group plumbing of the runner: start the local ranks or join torchrun's, and the collectives every stage
uses (main-rank broadcasts, agreed errors, all-reduce, gather), so that a failure on any rank reaches every rank."""

from __future__ import annotations

import contextlib
import ctypes
import datetime
import functools
import gc
import os
import signal
import time
from collections.abc import Callable, Sequence
from multiprocessing.connection import Connection
from typing import Any, TypeVar

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import Tensor

from .. import errors
from ..errors import ConfigError, FastIFError
from .config import Build, Problem, RunnerConfig, check_cuda, local_ranks, rank_device, start_method, usable_cores

T = TypeVar("T")

LOCALHOST = "127.0.0.1"
TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def die_with_parent(parent_pid: int) -> None:
    """Have Linux SIGKILL this worker when its parent dies, so a killed run leaves no orphan behind."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGKILL))  # 1 = PR_SET_PDEATHSIG
    except (AttributeError, OSError):  # not Linux: the worker still exits when its pipe closes
        return
    if os.getppid() != parent_pid:
        os._exit(1)


def leave_stops_to_the_main_rank() -> None:
    """In a worker: ignore Ctrl-C (the terminal sends it to every process) and die at once on SIGTERM (a forked
    worker inherits the CLI's handler), so the main rank handles the interrupt and terminates its workers."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def describe(error: BaseException, rank: int) -> tuple[int, str, str]:
    """A picklable (rank, class name, message) summary of an exception, sent to the other ranks."""
    return rank, type(error).__name__, str(error)


def rebuild(description: tuple[int, str, str]) -> Exception:
    """The exception another rank raised: the same fastif error class, or a RuntimeError naming its type."""
    rank, name, message = description
    cls = getattr(errors, name, None)
    if isinstance(cls, type) and issubclass(cls, FastIFError):
        return cls(f"{message} (on rank {rank})")
    return RuntimeError(f"rank {rank} failed with {name}: {message}")


def dispatched(method: Callable[..., T]) -> Callable[..., T]:
    """Mark a collective method: on a processes runner's main rank, first tell every worker to run it too."""

    @functools.wraps(method)
    def wrapper(self: RankGroup, *args: Any, **kwargs: Any) -> T:
        self._check_open()
        for conn in self._pipes:
            try:
                conn.send(method.__name__)
            except OSError as err:
                raise RuntimeError("a local worker process has exited; close this Runner and create a new one") from err
        return method(self, *args, **kwargs)

    return wrapper


class RankGroup:
    """This process's place among the ranks of a backend, and the collectives the runner's stages use.

    Creating one starts the backend: nothing for "serial", the local worker ranks for "processes" (once, here),
    or joins the torchrun group for "distributed". Attributes: ``rank``, ``world_size``, ``device`` and ``problem``
    (every rank holds the same :class:`Problem`).
    """

    def __init__(self, build: Build, config: RunnerConfig | None = None) -> None:
        self.config = config or RunnerConfig()
        check_cuda(self.config)
        self._pipes: list[Connection] = []
        self._context: Any = None
        self._owns_group = False
        self._saved_threads: int | None = None
        self._closed = False
        self._agreed_failure = False
        try:
            if self.config.backend == "serial":
                self._set_threads(self.config.threads)
                self._setup(build(rank_device(self.config.device, 0)), 0, 1)
            elif self.config.backend == "processes":
                self._start_local_group(build)
            else:
                self._join_torchrun(build)
        except BaseException as error:
            self.close(wait=not isinstance(error, KeyboardInterrupt))  # release workers, process group, threads
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
    def _worker(cls, problem: Problem, config: RunnerConfig, rank: int, world_size: int) -> RankGroup:
        """The runner object of a local worker process (rank >= 1), which only follows the main rank."""
        runner = cls.__new__(cls)
        runner.config, runner._pipes, runner._context, runner._owns_group = config, [], None, True
        runner._saved_threads, runner._closed, runner._agreed_failure = None, False, False
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
        world = local_ranks(self.config)
        threads = self.config.threads or max(1, usable_cores() // world)
        method = start_method(self.config, threads)
        self._set_threads(threads)
        problem = build(rank_device(self.config.device, 0))
        if world == 1:
            self._setup(problem, 0, 1)
            return
        parents, children = zip(*(mp.Pipe() for _ in range(world - 1)), strict=True)
        forked = method == "fork"
        inherited = [conn.fileno() for conn in parents] if forked else []
        payload = problem if forked else build
        args = (type(self), list(children), inherited, payload, self.config, world, threads, os.getpid())
        self._context = mp.start_processes(worker_main, args, world - 1, join=False, daemon=True, start_method=method)
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
                raise rebuild(detail)

    def _join_torchrun(self, build: Build) -> None:
        """Join (or reuse) the torchrun process group: env:// rendezvous, gloo on CPU, NCCL on GPU."""
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        device = rank_device(self.config.device, local_rank)
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

    def close(self, wait: bool = True) -> None:
        """Stop the local workers, leave a process group this runner created, and restore torch's thread count.

        ``wait=False`` (after an interrupt) terminates the workers at once: they may be stuck in a collective.
        """
        if self._closed:
            return
        self._closed = True
        for conn in self._pipes:
            with contextlib.suppress(OSError):  # that worker is already gone
                conn.send(None)
            conn.close()
        if self._owns_group and dist.is_initialized():
            dist.destroy_process_group()
            # Collect the reference cycles that still hold gloo objects now: left to interpreter shutdown, their
            # C++ threads are destroyed unjoined and the rank aborts ("terminate called without an active exception").
            gc.collect()
        if self._context is not None:
            self._join_workers(10.0 if wait else 0.0)
        if self._saved_threads is not None:
            torch.set_num_threads(self._saved_threads)

    def _join_workers(self, grace: float) -> None:
        """Wait up to ``grace`` seconds for the workers to exit after their pipes close, then terminate stragglers."""
        deadline = time.monotonic() + grace
        for process in self._context.processes:
            process.join(max(0.0, deadline - time.monotonic()))
            if process.is_alive():
                process.terminate()
                process.join()

    def __enter__(self) -> RankGroup:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, error: BaseException | None, traceback: object) -> None:
        self.close(wait=not isinstance(error, KeyboardInterrupt))

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
            box = [("error", describe(error, 0)) if error is not None else ("ok", header)]
            dist.broadcast_object_list(box, src=0)
            status, header = box[0]
            if status == "error" and error is None:
                self._agreed_failure = True
                raise rebuild(header)
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
        dist.all_gather_object(described, None if error is None else describe(error, self.rank))
        self._agreed_failure = True
        if error is not None:
            raise error
        raise rebuild(next(item for item in described if item is not None))

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


def worker_main(
    index: int,
    cls: type[RankGroup],
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
    die_with_parent(parent_pid)
    leave_stops_to_the_main_rank()
    torch.set_num_threads(threads)
    rank, conn = index + 1, pipes[index]
    for fd in inherited:
        os.close(fd)
    for other in pipes:
        if other is not conn:
            other.close()
    try:
        port = conn.recv()
        problem = payload if isinstance(payload, Problem) else payload(rank_device(config.device, rank))
        conn.send(("ready", None))
    except Exception as exc:
        conn.send(("error", describe(exc, rank)))
        return
    timeout = datetime.timedelta(seconds=config.timeout_s)
    store = dist.TCPStore(LOCALHOST, port, world, is_master=False, timeout=timeout)
    backend = "nccl" if config.device == "cuda" else "gloo"
    dist.init_process_group(backend, store=store, rank=rank, world_size=world, timeout=timeout)
    runner = cls._worker(problem, config, rank, world)
    try:
        runner._serve(conn)
    finally:
        runner.close()
