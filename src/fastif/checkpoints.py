"""Checkpoints: multi-checkpoint TracIn and checkpoint ensembles, combined from one facade per checkpoint.

A user with checkpoints θ_1..θ_C of one model asks for ``Σ_c w_c · score_c``, where ``score_c`` is the facade's
score (:class:`~fastif.influence.Influence`) with the model at θ_c:

* **TracIn** (Pruthi et al. 2020, TracInCP): ``H`` replaced by ``I`` and ``w_c = η_c``, the learning rate at
  checkpoint c: ``Σ_c η_c ∇L(z_test; θ_c)·∇L(z; θ_c)`` (:meth:`CheckpointInfluence.tracin`);
* **an ensemble**: any solver, ``w_c = 1 / C``: the mean over checkpoints of the influence at each.

A checkpoint is a flat vector of the adapter's selected parameters, a state dict, or the path of a safetensors file
(or of a folder holding ``model.safetensors``), never a pickle. Each is loaded into the model in turn, its
Influence built and used while it is loaded, and the model's own parameters are restored afterwards.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import Tensor

from .config import check_number
from .errors import DataError
from .influence import CandidateScores, Influence, TopK
from .model.adapter import ModelAdapter
from .solvers import Identity, Solver, solver_from_config

Checkpoint = Tensor | Mapping[str, Tensor] | str | os.PathLike[str]


def read_checkpoint(checkpoint: Checkpoint) -> Tensor | Mapping[str, Tensor]:
    """A checkpoint as a flat vector or a state dict: paths are read with safetensors (a folder: its
    ``model.safetensors``); DataError for any other file, pickles included."""
    if isinstance(checkpoint, Tensor | Mapping):
        return checkpoint
    path = Path(checkpoint)
    if path.is_dir():
        path = path / "model.safetensors"
    if path.suffix != ".safetensors" or not path.is_file():
        raise DataError(
            f"checkpoint {str(checkpoint)!r} is not a safetensors file (nor a folder holding model.safetensors); "
            "fastif never unpickles: save it with safetensors.torch.save_file(model.state_dict(), path)"
        )
    return load_file(path)


def load_checkpoint(adapter: ModelAdapter, checkpoint: Checkpoint) -> None:
    """Write ``checkpoint`` into the adapter's model: a flat vector into the selected parameters, a state dict
    into the tensors it names (the others keep their values); DataError for a wrong length or an unknown name."""
    state = read_checkpoint(checkpoint)
    if isinstance(state, Tensor):
        if state.shape != (adapter.num_params,):
            raise DataError(
                f"a flat checkpoint must hold the {adapter.num_params} selected parameters, got shape "
                f"{tuple(state.shape)}"
            )
        adapter.load_flat_params(state.to(adapter.device, adapter.dtype))
        return
    unexpected = adapter.model.load_state_dict(dict(state), strict=False).unexpected_keys
    if unexpected:
        raise DataError(f"the checkpoint names tensors the model does not have: {sorted(unexpected)[:5]}")


@contextlib.contextmanager
def restored(adapter: ModelAdapter) -> Iterator[dict[str, Tensor]]:
    """Within this block the model may be overwritten; its state (parameters and buffers) is restored after it."""
    original = {name: value.detach().clone() for name, value in adapter.model.state_dict().items()}
    try:
        yield original
    finally:
        adapter.model.load_state_dict(original)


class CheckpointInfluence:
    """Influence combined over checkpoints: ``Σ_c weights[c] · (the facade's result with the model at θ_c)``.

    ``weights`` default to ``1 / C`` (an ensemble's mean); ``solver`` (default: the facade's CG) is copied
    afresh for every checkpoint from its config, since each fits its own Hessian; ``options`` go to every
    :class:`~fastif.influence.Influence` (but ``cache``: a store holds one model state's activations).
    """

    def __init__(
        self,
        adapter: ModelAdapter,
        train: Any,
        checkpoints: Sequence[Checkpoint],
        weights: Sequence[float] | None = None,
        solver: Solver | None = None,
        **options: Any,
    ) -> None:
        if len(checkpoints) == 0:
            raise DataError("give at least one checkpoint (a flat vector, a state dict or a safetensors path)")
        weights = [1.0 / len(checkpoints)] * len(checkpoints) if weights is None else [*weights]
        if len(weights) != len(checkpoints):
            raise DataError(f"{len(weights)} weights for {len(checkpoints)} checkpoints; give one per checkpoint")
        for c, weight in enumerate(weights):
            check_number(f"weights[{c}]", weight)
        if "cache" in options:
            raise DataError("a cache store holds one model state's activations; leave cache unset with checkpoints")
        self.adapter, self.train, self.checkpoints, self.weights = adapter, train, list(checkpoints), weights
        self.solver, self.options = solver, options

    @classmethod
    def tracin(
        cls,
        adapter: ModelAdapter,
        train: Any,
        checkpoints: Sequence[Checkpoint],
        learning_rates: Sequence[float],
        **options: Any,
    ) -> CheckpointInfluence:
        """TracInCP: ``Σ_c η_c ∇L(z_test; θ_c)·∇L(z; θ_c)`` (the Identity solver, ``learning_rates`` as weights)."""
        return cls(adapter, train, checkpoints, learning_rates, Identity(), **options)

    def influences(self, order: Sequence[int] | None = None) -> Iterator[tuple[float, Influence]]:
        """Each checkpoint's ``(weight, Influence)``, in ``order`` (default: as given), valid while it is yielded:
        the model holds that checkpoint until the next one, and its own state again at the end."""
        with restored(self.adapter) as original:
            for c in range(len(self.checkpoints)) if order is None else order:
                self.adapter.model.load_state_dict(original)  # a partial checkpoint starts from the model's state
                load_checkpoint(self.adapter, self.checkpoints[c])
                solver = None if self.solver is None else solver_from_config(self.solver.config)
                yield self.weights[c], Influence(self.adapter, self.train, solver, **self.options)

    def _combine(self, result: Callable[[Influence], Tensor]) -> Tensor:
        """``Σ_c weights[c] · result(influence at θ_c)``."""
        return sum(weight * result(influence) for weight, influence in self.influences())  # type: ignore[return-value]

    def scores(self, test: Any, train_indices: Sequence[int] | None = None, group: bool = False) -> Tensor:
        """Combined scores [n_test, n] (or [1, n] with ``group``) of ``train_indices`` (default: all)."""
        return self._combine(lambda influence: influence.scores(test, train_indices, group))

    def self_influence(self, indices: Sequence[int] | None = None) -> Tensor:
        """Combined self-influence [n] of the training points ``indices`` (default: all); TracIn's mislabel score."""
        return self._combine(lambda influence: influence.self_influence(indices))

    def candidate_scores(
        self,
        test: Any,
        num_candidates: int | None = None,
        group: bool = False,
        train_indices: Sequence[int] | None = None,
    ) -> CandidateScores:
        """The facade's candidates at the last checkpoint (the final model's kNN with ``num_candidates``, else all of
        ``train_indices``), each scored at every checkpoint and combined; ``solve`` is the last checkpoint's."""
        last, combined, timings = None, None, {}
        for weight, influence in self.influences(order=range(len(self.checkpoints) - 1, -1, -1)):
            if last is None:
                last = influence.candidate_scores(test, num_candidates, group, train_indices)
                scores = last.scores
            else:
                pool = torch.unique(last.indices)  # every row's candidates, scored at once, then gathered
                wide = influence.candidate_scores(test, group=group, train_indices=pool.tolist())
                scores = wide.scores.gather(1, torch.searchsorted(pool, last.indices))
                timings = {name: timings.get(name, 0.0) + seconds for name, seconds in wide.timings.items()}
            combined = weight * scores if combined is None else combined + weight * scores
        assert last is not None and combined is not None
        timings = {name: timings.get(name, 0.0) + seconds for name, seconds in last.timings.items()}
        return CandidateScores(last.indices, combined, last.solve, last.method, timings=timings)

    def top_k(
        self, test: Any, k: int = 10, num_candidates: int | None = None, train_indices: Sequence[int] | None = None
    ) -> TopK:
        """The ``k`` most helpful and most harmful training points per test point by the combined scores."""
        return self.candidate_scores(test, num_candidates, train_indices=train_indices).top_k(k)
