"""The training loop: a TrainSpec in, a trained model and its history out.

:func:`train` runs one job; :func:`train_stage` runs one optimisation with checkpoints and is
reused by the deep pipeline (``worker.deep``) for each stage.

Files of a job (``out_dir``)::

    job.json        the spec, the dataset, the execution plan, the dashboard URL
    state.npz       the optimizer's whole state after the last iteration (atomic)
    state.npz.pairs/  the L-BFGS memory pairs the state lists (one write-once file each)
    history.json    one entry per iteration: iteration, cost, grad_norm, evaluations, seconds
    model.npz       W1, b1, W2, b2 (... for deeper nets), theta, and ``spec`` (JSON, with the
                    network dict so activations are known)
    filters.png     the hidden units' maximally activating inputs (refreshed while training)
    cost.png        cost against iteration (at the end)

Two execution plans:

- ``"distributed"``: the optimizer runs here; each evaluation is one Dask graph over the
  chunks (:class:`worker.engine.DistributedObjective`).
- ``"local"``: for a small dataset the whole optimisation runs as one task on one worker,
  next to its data (:class:`worker.engine.LocalObjective`, the same sums and tree, so the
  same bits). The task writes the checkpoints and history itself; this process follows
  them, forwards ``on_iteration`` and asks the task to stop through a ``.cancel`` file.
  If the worker dies, Dask reruns the task, which resumes from the last checkpoint.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import time
import uuid
import zlib
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from sae.atomic import atomic_write
from sae.network import Network
from sae.optimize import PAIRS_SUFFIX
from worker.dataset import DatasetInfo, open_dataset
from worker.engine import Cancelled, DistributedObjective, LocalObjective
from worker.spec import TrainSpec
from worker.threads import one_blas_thread

Plan = Literal["auto", "local", "distributed"]

STATE = "state.npz"
STATE_PAIRS = STATE + PAIRS_SUFFIX  # the L-BFGS pairs, one write-once file each
HISTORY = "history.json"
MODEL = "model.npz"
FILTERS = "filters.png"
COST = "cost.png"
JOB = "job.json"
CANCEL = ".cancel"
OWNER = ".owner"
#: ``.started-<owner>``: created by a local-plan task when it starts (a rerun resumes).
STARTED_PREFIX = ".started-"

#: Datasets up to this size (decoded, in the compute dtype) train as one task ("local").
LOCAL_PLAN_BYTES = 64 * 2**20
#: Seconds between refreshes of filters.png and model.npz during training.
REFRESH_SECONDS = 5.0
#: After a cancel request, a local-plan task has this long to stop by itself before the
#: client cancels it and reports the last checkpoint (a task queued behind busy workers).
CANCEL_GRACE_SECONDS = 3.0

#: Output activations and the value range their units can reach.
OUTPUT_RANGES = {"sigmoid": (0.0, 1.0), "tanh": (-1.0, 1.0)}


# --------------------------------------------------------------------------- results


@dataclass
class StageResult:
    """What :func:`train_stage` returns.

    Attributes
    ----------
    status : {"succeeded", "cancelled"}
    theta : ndarray of shape (n_params,)
        Parameters of the last completed iteration.
    cost : float or None
        Cost at theta.
    iterations : int
    evaluations : int
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


@dataclass
class TrainResult:
    """What :func:`train` returns.

    Attributes
    ----------
    status : {"succeeded", "cancelled"}
    out_dir : Path
    model_path, history_path, state_path, job_path : Path
    filters_path, cost_path : Path or None
    final_cost : float or None
    iterations, evaluations : int
    seconds : float
    plan : {"local", "distributed", "deep"}
    dashboard : str or None
    message : str
    """

    status: str
    out_dir: Path
    model_path: Path
    history_path: Path
    state_path: Path
    job_path: Path
    filters_path: Path | None
    cost_path: Path | None
    final_cost: float | None
    iterations: int
    evaluations: int
    seconds: float
    plan: str
    dashboard: str | None = None
    message: str = ""

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form (paths as strings)."""
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(self).items()}


# --------------------------------------------------------------------------- small file helpers


def _atomic_write_bytes(path: Path, write: Callable[[Any], None]) -> None:
    # not fsynced: history and pictures are rewritten every iteration; the optimizer state,
    # which resume needs, is fsynced by OptimizerState.save
    atomic_write(path, write, fsync=False)


def write_json(path: Path, data: Any) -> None:
    """Write JSON atomically."""
    payload = json.dumps(data, allow_nan=True).encode()
    _atomic_write_bytes(Path(path), lambda fh: fh.write(payload))


def read_history(path: Path) -> list[dict]:
    """The entries of a history.json ([] when absent)."""
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        return []


def save_model(path: Path, net: Network, theta: np.ndarray, spec: dict | None = None) -> Path:
    """Write ``model.npz``: ``W1..WL``, ``b1..bL``, ``theta`` and ``spec`` (a JSON string).

    ``spec`` holds the given metadata plus ``"network": net.to_dict()``.
    """
    Ws, bs = net.unpack(theta)
    meta = dict(spec or {})
    meta["network"] = net.to_dict()
    arrays = {f"W{l}": W for l, W in enumerate(Ws, start=1)}
    arrays.update({f"b{l}": b for l, b in enumerate(bs, start=1)})
    arrays["theta"] = np.asarray(theta, dtype=np.float64)
    arrays["spec"] = np.array(json.dumps(meta))
    _atomic_write_bytes(Path(path), lambda fh: np.savez(fh, **arrays))
    return Path(path)


def load_model(path: Path) -> tuple[Network, np.ndarray, dict]:
    """Read a ``model.npz``: ``(net, theta, spec_dict)``."""
    with np.load(path, allow_pickle=False) as npz:
        meta = json.loads(str(npz["spec"][()]))
        theta = np.array(npz["theta"])
    return Network.from_dict(meta["network"]), theta, meta


def _save_filters(net: Network, theta: np.ndarray, sample_shape, path: Path) -> Path | None:
    from sae.display import save_filters_png

    W1 = net.unpack(theta)[0][0]
    return save_filters_png(W1, sample_shape, path)


def _save_cost(history: list[dict], path: Path) -> Path | None:
    from sae.display import save_cost_png

    return save_cost_png(history, path)


# --------------------------------------------------------------------------- checkpoints


class CheckpointWriter:
    """Writes checkpoints (and other artifacts) in order on a background thread.

    Every iteration's checkpoint is written - history.json first (atomic rename), then
    state.npz (atomic and fsynced, :meth:`OptimizerState.save`) - in order; the optimizer
    only waits when ``max_pending`` items are queued, so disk work overlaps the next
    evaluations. History entries are serialised once each (the file is the join of them).
    :meth:`flush` waits for all items and re-raises a write error.
    """

    def __init__(
        self,
        history_path: Path,
        state_path: Path,
        history: list[dict] | None = None,
        max_pending: int = 8,
    ) -> None:
        import queue
        import threading

        self.history_path, self.state_path = history_path, state_path
        self._parts = [json.dumps(e, allow_nan=True) for e in (history or [])]
        self._queue: queue.Queue = queue.Queue(maxsize=max_pending)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="checkpoint-writer", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            try:
                if item is None:
                    return
                if self._error is None:
                    if callable(item):
                        item()
                    else:
                        n, state = item
                        data = ("[" + ",".join(self._parts[:n]) + "]").encode()
                        _atomic_write_bytes(self.history_path, lambda fh, d=data: fh.write(d))
                        state.save(self.state_path)
            except BaseException as exc:  # noqa: BLE001 - re-raised by flush()
                self._error = exc
            finally:
                self._queue.task_done()

    def put(self, entry: dict, state) -> None:
        """Queue the checkpoint of one iteration: its history entry and optimizer state."""
        if self._error is not None:
            raise self._error
        self._parts.append(json.dumps(entry, allow_nan=True))
        self._queue.put((len(self._parts), state))

    def call(self, fn: Callable[[], Any]) -> None:
        """Queue another write (run in order with the checkpoints)."""
        if self._error is not None:
            raise self._error
        self._queue.put(fn)

    def flush(self) -> None:
        """Wait until every queued item is written."""
        self._queue.join()
        if self._error is not None:
            raise self._error

    def close(self) -> None:
        """Flush and stop the thread."""
        try:
            self.flush()
        finally:
            self._queue.put(None)
            self._thread.join()


# --------------------------------------------------------------------------- one stage


def train_stage(
    net: Network,
    theta0: np.ndarray,
    objective: Callable[[np.ndarray], tuple[float, np.ndarray]],
    out_dir: str | os.PathLike,
    *,
    optimizer: str = "lbfgs",
    options: dict | None = None,
    max_iter: int = 400,
    on_iteration: Callable[[dict], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    resume: bool = False,
    sample_shape: tuple[int, ...] | None = None,
    metadata: dict | None = None,
    refresh_seconds: float = REFRESH_SECONDS,
    write_pictures: bool = True,
    write_cost: bool = True,
    entry_extra: dict | None = None,
) -> StageResult:
    """Minimise ``objective`` from ``theta0`` with checkpoints after every iteration.

    Parameters
    ----------
    net : Network
        The network theta belongs to (for model.npz and filters).
    theta0 : ndarray of shape (net.n_params,)
    objective : callable
        ``objective(theta) -> (J, grad)``; may raise :class:`worker.engine.Cancelled`
        between evaluations (it should check ``should_stop`` itself for a prompt stop).
    out_dir : path
        Where ``state.npz``, ``history.json``, ``model.npz``, ``filters.png`` and ``cost.png``
        go (created).
    optimizer : {"lbfgs", "cg", "gd"}
    options : dict, optional
        Optimizer options (see ``sae.optimize.OPTIMIZERS``).
    max_iter : int
        Total iterations of the stage (a resumed stage continues up to it).
    on_iteration : callable, optional
        Called with each history entry once its checkpoint is queued (checkpoints are
        written in order by a background thread and all are on disk when the stage
        returns).
    should_stop : callable, optional
        Checked after each iteration; True stops the stage with status ``"cancelled"``,
        leaving the last checkpoint intact.
    resume : bool
        Continue from ``out_dir/state.npz`` if present (same trajectory, bitwise).
    sample_shape : tuple of int, optional
        Shape of one input example, for filters.png.
    metadata : dict, optional
        Stored as the ``spec`` of model.npz (plus the network dict).
    refresh_seconds : float
        Interval of filters.png / model.npz refreshes while training.
    write_pictures : bool
        Write filters.png (at iteration 0, every ``refresh_seconds`` and at the end).
    write_cost : bool
        Write cost.png at the end.
    entry_extra : dict, optional
        Keys added to each history entry (e.g. ``{"stage": 1}``).

    Returns
    -------
    StageResult
    """
    from sae.optimize import OptimizerState, minimize

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state_path, history_path = out / STATE, out / HISTORY
    model_path, filters_path = out / MODEL, out / FILTERS
    extra = dict(entry_extra or {})

    history: list[dict] = []
    offset = 0.0
    state = None
    if resume and state_path.exists():
        state = OptimizerState.load(state_path)
        history = [e for e in read_history(history_path) if e["iteration"] <= state.iteration]
        if history:
            offset = float(history[-1]["seconds"])
    if state is None:
        opts = dict(options or {})
        state = OptimizerState.start(optimizer, theta0, opts)
        for p in (state_path, history_path):
            with contextlib.suppress(FileNotFoundError):
                p.unlink()

    t_start = time.perf_counter()
    last_refresh = [-math.inf]

    def refresh(theta: np.ndarray, force: bool = False) -> None:
        now = time.perf_counter()
        if not force and now - last_refresh[0] < refresh_seconds:
            return
        last_refresh[0] = now

        def write() -> None:
            save_model(model_path, net, theta, metadata)
            if write_pictures:
                _save_filters(net, theta, sample_shape, filters_path)

        writer.call(write)

    def callback(st) -> bool:
        entry = {
            "iteration": int(st.iteration),
            "cost": float(st.J),
            "grad_norm": float(np.linalg.norm(st.grad)),
            "evaluations": int(st.n_evals),
            "seconds": offset + (time.perf_counter() - t_start),
            **extra,
        }
        if history and history[-1]["iteration"] >= entry["iteration"]:
            return bool(should_stop and should_stop())  # already recorded (resumed state)
        history.append(entry)
        writer.put(entry, st)  # history first: resume truncates it to the state
        refresh(st.theta, force=st.iteration == 0)
        if on_iteration is not None:
            on_iteration(dict(entry))
        return bool(should_stop and should_stop())

    status, message = "succeeded", ""
    final = state
    writer = CheckpointWriter(history_path, state_path, history)
    try:
        try:
            with one_blas_thread():  # the optimizer's dot products too (same bits anywhere)
                final = minimize(objective, state, max_iter, callback)
        finally:
            writer.close()
        message = final.message
        if final.status == "cancelled":
            status = "cancelled"
        elif final.status == "diverged":
            raise FloatingPointError(f"optimizer: diverged: {final.message}")
        else:  # converged, max_iter, or a line search that cannot improve further
            final.save(state_path)
    except Cancelled:
        status, message = "cancelled", "cancelled during an evaluation"
        with contextlib.suppress(FileNotFoundError):
            final = OptimizerState.load(state_path)
    theta = np.asarray(final.theta if final.J is not None else theta0, dtype=np.float64)
    save_model(model_path, net, theta, metadata)
    if write_pictures:
        _save_filters(net, theta, sample_shape, filters_path)
    if write_cost and history:
        _save_cost(history, out / COST)
    seconds = history[-1]["seconds"] if history else offset
    return StageResult(
        status=status,
        theta=theta,
        cost=None if final.J is None else float(final.J),
        iterations=int(final.iteration),
        evaluations=int(final.n_evals),
        seconds=float(seconds),
        message=message,
        history=history,
    )


# --------------------------------------------------------------------------- spec -> network


def build_network(spec: TrainSpec, n_features: int) -> Network:
    """The sparse autoencoder ``n_features -> hidden -> n_features`` of a one-layer spec."""
    return Network.autoencoder(
        n_features,
        spec.hidden_sizes[0],
        lam=spec.lam,
        rho=spec.rho,
        beta=spec.beta if spec.rho is not None else 0.0,
        activation=spec.activation,
        output_activation=spec.output_activation,
    )


def value_range(info: DatasetInfo) -> tuple[float, float] | None:
    """``(min, max)`` of a dataset's values when known (``preprocessing["value_range"]``,
    or the range of stored uint8 pixels)."""
    vr = info.preprocessing.get("value_range") if info.preprocessing else None
    if vr is not None and len(vr) == 2:
        return float(vr[0]), float(vr[1])
    if info.dtype == "uint8":
        return 0.0, 255.0 * info.scale
    return None


def check_output_range(spec: TrainSpec, vr: tuple[float, float] | None) -> None:
    """Raise ValueError naming ``output_activation`` when data spanning ``vr = (min, max)``
    lie outside what the spec's output units can reach (None: the range is unknown)."""
    out_act = spec.output_activation or spec.activation
    if out_act in OUTPUT_RANGES and vr is not None:
        lo, hi = OUTPUT_RANGES[out_act]
        tol = 1e-9
        if vr[0] < lo - tol or vr[1] > hi + tol:
            raise ValueError(
                f"output_activation: {out_act} output units reach [{lo:g}, {hi:g}] but the "
                f"data span [{vr[0]:.4g}, {vr[1]:.4g}] (preprocessing value_range); use "
                "--output-activation linear or rescale the data"
            )


def validate_spec(spec: TrainSpec, info: DatasetInfo) -> None:
    """Check a spec against its dataset before training.

    Raises
    ------
    ValueError
        Naming the field: ``output_activation`` when the data lie outside the range of the
        output units, ``passes`` when fused passes do not apply, ``hidden`` when empty.
    """
    n = info.shape[1]
    if info.shape[0] < 1 or n < 1:
        raise ValueError(f"dataset: {info.path} holds no examples")
    check_output_range(spec, value_range(info))
    if spec.passes == "fused" and spec.is_deep:
        pass  # each stage has one sparse layer: fused applies stage by stage


def check_job(spec: TrainSpec, dataset_path: str | None = None) -> DatasetInfo:
    """Everything that can be checked before a cluster starts: the dataset opens and the
    spec fits it (one-layer and deep).

    Raises
    ------
    worker.dataset.DatasetError
        If the dataset is missing or not a dataset (a ValueError).
    ValueError
        Naming the field, when the spec does not fit the dataset.
    """
    info = open_dataset(str(dataset_path or spec.dataset))
    validate_spec(spec, info)
    if spec.is_deep:
        from worker.deep import validate_deep

        validate_deep(spec, info.shape[1])
    else:
        build_network(spec, info.shape[1])
    return info


def choose_plan(info: DatasetInfo, dtype: str, plan: Plan = "auto") -> str:
    """``"local"`` for datasets up to :data:`LOCAL_PLAN_BYTES` (decoded), else
    ``"distributed"``."""
    if plan != "auto":
        if plan not in ("local", "distributed"):
            raise ValueError(f"plan: choose 'auto', 'local' or 'distributed', got {plan!r}")
        return plan
    nbytes = info.shape[0] * info.shape[1] * np.dtype(dtype).itemsize
    return "local" if nbytes <= LOCAL_PLAN_BYTES else "distributed"


def optimizer_options(spec: TrainSpec) -> dict:
    """Optimizer options from a spec."""
    return {"alpha": spec.alpha} if spec.optimizer == "gd" else {}


# --------------------------------------------------------------------------- the local plan


def run_local_stage(
    dataset_path: str,
    net: Network,
    theta0: np.ndarray,
    out_dir: str,
    *,
    passes: str,
    dtype: str,
    optimizer: str,
    options: dict,
    max_iter: int,
    sample_shape,
    metadata: dict,
    refresh_seconds: float = REFRESH_SECONDS,
    owner: str | None = None,
    resume: bool = True,
) -> dict:
    """The whole optimisation of one stage in this process (run as one Dask task).

    Resumes from ``out_dir/state.npz`` when the caller asks (``resume``, a resumed job) or
    when this is a rerun of the task (Dask reruns it after a lost worker): the first run
    creates ``out_dir/.started-<owner>``, and a run finding it resumes. A fresh job thus
    never continues from a state.npz left by an older run. Stops when ``out_dir/.cancel``
    appears, or when ``out_dir/.owner`` no longer holds ``owner`` (a newer run of the job
    took over, e.g. after a service restart). Returns the StageResult as a dict (without
    the history).
    """
    cancel = Path(out_dir) / CANCEL
    owner_file = Path(out_dir) / OWNER
    marker = Path(out_dir) / f"{STARTED_PREFIX}{owner or 'anonymous'}"
    if marker.exists():
        resume = True  # a rerun of this task: continue its own checkpoints
    else:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        _atomic_write_bytes(marker, lambda fh: fh.write(b""))

    def superseded() -> bool:
        if owner is None:
            return False
        try:
            return owner_file.read_text() != owner
        except FileNotFoundError:
            return True

    def stop() -> bool:
        return cancel.exists() or superseded()

    f = LocalObjective(dataset_path, net, passes=passes, dtype=dtype, should_stop=stop)
    res = train_stage(
        net,
        theta0,
        f,
        out_dir,
        optimizer=optimizer,
        options=options,
        max_iter=max_iter,
        should_stop=stop,
        resume=resume,
        sample_shape=sample_shape,
        metadata=metadata,
        refresh_seconds=refresh_seconds,
        write_cost=False,  # drawn by the client, off the critical path
    )
    with contextlib.suppress(FileNotFoundError):
        marker.unlink()
    d = asdict(res)
    d.pop("history")
    return d


def _cancelled_stage(out: Path, net: Network, theta0: np.ndarray, metadata: dict) -> dict:
    """The result of a local-plan stage whose task was abandoned after a cancel: the last
    checkpoint (or theta0), written to model.npz like a stage that stopped itself."""
    from sae.optimize import OptimizerState

    try:
        st = OptimizerState.load(out / STATE)
    except (FileNotFoundError, OSError, ValueError):
        st = None
    theta = np.asarray(theta0 if st is None or st.J is None else st.theta, dtype=np.float64)
    save_model(out / MODEL, net, theta, metadata)
    history = read_history(out / HISTORY) if (out / HISTORY).exists() else []
    if st is not None:
        history = [e for e in history if e["iteration"] <= st.iteration]
    return {
        "status": "cancelled",
        "theta": theta,
        "cost": None if st is None or st.J is None else float(st.J),
        "iterations": 0 if st is None else int(st.iteration),
        "evaluations": 0 if st is None else int(st.n_evals),
        "seconds": float(history[-1]["seconds"]) if history else 0.0,
        "message": "cancelled while the task waited or evaluated",
    }


def _follow_local(
    client,
    future,
    out: Path,
    on_iteration: Callable[[dict], None] | None,
    should_stop: Callable[[], bool] | None,
    poll: float = 0.1,
    grace: float | None = None,
) -> dict | None:
    """Wait for a local-plan task, forwarding history entries and cancel requests.

    After a cancel request the task gets ``grace`` seconds (default
    :data:`CANCEL_GRACE_SECONDS`) to stop at its next check; then it is cancelled (a task
    still queued behind busy or absent workers never starts), its ``.owner`` file removed
    (a task already running stops at its next check) and None is returned: the caller
    reports the last checkpoint.
    """
    from distributed import wait

    grace = CANCEL_GRACE_SECONDS if grace is None else grace
    cancelled_at: float | None = None
    seen = -1
    mtime = None
    history_path = out / HISTORY

    def forward() -> None:
        nonlocal seen, mtime
        try:
            m = history_path.stat().st_mtime_ns
        except FileNotFoundError:
            return
        if m == mtime:
            return
        mtime = m
        try:
            entries = read_history(history_path)
        except json.JSONDecodeError:
            mtime = None
            return
        for e in entries:
            if e["iteration"] > seen:
                seen = e["iteration"]
                if on_iteration is not None:
                    on_iteration(e)

    try:
        while True:
            with contextlib.suppress(TimeoutError):
                wait([future], timeout=poll)
            forward()
            if future.done():
                break
            if cancelled_at is None and should_stop is not None and should_stop():
                (out / CANCEL).touch()
                cancelled_at = time.monotonic()
            if cancelled_at is not None and time.monotonic() - cancelled_at > grace:
                with contextlib.suppress(FileNotFoundError):
                    (out / OWNER).unlink()
                client.cancel(future)
                mtime = None
                forward()
                return None
        result = future.result()
        mtime = None
        forward()
        return result
    except BaseException:
        (out / CANCEL).touch()  # an interrupted client stops its task
        with contextlib.suppress(Exception):
            client.cancel(future)
        raise


# --------------------------------------------------------------------------- one job


def train(
    spec: TrainSpec,
    out_dir: str | os.PathLike,
    *,
    client=None,
    dataset_path: str | None = None,
    on_iteration: Callable[[dict], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    resume: bool = False,
    plan: Plan = "auto",
    job: str | None = None,
    cluster_options: dict | None = None,
    refresh_seconds: float = REFRESH_SECONDS,
    engine_options: dict | None = None,
) -> TrainResult:
    """Train the autoencoder a spec describes, on a Dask cluster.

    Parameters
    ----------
    spec : TrainSpec
    out_dir : path
        Job folder (created); see the module docstring for its files.
    client : distributed.Client, optional
        Default: an embedded LocalCluster for the job's duration (``cluster_options`` are
        passed to :func:`worker.cluster.get_client`).
    dataset_path : str, optional
        The dataset (default ``spec.dataset``).
    on_iteration : callable, optional
        Called with each history entry (dict with iteration, cost, grad_norm, evaluations,
        seconds).
    should_stop : callable, optional
        Polled after each iteration (and between evaluations); True cancels the job, whose
        last checkpoint stays usable for ``resume``.
    resume : bool
        Continue from the checkpoint in ``out_dir`` (bitwise the uninterrupted trajectory).
    plan : {"auto", "local", "distributed"}
        Execution plan (see the module docstring); auto picks local for small datasets.
    job : str, optional
        Name in task keys (default: the folder's name).
    cluster_options : dict, optional
    engine_options : dict, optional
        Extra arguments of :class:`worker.engine.DistributedObjective` (``cache``,
        ``fan_in``, ``single_task``) for the distributed plan.
    refresh_seconds : float
        Interval of filters.png refreshes.

    Returns
    -------
    TrainResult

    Raises
    ------
    ValueError
        When the spec does not fit the dataset (naming the field).
    worker.dataset.ChunkError
        When a chunk is missing, unreadable or non-finite (naming the chunk).
    """
    if client is None:
        from worker.cluster import get_client

        with get_client(**(cluster_options or {})) as (c, _):
            return train(
                spec,
                out_dir,
                client=c,
                dataset_path=dataset_path,
                on_iteration=on_iteration,
                should_stop=should_stop,
                resume=resume,
                plan=plan,
                job=job,
                refresh_seconds=refresh_seconds,
                engine_options=engine_options,
            )
    out = Path(out_dir)
    path = str(dataset_path or spec.dataset)
    info = check_job(spec, path)
    dashboard = _dashboard(client)
    if spec.is_deep:
        from worker.deep import train_deep

        out.mkdir(parents=True, exist_ok=True)
        return train_deep(
            spec,
            out,
            client=client,
            dataset_path=path,
            on_iteration=on_iteration,
            should_stop=should_stop,
            resume=resume,
            refresh_seconds=refresh_seconds,
        )

    net = build_network(spec, info.shape[1])
    chosen = choose_plan(info, spec.dtype, plan)
    out.mkdir(parents=True, exist_ok=True)
    if not resume:
        for name in (STATE, HISTORY, MODEL, FILTERS, COST):
            with contextlib.suppress(FileNotFoundError):
                (out / name).unlink()
        shutil.rmtree(out / STATE_PAIRS, ignore_errors=True)
    with contextlib.suppress(FileNotFoundError):
        (out / CANCEL).unlink()
    job_name = job or out.resolve().name or "sae"
    metadata = {
        "spec": spec.model_dump(mode="json"),
        "dataset": info.to_dict(),
        "sample_shape": list(info.sample_shape) if info.sample_shape else None,
    }
    job_info = {
        **metadata,
        "plan": chosen,
        "dashboard": dashboard,
        "n_params": net.n_params,
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "resumed": bool(resume),
    }
    write_json(out / JOB, job_info)
    theta0 = net.init_theta(spec.seed)
    options = optimizer_options(spec)

    if chosen == "local":
        stage = _train_local(
            client,
            path,
            net,
            theta0,
            out,
            spec,
            options,
            metadata,
            job_name,
            on_iteration,
            should_stop,
            resume,
            refresh_seconds,
        )
    else:
        f = DistributedObjective(
            client,
            path,
            net,
            passes=spec.passes,
            dtype=spec.dtype,
            job=job_name,
            should_stop=should_stop,
            **(engine_options or {}),
        )
        res = train_stage(
            net,
            theta0,
            f,
            out,
            optimizer=spec.optimizer,
            options=options,
            max_iter=spec.max_iter,
            on_iteration=on_iteration,
            should_stop=should_stop,
            resume=resume,
            sample_shape=info.sample_shape,
            metadata=metadata,
            refresh_seconds=refresh_seconds,
        )
        stage = asdict(res)
    with contextlib.suppress(FileNotFoundError):
        (out / CANCEL).unlink()
    return TrainResult(
        status=stage["status"],
        out_dir=out,
        model_path=out / MODEL,
        history_path=out / HISTORY,
        state_path=out / STATE,
        job_path=out / JOB,
        filters_path=(out / FILTERS) if (out / FILTERS).exists() else None,
        cost_path=(out / COST) if (out / COST).exists() else None,
        final_cost=stage["cost"],
        iterations=stage["iterations"],
        evaluations=stage["evaluations"],
        seconds=stage["seconds"],
        plan=chosen,
        dashboard=dashboard,
        message=stage["message"],
    )


def _train_local(
    client,
    path: str,
    net: Network,
    theta0: np.ndarray,
    out: Path,
    spec: TrainSpec,
    options: dict,
    metadata: dict,
    job_name: str,
    on_iteration,
    should_stop,
    resume: bool,
    refresh_seconds: float,
) -> dict:
    import threading

    # Warm matplotlib up here while the task trains, to draw cost.png at the end.
    threading.Thread(target=_warm_display, daemon=True).start()
    owner = uuid.uuid4().hex
    for old in out.glob(STARTED_PREFIX + "*"):  # markers of earlier runs
        with contextlib.suppress(FileNotFoundError):
            old.unlink()
    _atomic_write_bytes(out / OWNER, lambda fh: fh.write(owner.encode()))
    workers = sorted(client.scheduler_info(n_workers=-1).get("workers", {}))
    kwargs: dict = {}
    if workers:  # jobs spread over the workers by a hash of their folder
        w = workers[zlib.crc32(str(out.resolve()).encode()) % len(workers)]
        kwargs = {"workers": [w], "allow_other_workers": True}
    future = client.submit(
        run_local_stage,
        path,
        net,
        theta0,
        str(out.resolve()),
        passes=spec.passes,
        dtype=spec.dtype,
        optimizer=spec.optimizer,
        options=options,
        max_iter=spec.max_iter,
        sample_shape=metadata["sample_shape"],
        metadata=metadata,
        refresh_seconds=refresh_seconds,
        owner=owner,
        resume=resume,
        key=f"train-{job_name}-{uuid.uuid4().hex[:8]}",
        pure=False,
        **kwargs,
    )
    stage = _follow_local(client, future, out, on_iteration, should_stop)
    if stage is None:
        stage = _cancelled_stage(out, net, theta0, metadata)
    history = read_history(out / HISTORY)
    if history:
        _save_cost(history, out / COST)
    return stage


def _warm_display() -> None:
    with contextlib.suppress(Exception):
        import matplotlib.backends.backend_agg  # noqa: F401
        import matplotlib.figure  # noqa: F401

        import sae.display  # noqa: F401


def _dashboard(client) -> str | None:
    try:
        return client.dashboard_link
    except Exception:  # noqa: BLE001 - a scheduler without a dashboard
        return None


def remove_job_files(out_dir: str | os.PathLike) -> None:
    """Delete a job folder (used by tests and the service)."""
    shutil.rmtree(out_dir, ignore_errors=True)
