"""The whole state of an optimizer run, saved to and loaded from one ``.npz`` file.

Everything the next iteration reads is a field of :class:`OptimizerState` and is written by
:meth:`OptimizerState.save` exactly (float64 arrays; Python floats through ``repr``), so a run
stopped after iteration k, saved, loaded and continued follows the uninterrupted trajectory
bit for bit, given a deterministic objective (and the same numpy/BLAS build and thread count).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import IO, Any

import numpy as np

from sae.optimize.options import DEFAULT_METHOD, check_method, check_options

FORMAT = "sae.optimize.state/1"

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
    def grad_norm(self) -> float | None:
        """``||grad||_inf``, or None before the initial evaluation."""
        return None if self.grad is None else float(np.max(np.abs(self.grad)))

    def replace(self, **changes: Any) -> OptimizerState:
        """A copy with some fields changed (``dataclasses.replace``)."""
        return dataclasses.replace(self, **changes)

    # ---------------------------------------------------------------- persistence
    def to_arrays(self) -> dict[str, np.ndarray]:
        """The state as named arrays (the content of the ``.npz`` file)."""
        meta = {
            "format": FORMAT,
            "method": self.method,
            "options": dict(self.options),
            "iteration": self.iteration,
            "n_evals": self.n_evals,
            "status": self.status,
            "message": self.message,
            "last_step": self.last_step,
        }
        n = self.theta.shape[0]
        arrays: dict[str, np.ndarray] = {
            "meta": np.array(json.dumps(meta)),
            "theta": self.theta,
            "s": np.stack(self.s) if self.s else np.empty((0, n)),
            "y": np.stack(self.y) if self.y else np.empty((0, n)),
        }
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
        """Inverse of :meth:`to_arrays`."""
        meta = json.loads(str(arrays["meta"][()]))
        if meta.get("format") != FORMAT:
            raise ValueError(f"state: not an optimizer state of format {FORMAT!r}")

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
        """Write the state to ``path`` (npz format) atomically.

        The file is written to a temporary file in the same directory, flushed to disk and
        renamed over ``path``, so ``path`` always holds either the old or the new state.
        """
        arrays = self.to_arrays()
        atomic_write(path, lambda fh: np.savez(fh, **arrays))

    @classmethod
    def load(cls, path: str | os.PathLike) -> OptimizerState:
        """Read a state written by :meth:`save`."""
        with np.load(path, allow_pickle=False) as npz:
            arrays = {name: npz[name] for name in npz.files}
        return cls.from_arrays(arrays)


def atomic_write(path: str | os.PathLike, write: Callable[[IO[bytes]], None]) -> None:
    """Replace the file at ``path`` with what ``write(fh)`` writes, atomically.

    Writes to a temporary file in the same directory, fsyncs it, ``os.replace``-s it onto
    ``path`` and fsyncs the directory. On any error the temporary file is removed and the old
    file (if any) is left untouched.
    """
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    if hasattr(os, "O_DIRECTORY"):  # make the rename itself durable (POSIX)
        dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
