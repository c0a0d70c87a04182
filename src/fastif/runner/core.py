"""The runner: s_test solves (LiSSA chains spread over the ranks) and candidate scores (shards dealt over the
ranks, gathered in order, saved to and resumed from the store by the main rank)."""

from __future__ import annotations

import ctypes
import hashlib
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

import torch
from torch import Tensor

from ..config import config_to_dict
from ..errors import DataError, ModelError, StoreError
from ..fingerprint import fingerprint_parameters, fingerprint_tensors
from ..hvp import Hessian
from ..scores import ScoreConfig, choose_method, score_dtype, score_matrix
from ..solvers import LiSSA, LiSSAConfig, SolveResult, solver_from_config
from ..store import Store
from .config import Build, RunnerConfig
from .group import RankGroup, dispatched


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


def _tensor_sha256(tensor: Tensor) -> str:
    """SHA-256 of a tensor's dtype, shape and bytes."""
    return fingerprint_tensors(tensor.detach().cpu())


def _json_ready(info: dict[str, Any]) -> dict[str, Any]:
    """The JSON-serialisable part of a solver's diagnostics (drops tensors such as norm traces)."""
    return {key: value for key, value in info.items() if not isinstance(value, Tensor)}


def _chains_spread(config: Any) -> bool:
    """True for a fixed-mode LiSSA without a preconditioner: its chains are independent given the scale, so each
    rank runs its share (the automatic mode warm-starts each attempt from the last; a preconditioner would be
    refitted on every rank)."""
    return isinstance(config, LiSSAConfig) and not config.adaptive and config.preconditioner is None


class Runner(RankGroup):
    """Runs s_test solves and candidate scoring on the backend of ``config``; ``build(device)`` makes each rank's
    :class:`Problem` (a processes runner on CPU builds it once here and forks it to the workers).

    Use it as a context manager (or call :meth:`close`) so local workers and the process group are released.
    ``last_run`` (main rank) says which shards the last :meth:`scores` call loaded and which it computed.
    """

    def __init__(self, build: Build, config: RunnerConfig | None = None) -> None:
        self.last_run: dict[str, Any] = {}
        super().__init__(build, config)

    def _check_model(self, fingerprint: str) -> None:
        """Refuse to go on if any rank's selected parameters differ from the main rank's."""
        if self.world_size == 1:
            return
        mismatch = None
        if self._fingerprint() != fingerprint:
            mismatch = ModelError(
                f"rank {self.rank}'s model parameters differ from rank 0's: build every rank's model identically "
                "(same checkpoint and seed) and do not change the model after creating the Runner"
            )
        self._agree(mismatch)

    def _fingerprint(self) -> str:
        """SHA-256 of this rank's selected parameters, as the store's model fingerprint is computed."""
        return fingerprint_parameters({"flat": self.problem.adapter.flat_params()})

    def _hessian(self) -> Hessian:
        """This rank's training Hessian at the model's current selected parameters."""
        p = self.problem
        return Hessian(p.adapter, p.train, p.adapter.flat_params(), p.hessian_batch_size, p.hvp_method)

    # ------------------------------------------------------------------------------------------------ s_test

    @dispatched
    def solve(
        self, config: Any = None, vectors: Tensor | None = None, store: Store | None = None, name: str = "s_test"
    ) -> SolveResult:
        """``s_test = (H + damping·I)⁻¹ v`` for the rows of ``vectors`` [k, P] with solver ``config``.

        Fixed-mode LiSSA chains without a preconditioner are spread over the ranks; other solvers (and the
        automatic or preconditioned LiSSA) run on the main rank. Arguments are read on the main rank only. With a
        ``store`` the result is saved as entry ``name`` and later calls load it instead.
        """
        header, private = self._on_main(lambda: self._solve_plan(config, vectors, store, name))
        self._check_model(header["model"])
        if header["stored"]:
            return SolveResult(self._broadcast(private, header["shape"], header["dtype"]), header["info"])
        vectors = self._broadcast(private, header["shape"], header["dtype"])
        hessian = self._hessian()
        if _chains_spread(header["config"]):
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

    @dispatched
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
        dtype = score_dtype(score, s_test)
        header.update(dtype=dtype, shard_size=size, score=score, plan=plan, prefix=prefix, shards=shards)
        result = torch.zeros(s_test.shape[0], len(positions), dtype=dtype, device=self.device)
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
