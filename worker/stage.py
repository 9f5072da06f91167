"""One stage of a job: plain data, and :func:`run_stage`, one optimisation with hooks.

Where the stage's objective is computed (in the driver, one Dask graph per evaluation, or in
one task next to the data) is :mod:`worker.execution`'s; what the stages of a spec are is
:mod:`worker.schedule`'s.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from sae.network import Network
from worker import layout
from worker.batches import Batches
from worker.checkpoint import CheckpointWriter
from worker.chunks import Target
from worker.engine import Cancelled
from worker.stage_id import StageId
from worker.threads import one_blas_thread

#: Seconds between refreshes of filters.png and model.npz during training.
REFRESH_SECONDS = 5.0


@dataclass(frozen=True)
class Stage:
    """What to train, how, and where its files go.

    Attributes
    ----------
    id : StageId
    network : Network
        The network the stage trains.
    theta0 : ndarray of shape (network.n_params,)
        Its start.
    optimizer : {"lbfgs", "cg", "gd"}
    options : dict
        Optimizer options (``sae.optimize.OPTIMIZERS``).
    max_iter : int
        Iterations of the stage (a resumed stage continues up to it).
    passes : {"two", "fused"}
    dtype : {"float64", "float32"}
    folder : Path
        Where its state, history, model and pictures go.
    execution : {"local", "distributed"}
        Where it runs (:mod:`worker.execution`).
    metadata : dict
        Stored as the ``spec`` of its model.npz (plus the network dict).
    encoder : (Network, ndarray) or None
        The frozen encoder that computes the stage's inputs from the data (None: the data).
    target : {"previous", "input"}
        What the stage reconstructs (:data:`Target`).
    sample_shape : tuple of int or None
        Shape of one input example, for filters.png.
    pictures : bool
        Whether the stage draws filters.png (its first layer is the network's first).
    batches : worker.batches.Batches or None
        The minibatches of a stochastic stage (optimizer "adam" or "sgd"; ``max_iter`` counts
        steps); None for a full-batch stage.
    log_every, checkpoint_every : int
        Steps between history entries and between checkpoints of a stochastic stage (also at
        the end of every epoch); a full-batch stage records every iteration.
    rho_decay : float or None
        A stochastic stage's sparsity penalty uses a running average of the mean activations
        with this decay; None: those of each batch.
    validation : list of (int, ndarray) or None
        The held-out rows (whole chunks) of a stochastic stage, as batch parts; None: none.
    validation_path : str or None
        The dataset those chunks are of, when not the stage's own (a separate validation
        dataset).
    validate_every : int
        Steps between held-out costs (also at the end of every epoch).
    early_stopping : int or None
        Stop after this many held-out costs without a new best.
    """

    id: StageId
    network: Network
    theta0: np.ndarray
    optimizer: str
    options: dict
    max_iter: int
    passes: str
    dtype: str
    folder: Path
    execution: str
    metadata: dict
    encoder: tuple[Network, np.ndarray] | None = None
    target: Target = "previous"
    sample_shape: tuple[int, ...] | None = None
    pictures: bool = True
    batches: Batches | None = None
    log_every: int = 1
    checkpoint_every: int = 1
    rho_decay: float | None = None
    validation: list | None = None
    validation_path: str | None = None
    validate_every: int = 100
    early_stopping: int | None = None

    @classmethod
    def of(cls, network: Network, theta0: np.ndarray, folder: Path, **fields) -> Stage:
        """A one-layer job's stage training ``network`` from ``theta0`` into ``folder``, with
        L-BFGS for 400 iterations, two passes, float64, in the driver, unless ``fields`` say
        otherwise."""
        defaults = dict(
            id=StageId.single(),
            optimizer="lbfgs",
            options={},
            max_iter=400,
            passes="two",
            dtype="float64",
            execution="distributed",
            metadata={},
        )
        return cls(network=network, theta0=theta0, folder=Path(folder), **{**defaults, **fields})


@dataclass(frozen=True)
class Hooks:
    """What a running stage tells its caller, and asks it.

    Attributes
    ----------
    on_iteration : callable or None
        Called with each history entry once its checkpoint is queued (all checkpoints are on
        disk when the stage returns).
    should_stop : callable or None
        Polled after each iteration (and by objectives between evaluations); True stops the
        stage with status ``"cancelled"``, its last checkpoint intact.
    """

    on_iteration: Callable[[dict], None] | None = None
    should_stop: Callable[[], bool] | None = None

    def stop(self) -> bool:
        """True when the caller asks the stage to stop."""
        return bool(self.should_stop is not None and self.should_stop())


@dataclass
class StageResult:
    """What a stage ends with, wherever it ran.

    Attributes
    ----------
    status : {"succeeded", "cancelled"}
    theta : ndarray of shape (n_params,)
        Parameters of the last completed iteration.
    cost : float or None
        Cost at theta.
    iterations, evaluations : int
    seconds : float
        Cumulative training time (including earlier runs of a resumed stage).
    message : str
        The optimizer's stopping reason.
    history : list of dict
    """

    status: str
    theta: np.ndarray
    cost: float | None
    iterations: int
    evaluations: int
    seconds: float
    message: str = ""
    history: list[dict] = field(default_factory=list)

    def summary(self) -> dict:
        """The JSON-able figures (no theta, no history), as ``done.json`` holds them."""
        return {
            "status": self.status,
            "cost": self.cost,
            "iterations": self.iterations,
            "evaluations": self.evaluations,
            "seconds": self.seconds,
            "message": self.message,
        }


def save_filters(stage: Stage, theta: np.ndarray, path: Path) -> Path | None:
    """Draw the first layer's filters of ``theta`` to ``path``."""
    from sae.display import save_filters_png

    W1 = stage.network.unpack(theta)[0][0]
    return save_filters_png(W1, stage.sample_shape, path)


def save_cost(history: list[dict], path: Path) -> Path | None:
    """Draw the cost curve of ``history`` to ``path`` (nothing for an empty history)."""
    if not history:
        return None
    from sae.display import save_cost_png

    return save_cost_png(history, path)


def _resume_point(stage: Stage, resume: bool):
    """The optimizer state to start from, the history up to it and its seconds."""
    from sae.optimize import OptimizerState

    state_path, history_path = stage.folder / layout.STATE, stage.folder / layout.HISTORY
    if resume and state_path.exists():
        state = OptimizerState.load(state_path)
        history = [
            e for e in layout.read_history(history_path) if e["iteration"] <= state.iteration
        ]
        return state, history, float(history[-1]["seconds"]) if history else 0.0
    for p in (state_path, history_path):
        with contextlib.suppress(FileNotFoundError):
            p.unlink()
    return OptimizerState.start(stage.optimizer, stage.theta0, dict(stage.options)), [], 0.0


class _Recorder:
    """What happens after each iteration of a stage: its history entry and checkpoint (in
    order, on the writer's thread), the periodic model and filters refresh, the hooks."""

    def __init__(
        self,
        stage: Stage,
        hooks: Hooks,
        history: list[dict],
        offset: float,
        refresh_seconds: float,
        may_write: Callable[[], bool] = lambda: True,
    ) -> None:
        self.stage, self.hooks, self.history, self.offset = stage, hooks, history, offset
        self.refresh_seconds = refresh_seconds
        self.may_write = may_write
        self.extra = {} if stage.id.label is None else {"stage": stage.id.label}
        self.t_start = time.perf_counter()
        self.last_refresh = -math.inf
        self.writer = CheckpointWriter(
            stage.folder / layout.HISTORY, stage.folder / layout.STATE, history
        )

    def refresh(self, theta: np.ndarray, force: bool = False) -> None:
        """Queue a rewrite of model.npz and filters.png (at most every refresh_seconds)."""
        now = time.perf_counter()
        if not force and now - self.last_refresh < self.refresh_seconds:
            return
        self.last_refresh = now

        def write() -> None:  # checked again on the writer's thread, just before writing
            if self.may_write():
                write_model(self.stage, theta)

        self.writer.call(write)

    def __call__(self, st) -> bool:
        """The optimizer's callback: record iteration ``st``; True asks it to stop."""
        entry = {
            "iteration": int(st.iteration),
            "cost": float(st.J),
            "grad_norm": float(np.linalg.norm(st.grad)),
            "evaluations": int(st.n_evals),
            "seconds": self.offset + (time.perf_counter() - self.t_start),
            **self.extra,
        }
        if self.history and self.history[-1]["iteration"] >= entry["iteration"]:
            return self.hooks.stop()  # already recorded (resumed state)
        if not self.may_write():  # the folder is another run's now (or gone): stop, write nothing
            return True
        self.history.append(entry)
        # history first: resume truncates it to the state
        self.writer.put(entry, _Guarded(st, self.may_write))
        self.refresh(st.theta, force=st.iteration == 0)
        if self.hooks.on_iteration is not None:
            self.hooks.on_iteration(dict(entry))
        return self.hooks.stop()


class _Guarded:
    """An optimizer state whose ``save`` (on the writer's thread) is skipped once the stage
    may not write any more: saving makes ``state.npz.pairs/`` with its parents, which would
    bring a deleted folder back."""

    def __init__(self, state, may_write: Callable[[], bool]) -> None:
        self.state, self.may_write = state, may_write

    def save(self, path: Path) -> None:
        if self.may_write():
            self.state.save(path)


def write_model(stage: Stage, theta: np.ndarray) -> None:
    """Write the stage's model.npz at ``theta`` (and its filters.png, if it draws them)."""
    layout.save_model(stage.folder / layout.MODEL, stage.network, theta, stage.metadata)
    if stage.pictures:
        save_filters(stage, theta, stage.folder / layout.FILTERS)


def run_stage(
    stage: Stage,
    objective: Callable[[np.ndarray], tuple[float, np.ndarray]],
    hooks: Hooks,
    *,
    resume: bool = False,
    refresh_seconds: float = REFRESH_SECONDS,
    write_cost: bool = True,
    may_write: Callable[[], bool] | None = None,
) -> StageResult:
    """Minimise ``objective`` from ``stage.theta0`` with a checkpoint after every iteration.

    Parameters
    ----------
    stage : Stage
    objective : callable
        ``objective(theta) -> (J, grad)``; may raise :class:`worker.engine.Cancelled`
        between evaluations.
    hooks : Hooks
    resume : bool
        Continue from ``stage.folder/state.npz`` if present (same trajectory, bitwise).
    refresh_seconds : float
        Interval of filters.png / model.npz refreshes while training.
    write_cost : bool
        Draw cost.png at the end (a task next to the data leaves it to the driver).
    may_write : callable, optional
        ``may_write() -> bool``, asked before every write to the stage's folder (history,
        checkpoint, model.npz, filters.png). Once it is False the stage stops and writes
        nothing more (a task whose folder was deleted, or taken over by a newer run). With
        it the folder must exist (it is never created); without it, it is created.

    Returns
    -------
    StageResult
    """
    from sae.optimize import OptimizerState, minimize

    if may_write is None:
        stage.folder.mkdir(parents=True, exist_ok=True)
    allowed = may_write or (lambda: True)
    state_path = stage.folder / layout.STATE
    state, history, offset = _resume_point(stage, resume)
    record = _Recorder(stage, hooks, history, offset, refresh_seconds, allowed)
    status, message = "succeeded", ""
    final = state
    try:
        try:
            with one_blas_thread():  # the optimizer's dot products too (same bits anywhere)
                final = minimize(objective, state, stage.max_iter, record)
        finally:
            record.writer.close()
        message = final.message
        if final.status == "cancelled":
            status = "cancelled"
        elif final.status == "diverged":
            raise FloatingPointError(f"optimizer: diverged: {final.message}")
        elif allowed():  # converged, max_iter, or a line search that cannot improve further
            final.save(state_path)
    except Cancelled:
        status, message = "cancelled", "cancelled during an evaluation"
        with contextlib.suppress(FileNotFoundError):
            final = OptimizerState.load(state_path)
    theta = np.asarray(final.theta if final.J is not None else stage.theta0, dtype=np.float64)
    if allowed():
        write_model(stage, theta)
        if write_cost:
            save_cost(history, stage.folder / layout.COST)
    return StageResult(
        status=status,
        theta=theta,
        cost=None if final.J is None else float(final.J),
        iterations=int(final.iteration),
        evaluations=int(final.n_evals),
        seconds=float(history[-1]["seconds"] if history else offset),
        message=message,
        history=history,
    )
