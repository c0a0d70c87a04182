"""K-FAC / EK-FAC factors in a :class:`~fastif.store.Store`: resumable per shard and stage, reloaded without data.

Entries (``<prefix>`` is the solver's class name in lower case, ``kfac`` or ``ekfac``):

* ``<prefix>-<stage>-<shard>``: the stage's factor sums (:meth:`KFAC.partial_factors`) over training examples
  ``[shard·shard_size, (shard+1)·shard_size)``; a finished shard is loaded, never recomputed.
* ``<prefix>-fitted``: the fitted blocks (eigenvectors, eigenvalues, damping) and diagonals; a fit that finds it
  makes no data pass.

Every entry's metadata carries an identity digest of the model state (all of ``state_dict`` and the selected
parameters' values), the training data, the parameter selection and the solver config, and a mismatch is refused,
so a store opened by other code for another model cannot feed its factors to this one. :func:`factor_store` opens a
store whose manifest holds the same fingerprints, so :meth:`~fastif.store.Store.open` refuses another model at once.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import TYPE_CHECKING, Any

from torch import Tensor

from ..config import config_to_dict
from ..errors import StoreError
from ..fingerprint import fingerprint_parameters
from ..gradient_store import data_fingerprint
from ..hvp import Hessian
from ..model.frozen import ActivationData
from .store import Store

if TYPE_CHECKING:
    from .solvers import KFAC

DEFAULT_SHARD_SIZE = 4096


def model_identity(hessian: Hessian) -> str:
    """SHA-256 of the model's whole state and the selected parameters' values at which the factors are taken."""
    return fingerprint_parameters({**hessian.adapter.model.state_dict(), "fastif.flat": hessian.flat})


def data_identity(hessian: Hessian) -> str:
    """The training data's fingerprint; on the frozen path its base dataset's (the activations follow from it)."""
    data = hessian.data
    return data_fingerprint(data.base if isinstance(data, ActivationData) else data)


def solver_identity(solver: KFAC) -> dict[str, Any]:
    """The solver class and config (JSON-ready): what the stored factors depend on besides model and data."""
    return {"solver": type(solver).__name__, "config": config_to_dict(solver.config)}


def factor_store(folder: str | os.PathLike[str], solver: KFAC, hessian: Hessian, *, overwrite: bool = False) -> Store:
    """Open (or create) a store for ``solver``'s factors on ``hessian``, fingerprinted by its model, data and config."""
    selection = list(hessian.adapter.space.names)
    return Store.open(
        folder,
        model_fingerprint=model_identity(hessian),
        data_fingerprint=data_identity(hessian),
        config={"factors": {**solver_identity(solver), "selection": selection}},
        overwrite=overwrite,
    )


def _digest(solver: KFAC, hessian: Hessian) -> str:
    """One digest of model, data, selection and solver config, stamped on every entry this fit writes."""
    identity = {
        "model": model_identity(hessian),
        "data": data_identity(hessian),
        "selection": list(hessian.adapter.space.names),
        **solver_identity(solver),
    }
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode("utf-8")).hexdigest()


def _checked(store: Store, name: str, expected: dict[str, Any]) -> None:
    """Refuse entry ``name`` unless its metadata matches ``expected`` (identity, stage and example range)."""
    found = store.meta(name)
    if found.get("identity") != expected["identity"]:
        raise StoreError(
            f"store entry {name!r} in {store.folder} holds factors of another model, dataset or solver config; "
            "use another folder, or open it with overwrite=True to discard them"
        )
    if found != expected:
        raise StoreError(
            f"store entry {name!r} in {store.folder} covers examples [{found.get('start')}, {found.get('stop')}) "
            f"but this fit's shard covers [{expected['start']}, {expected['stop']}); pass the shard_size the "
            "interrupted fit used"
        )


def fit_stored(solver: KFAC, hessian: Hessian, store: Store, shard_size: int = DEFAULT_SHARD_SIZE) -> KFAC:
    """Fit ``solver`` on ``hessian`` shard by shard, saving each shard's sums and the fitted blocks in ``store``:
    finished shards are loaded, not recomputed, and a fitted solver reloads without a data pass."""
    solver.begin(hessian)
    if isinstance(shard_size, bool) or not isinstance(shard_size, int) or shard_size < 1:
        raise StoreError(f"shard_size must be a positive integer, got {shard_size!r}")
    prefix = type(solver).__name__.lower()
    identity = _digest(solver, hessian)
    fitted = f"{prefix}-fitted"
    if store.has(fitted):
        _checked(store, fitted, {"identity": identity, "start": 0, "stop": hessian.num_examples})
        return solver.restore(store.load(fitted))
    n = hessian.num_examples
    while solver.pending is not None:
        total: dict[str, Tensor] | None = None
        for index, start in enumerate(range(0, n, shard_size)):
            stop = min(start + shard_size, n)
            name = Store.shard_name(f"{prefix}-{solver.pending}", index)
            meta = {"identity": identity, "stage": solver.pending, "start": start, "stop": stop}
            if store.has(name):
                _checked(store, name, meta)
                part = store.load(name)
            else:
                part = solver.partial_factors(range(start, stop))
                store.save(name, part, meta)
            total = part if total is None else solver.combine([total, part])
        solver.absorb(total)
    store.save(fitted, solver.state(), {"identity": identity, "start": 0, "stop": n})
    return solver
