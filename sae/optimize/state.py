"""The whole state of an optimizer run, saved to and loaded from disk.

Everything the next iteration reads is a field of :class:`OptimizerState` and is written by
:meth:`OptimizerState.save` exactly (float64 arrays; Python floats through ``repr``), so a run
stopped after iteration k, saved, loaded and continued follows the uninterrupted trajectory
bit for bit, given a deterministic objective (and the same numpy/BLAS build and thread count).

Layout of a checkpoint at ``path`` (e.g. ``state.npz``)::

    state.npz              theta, grad, CG vectors, counters, and the names of the live pairs
    state.npz.pairs/       one file per L-BFGS pair, written once and never changed:
        00000012-<digest>.npy      array of shape (2, n): [s_i, y_i]

A pair file is named by the iteration that first saved it and a digest of its bits, so a file
of that name holds exactly that pair. Saving a state whose memory already is on disk writes
the new pair and the small state file only: O(n) bytes per iteration instead of
O(memory * n). :meth:`OptimizerState.save` writes (and fsyncs) the new pair files first, then
replaces the state file atomically, then deletes the pair files it no longer lists, so the
state file on disk only ever names pair files that exist; a crash in between leaves at worst
unlisted pair files, which the next save deletes.

One writer per path: two processes saving to the same path at once may delete each other's
pair files. Saving from a thread other than the optimizer's is safe (states are immutable).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import threading
import weakref
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import numpy as np

from sae.atomic import atomic_write, fsync_dir
from sae.optimize.options import DEFAULT_METHOD, check_method, check_options

#: Format of :meth:`OptimizerState.to_arrays` (the L-BFGS pairs inline as arrays "s", "y").
FORMAT = "sae.optimize.state/1"
#: Format of a file written by :meth:`OptimizerState.save` (pairs in ``<path>.pairs/``).
FORMAT_PAIRS = "sae.optimize.state/2"
#: Suffix of the folder beside a state file that holds its L-BFGS pairs.
PAIRS_SUFFIX = ".pairs"

#: ``pending``: not evaluated yet; ``running``: between iterations (as seen by a callback);
#: ``converged``: gtol or ftol met; ``max_iter``: budget used; ``cancelled``: the callback
#: asked to stop; ``line_search_failed`` / ``diverged``: failures, a run stops there for good.
STATUSES = (
    "pending",
    "running",
    "converged",
    "max_iter",
    "cancelled",
    "line_search_failed",
    "diverged",
)
FAILED = frozenset({"line_search_failed", "diverged"})


@dataclass(frozen=True, eq=False)
class OptimizerState:
    """Everything an optimizer needs to take its next iteration.

    States are immutable: the optimizer returns a new state per iteration and shares arrays
    between states, so arrays held here must never be modified in place.

    Attributes
    ----------
    method : str
        A key of :data:`sae.optimize.OPTIMIZERS`.
    options : mapping
        All options of the method (defaults filled in, read-only), see
        :func:`sae.optimize.check_options`.
    theta : ndarray of shape (n,)
        Current parameters (float64).
    J : float or None
        Cost at theta; None until the initial evaluation (iteration 0).
    grad : ndarray of shape (n,) or None
        Gradient at theta.
    J_prev : float or None
        Cost at the previous iterate (ftol test; CG's initial step guess).
    iteration : int
        Completed iterations; 0 after the initial evaluation.
    n_evals : int
        Evaluations of the objective so far (each gives J and grad).
    status : str
        One of :data:`STATUSES`.
    message : str
        Why the run stopped, in words.
    last_step : float or None
        Step length alpha accepted in the last iteration (informational).
    s, y : tuple of ndarray of shape (n,)
        L-BFGS memory, oldest first: ``s_i = theta_{i+1} - theta_i``,
        ``y_i = grad_{i+1} - grad_i``.
    d_prev, g_prev : ndarray of shape (n,) or None
        CG: the previous search direction and the gradient where it started.
    """

    method: str
    options: Mapping[str, Any]
    theta: np.ndarray
    J: float | None = None
    grad: np.ndarray | None = None
    J_prev: float | None = None
    iteration: int = 0
    n_evals: int = 0
    status: str = "pending"
    message: str = ""
    last_step: float | None = None
    s: tuple[np.ndarray, ...] = field(default=())
    y: tuple[np.ndarray, ...] = field(default=())
    d_prev: np.ndarray | None = None
    g_prev: np.ndarray | None = None

    # ---------------------------------------------------------------- constructors
    @classmethod
    def start(
        cls,
        method: str = DEFAULT_METHOD,
        theta0: np.ndarray | None = None,
        options: Mapping[str, Any] | None = None,
    ) -> OptimizerState:
        """A fresh state at ``theta0``; validates, does not evaluate the objective.

        Parameters
        ----------
        method : {"lbfgs", "cg", "gd"}
        theta0 : array_like of shape (n,)
            Initial parameters (copied, as float64).
        options : mapping, optional
            Method options, see :data:`sae.optimize.OPTIMIZERS`.

        Raises
        ------
        ValueError
            For an unknown method or option, an invalid option value, or a theta0 that is not
            a non-empty finite vector.
        """
        method = check_method(method)
        opts = check_options(method, options)
        if theta0 is None:
            raise ValueError("theta0: the initial parameters are required")
        theta = np.array(theta0, dtype=np.float64, copy=True)
        if theta.ndim != 1 or theta.size == 0:
            raise ValueError(f"theta0: expected a non-empty vector, got shape {theta.shape}")
        if not np.all(np.isfinite(theta)):
            raise ValueError("theta0: contains non-finite values")
        return cls(method=method, options=MappingProxyType(opts), theta=theta)

    # ---------------------------------------------------------------- views
    @property
    def converged(self) -> bool:
        """True when a convergence test (gtol or ftol) stopped the run."""
        return self.status == "converged"

    @property
    def failed(self) -> bool:
        """True when the run stopped on a failure (line search, divergence)."""
        return self.status in FAILED

    @property
    def grad_max_norm(self) -> float | None:
        """``||grad||_inf``, or None before the initial evaluation."""
        return None if self.grad is None else float(np.max(np.abs(self.grad)))

    def replace(self, **changes: Any) -> OptimizerState:
        """A copy with some fields changed (``dataclasses.replace``)."""
        return dataclasses.replace(self, **changes)

    # ---------------------------------------------------------------- persistence
    def to_arrays(self) -> dict[str, np.ndarray]:
        """The state as named arrays, the L-BFGS memory inline as arrays ``s`` and ``y``
        (a self-contained ``.npz``; :meth:`save` stores the pairs beside the file instead)."""
        n = self.theta.shape[0]
        arrays = self._arrays(FORMAT)
        arrays["s"] = np.stack(self.s) if self.s else np.empty((0, n))
        arrays["y"] = np.stack(self.y) if self.y else np.empty((0, n))
        return arrays

    def _arrays(self, fmt: str, pairs: list[str] | None = None) -> dict[str, np.ndarray]:
        """Everything but the L-BFGS memory, as named arrays; ``pairs`` names its files."""
        meta = {
            "format": fmt,
            "method": self.method,
            "options": dict(self.options),
            "iteration": self.iteration,
            "n_evals": self.n_evals,
            "status": self.status,
            "message": self.message,
            "last_step": self.last_step,
        }
        if pairs is not None:
            meta["pairs"] = pairs
        arrays: dict[str, np.ndarray] = {"meta": np.array(json.dumps(meta)), "theta": self.theta}
        for name in ("J", "J_prev"):
            value = getattr(self, name)
            if value is not None:
                arrays[name] = np.array(value, dtype=np.float64)
        for name in ("grad", "d_prev", "g_prev"):
            value = getattr(self, name)
            if value is not None:
                arrays[name] = value
        return arrays

    @classmethod
    def from_arrays(cls, arrays: Mapping[str, np.ndarray]) -> OptimizerState:
        """Inverse of :meth:`to_arrays` (arrays ``s`` and ``y`` hold the pairs, oldest first)."""
        meta = json.loads(str(arrays["meta"][()]))
        if meta.get("format") not in (FORMAT, FORMAT_PAIRS):
            raise ValueError(f"state: not an optimizer state of format {FORMAT!r}")
        if "s" not in arrays or "y" not in arrays:
            raise ValueError("state: the L-BFGS pairs are missing (read the file with load())")

        def vec(name: str) -> np.ndarray | None:
            return np.array(arrays[name], dtype=np.float64) if name in arrays else None

        def scalar(name: str) -> float | None:
            return float(arrays[name][()]) if name in arrays else None

        method = check_method(meta["method"])
        last_step = meta["last_step"]
        state = cls(
            method=method,
            options=MappingProxyType(check_options(method, meta["options"])),
            theta=vec("theta"),
            J=scalar("J"),
            grad=vec("grad"),
            J_prev=scalar("J_prev"),
            iteration=int(meta["iteration"]),
            n_evals=int(meta["n_evals"]),
            status=str(meta["status"]),
            message=str(meta["message"]),
            last_step=None if last_step is None else float(last_step),
            s=tuple(np.array(row) for row in np.asarray(arrays["s"], dtype=np.float64)),
            y=tuple(np.array(row) for row in np.asarray(arrays["y"], dtype=np.float64)),
            d_prev=vec("d_prev"),
            g_prev=vec("g_prev"),
        )
        n = state.theta.shape
        vectors = [state.grad, state.d_prev, state.g_prev, *state.s, *state.y]
        if len(state.s) != len(state.y) or any(v is not None and v.shape != n for v in vectors):
            raise ValueError("state: the arrays in the file have inconsistent shapes")
        if state.status not in STATUSES:
            raise ValueError(f"state: unknown status {state.status!r}")
        return state

    def save(self, path: str | os.PathLike) -> None:
        """Write the state to ``path`` (npz) and its L-BFGS pairs to ``path + ".pairs/"``.

        Pair files already in that folder are not written again, so a save costs O(n) bytes
        once the memory is on disk. Order: new pair files (each written to a temporary file,
        fsynced and renamed; then the folder fsynced), then the state file replaced
        atomically, then unlisted pair files deleted. ``path`` always holds either the old or
        the new state, and the pair files it names exist. Safe to call from another thread
        while the optimizer continues; not from two writers on one path at once.
        """
        path = os.fspath(path)
        folder = path + PAIRS_SUFFIX
        names: list[str] = []
        if self.s:
            if not os.path.isdir(folder):
                os.makedirs(folder, exist_ok=True)
                fsync_dir(os.path.dirname(os.path.abspath(path)))
            for s, y in zip(self.s, self.y, strict=True):
                name = _PAIR_NAMES.name(s, y, self.iteration)
                file = os.path.join(folder, name + ".npy")
                if not os.path.exists(file):
                    pair = np.stack((s, y))
                    atomic_write(file, lambda fh, pair=pair: np.save(fh, pair), sync_dir=False)
                names.append(name)
            fsync_dir(folder)  # the renames above are durable before the state names them
        arrays = self._arrays(FORMAT_PAIRS, names)
        atomic_write(path, lambda fh: np.savez(fh, **arrays), sync_dir=True)
        _delete_unlisted(folder, {name + ".npy" for name in names})

    @classmethod
    def load(cls, path: str | os.PathLike) -> OptimizerState:
        """Read a state written by :meth:`save` (or a ``.npz`` of :meth:`to_arrays`).

        Raises
        ------
        FileNotFoundError
            If there is no file at ``path``.
        ValueError
            If the file is not an optimizer state, or a pair file it names is missing or
            does not hold the bits it was saved with.
        """
        path = os.fspath(path)
        for attempt in range(3):
            with np.load(path, allow_pickle=False) as npz:
                arrays = {name: npz[name] for name in npz.files}
            meta = json.loads(str(arrays["meta"][()])) if "meta" in arrays else {}
            names = meta.get("pairs") if meta.get("format") == FORMAT_PAIRS else None
            if names is None:
                return cls.from_arrays(arrays)
            try:
                pairs = [_read_pair(path, name) for name in names]
            except FileNotFoundError as e:
                if attempt < 2:  # a writer replaced the state and deleted its old pairs
                    continue
                raise ValueError(f"state: pair file {e.filename} named by {path} is missing") from e
            break
        n = np.shape(arrays["theta"])[0]
        if any(p.shape != (2, n) for p in pairs):
            raise ValueError("state: the arrays in the file have inconsistent shapes")
        arrays["s"] = np.array([p[0] for p in pairs]).reshape(len(pairs), n)
        arrays["y"] = np.array([p[1] for p in pairs]).reshape(len(pairs), n)
        state = cls.from_arrays(arrays)
        for s, y, name in zip(state.s, state.y, names, strict=True):
            _PAIR_NAMES.remember(s, y, name)
        return state


def _pair_digest(s: np.ndarray, y: np.ndarray) -> str:
    h = hashlib.blake2b(digest_size=8)
    h.update(np.ascontiguousarray(s, dtype=np.float64).data)
    h.update(np.ascontiguousarray(y, dtype=np.float64).data)
    return h.hexdigest()


class _PairNameCache:
    """File names of the L-BFGS pairs held by live states, keyed by array identity.

    States share their pair arrays and never modify them, so a pair whose arrays are the same
    objects as when it was named still has the same bits: its digest need not be recomputed.
    Entries hold weak references; dead ones are dropped as new ones come in.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._entries: dict[int, tuple[weakref.ref, weakref.ref, str]] = {}

    def _get(self, s: np.ndarray, y: np.ndarray) -> str | None:
        entry = self._entries.get(id(s))
        if entry is not None and entry[0]() is s and entry[1]() is y:
            return entry[2]
        return None

    def remember(self, s: np.ndarray, y: np.ndarray, name: str) -> None:
        with self._lock:
            dead = [k for k, (rs, ry, _) in self._entries.items() if rs() is None or ry() is None]
            for k in dead:
                del self._entries[k]
            self._entries[id(s)] = (weakref.ref(s), weakref.ref(y), name)

    def name(self, s: np.ndarray, y: np.ndarray, iteration: int) -> str:
        """``"<iteration:08d>-<digest of the bits>"``, computed once per pair."""
        with self._lock:
            name = self._get(s, y)
        if name is None:
            name = f"{iteration:08d}-{_pair_digest(s, y)}"
            self.remember(s, y, name)
        return name


_PAIR_NAMES = _PairNameCache()


def _read_pair(path: str, name: str) -> np.ndarray:
    """The array of shape (2, n) of pair ``name`` of the state at ``path``, checked."""
    if not isinstance(name, str) or os.sep in name or name.startswith("."):
        raise ValueError(f"state: bad pair name {name!r} in {path}")
    file = os.path.join(path + PAIRS_SUFFIX, name + ".npy")
    try:
        pair = np.load(file, allow_pickle=False)
    except FileNotFoundError:
        raise
    except (OSError, ValueError) as e:
        raise ValueError(f"state: pair file {file} is unreadable: {e}") from e
    pair = np.asarray(pair, dtype=np.float64)
    digest = name.rpartition("-")[2]
    if pair.ndim != 2 or pair.shape[0] != 2 or _pair_digest(pair[0], pair[1]) != digest:
        raise ValueError(f"state: pair file {file} does not hold the pair it was saved as")
    return pair


def _delete_unlisted(folder: str, keep: set[str]) -> None:
    """Delete the files of ``folder`` not in ``keep``; the folder too if ``keep`` is empty."""
    try:
        entries = os.listdir(folder)
    except FileNotFoundError:
        return
    for entry in entries:
        if entry not in keep:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(folder, entry))
    if not keep:
        with contextlib.suppress(OSError):
            os.rmdir(folder)
