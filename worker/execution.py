"""Where a stage runs: in the driver, or as one task next to its data.

Two strategies with one interface, ``run(stage, hooks, resume) -> StageResult``:

- :class:`InDriver` (``"distributed"``): the optimizer runs in this process; each evaluation
  is one Dask graph over the chunks (:class:`worker.engine.DistributedObjective`).
- :class:`NextToData` (``"local"``): for a stage whose data are small, the whole optimisation
  runs as one task on one worker (:class:`worker.engine.LocalObjective`: the same sums and
  tree, so the same bits). The task writes the checkpoints and history itself; this process
  follows them, forwards ``on_iteration`` and asks the task to stop through a ``.cancel``
  file. If the worker dies, Dask reruns the task, which resumes from the last checkpoint.
  Once the stage has ended (every way it can), this process releases the task's future and
  removes ``.owner``: a rerun after that (Dask recomputes a lost result it still holds a
  future of) finds the folder gone or not its own and returns without writing anything.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import threading
import time
import uuid
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from sae import objective as obj
from worker import layout
from worker.engine import (
    POLL_SECONDS,
    RESUBMITS,
    BatchObjective,
    Cancelled,
    DistributedObjective,
    LocalObjective,
    StrandedCheck,
    lost_with_scheduler,
    wait_reconnected,
    workers_died,
)
from worker.stage import REFRESH_SECONDS, Hooks, Stage, StageResult, run_stage, save_cost

#: After a cancel request, a task next to its data has this long to stop by itself before the
#: driver cancels it and reports the last checkpoint (a task queued behind busy workers).
CANCEL_GRACE_SECONDS = 3.0


@dataclass
class InDriver:
    """Run a stage here, one Dask graph per evaluation.

    Parameters
    ----------
    client : distributed.Client
    dataset_path : str
    job : str
        Name in task keys.
    engine_options : dict
        Extra arguments of :class:`worker.engine.DistributedObjective` (``cache``,
        ``fan_in``, ``single_task``).
    refresh_seconds : float
    """

    client: object
    dataset_path: str
    job: str
    engine_options: dict = field(default_factory=dict)
    refresh_seconds: float = REFRESH_SECONDS

    def run(self, stage: Stage, hooks: Hooks, resume: bool) -> StageResult:
        """Train ``stage`` (see :func:`worker.stage.run_stage`, and
        :func:`worker.stochastic.run_stochastic_stage` for a stage with minibatches)."""
        if stage.batches is not None:
            return self._run_stochastic(stage, hooks, resume)
        f = self._objective(DistributedObjective, stage, hooks, self.engine_options)
        return run_stage(stage, f, hooks, resume=resume, refresh_seconds=self.refresh_seconds)

    def _objective(
        self, cls, stage: Stage, hooks: Hooks, options: dict, path: str | None = None, tag=""
    ):
        return cls(
            self.client,
            path or self.dataset_path,
            stage.network,
            passes=stage.passes,
            dtype=stage.dtype,
            encoder=stage.encoder,
            target=stage.target,
            job=self.job + tag,
            should_stop=hooks.should_stop,
            **options,
        )

    def _run_stochastic(self, stage: Stage, hooks: Hooks, resume: bool) -> StageResult:
        from worker.stochastic import run_stochastic_stage

        options = {k: v for k, v in self.engine_options.items() if k in ("cache", "fan_in")}
        f = self._objective(BatchObjective, stage, hooks, options)
        validate = None
        if stage.validation is not None:
            held_out = stage.validation
            f_val = f
            if stage.validation_path is not None:  # another dataset: its own objective
                f_val = self._objective(
                    BatchObjective, stage, hooks, options, stage.validation_path, "-validation"
                )

            def validate(theta: np.ndarray) -> float:
                return f_val(theta, held_out)[0]

        return run_stochastic_stage(
            stage,
            f,
            hooks,
            resume=resume,
            refresh_seconds=self.refresh_seconds,
            validate=validate,
        )


@dataclass
class NextToData:
    """Run a stage's whole optimisation as one task on one worker, next to its data.

    Parameters
    ----------
    client : distributed.Client
    dataset_path : str
    job : str
        Name in the task's key.
    refresh_seconds : float
    cancel_grace : float
        See :data:`CANCEL_GRACE_SECONDS`.
    """

    client: object
    dataset_path: str
    job: str
    refresh_seconds: float = REFRESH_SECONDS
    cancel_grace: float = CANCEL_GRACE_SECONDS

    def run(self, stage: Stage, hooks: Hooks, resume: bool) -> StageResult:
        """Train ``stage`` in a task; follow its history; stop it on request."""
        # Warm matplotlib up here while the task trains, to draw cost.png at the end.
        threading.Thread(target=_warm_display, daemon=True).start()
        out = stage.folder
        out.mkdir(parents=True, exist_ok=True)
        layout.clear_cancel(out)
        for old in out.glob(layout.STARTED_PREFIX + "*"):  # markers of earlier runs
            with contextlib.suppress(FileNotFoundError):
                old.unlink()
        owners = [_take_over(out)]
        try:
            if hooks.stop():  # asked to stop before the task started: it never does
                result = abandoned_stage(stage, "cancelled before the stage started")
                result.history = layout.read_history(out / layout.HISTORY)
                return result
            result = self._submit_and_follow(stage, hooks, resume, owners)
        finally:
            disown(out, owners[-1])  # from now on, any run of the task is superseded
        if result is None:
            result = abandoned_stage(stage)
        result.history = layout.read_history(out / layout.HISTORY)
        save_cost(result.history, out / layout.COST)
        layout.clear_cancel(out)
        return result

    def _submit_and_follow(
        self, stage: Stage, hooks: Hooks, resume: bool, owners: list[str]
    ) -> StageResult | None:
        """Run the stage's task as ``owners[-1]`` and follow it (None: abandoned after a
        cancel).

        If the connection to the scheduler is lost (it restarted: the client cancels every
        future), the task is submitted again once the client has reconnected, under a new
        owner (a copy of the old task still running stops) and continuing the old one's
        checkpoints.
        """
        from distributed import KilledWorker

        out = stage.folder
        forward = _Forwarder(out / layout.HISTORY, hooks, _resumed_at(out, resume))
        for attempt in range(RESUBMITS + 1):
            future = None
            try:
                future = self.client.submit(
                    run_local_stage,
                    dataclasses.replace(stage, folder=out.resolve()),
                    self.dataset_path,
                    owner=owners[-1],
                    resume=resume,
                    refresh_seconds=self.refresh_seconds,
                    key=f"train-{self.job}-{uuid.uuid4().hex[:8]}",
                    pure=False,
                    **self._placement(out),
                )
                return follow(self.client, future, out, hooks, self.cancel_grace, forward=forward)
            except KilledWorker as exc:
                raise workers_died(
                    exc, self.client, **_data_sizes(self.dataset_path, stage), whole_task=True
                ) from exc
            except Exception as exc:
                if not lost_with_scheduler(exc, future) or attempt == RESUBMITS:
                    raise
            time.sleep(POLL_SECONDS)  # the client may not have noticed the loss yet
            try:
                wait_reconnected(self.client, hooks.should_stop)
            except Cancelled:
                return None
            started = out / f"{layout.STARTED_PREFIX}{owners[-1]}"
            resume = resume or started.exists()  # continue what the lost task checkpointed
            layout.clear_cancel(out)  # written by follow() for the lost task
            owners.append(_take_over(out))
        raise AssertionError("unreachable")

    def _placement(self, out: Path) -> dict:
        """Spread jobs over the workers by a hash of their folder."""
        workers = sorted(self.client.scheduler_info(n_workers=-1).get("workers", {}))
        if not workers:
            return {}
        w = workers[zlib.crc32(str(out.resolve()).encode()) % len(workers)]
        return {"workers": [w], "allow_other_workers": True}


def run_local_stage(
    stage: Stage,
    dataset_path: str,
    *,
    owner: str | None = None,
    resume: bool = True,
    refresh_seconds: float = REFRESH_SECONDS,
) -> StageResult:
    """The whole optimisation of one stage in this process (run as one Dask task).

    Resumes from the stage's ``state.npz`` when the caller asks (``resume``, a resumed job)
    or when this is a rerun of the task (Dask reruns it after a lost worker): the first run
    creates ``.started-<owner>``, and a run finding it resumes. A fresh job thus never
    continues from a state.npz left by an older run. Stops when ``.cancel`` appears, or when
    ``.owner`` no longer holds ``owner`` (a newer run of the job took over, e.g. after a
    service restart, or the stage has ended and its driver let go of the folder). Returns the
    result without its history (the driver reads the file).

    The folder is the driver's: this never creates it. A run that finds it gone, or not its
    own (a late rerun by Dask of a task whose stage has ended, whose job may have been
    deleted), returns at once, writing nothing; a run superseded while it trains writes
    nothing more (no checkpoint, model.npz or filters.png).
    """
    out = Path(stage.folder)
    cancel, owner_file = out / layout.CANCEL, out / layout.OWNER

    def owns() -> bool:
        if owner is None:
            return out.is_dir()
        try:
            return owner_file.read_text() == owner
        except OSError:  # gone (with its folder, or once the stage ended), or unreadable
            return False

    if not owns():
        return _not_run(stage, f"superseded: {out} is gone or owned by another run")
    marker = out / f"{layout.STARTED_PREFIX}{owner or 'anonymous'}"
    if marker.exists():
        resume = True  # a rerun of this task: continue its own checkpoints
    else:
        layout.write_bytes(marker, lambda fh: fh.write(b""))

    def stop() -> bool:
        return cancel.exists() or not owns()

    f = LocalObjective(
        dataset_path,
        stage.network,
        passes=stage.passes,
        dtype=stage.dtype,
        encoder=stage.encoder,
        target=stage.target,
        should_stop=stop,
    )
    res = run_stage(
        stage,
        f,
        Hooks(should_stop=stop),
        resume=resume,
        refresh_seconds=refresh_seconds,
        write_cost=False,  # drawn by the driver, off the critical path
        may_write=owns,
    )
    with contextlib.suppress(FileNotFoundError):
        marker.unlink()
    res.history = []
    return res


def _not_run(stage: Stage, message: str) -> StageResult:
    """The result of a task that did not run its stage (nothing written)."""
    return StageResult(
        status="cancelled",
        theta=np.asarray(stage.theta0, dtype=np.float64),
        cost=None,
        iterations=0,
        evaluations=0,
        seconds=0.0,
        message=message,
    )


def _take_over(out: Path) -> str:
    """Make a new owner of a stage's folder (a run of its task with another owner stops)."""
    owner = uuid.uuid4().hex
    layout.write_bytes(out / layout.OWNER, lambda fh: fh.write(owner.encode()))
    return owner


def disown(out: Path, owner: str) -> None:
    """Let go of a stage's folder: remove its ``.owner`` if it still holds ``owner`` (a newer
    run's is left alone), so any later run of the stage's task is superseded."""
    owner_file = out / layout.OWNER
    with contextlib.suppress(OSError):
        if owner_file.read_text() == owner:
            owner_file.unlink()


def _data_sizes(dataset_path: str, stage: Stage) -> dict:
    """The decoded sizes of one chunk and of the whole data of a stage (for error messages);
    empty when the dataset cannot be read."""
    from worker.dataset import open_dataset

    try:
        info = open_dataset(dataset_path)
    except Exception:  # noqa: BLE001 - only for a message
        return {}
    item = np.dtype(obj.array_dtype(stage.dtype)).itemsize
    m, n = info.shape
    return {"chunk_bytes": info.chunk_rows * n * item, "data_bytes": m * n * item}


def abandoned_stage(
    stage: Stage, message: str = "cancelled while the task waited or evaluated"
) -> StageResult:
    """The result of a stage whose task was abandoned after a cancel: the last checkpoint
    (or theta0), written to model.npz like a stage that stopped itself."""
    from sae.optimize import OptimizerState

    out = stage.folder
    try:
        st = OptimizerState.load(out / layout.STATE)
    except (FileNotFoundError, OSError, ValueError):
        st = None
    theta = np.asarray(stage.theta0 if st is None or st.J is None else st.theta, dtype=np.float64)
    layout.save_model(out / layout.MODEL, stage.network, theta, stage.metadata)
    history = layout.read_history(out / layout.HISTORY)
    if st is not None:
        history = [e for e in history if e["iteration"] <= st.iteration]
    return StageResult(
        status="cancelled",
        theta=theta,
        cost=None if st is None or st.J is None else float(st.J),
        iterations=0 if st is None else int(st.iteration),
        evaluations=0 if st is None else int(st.n_evals),
        seconds=float(history[-1]["seconds"]) if history else 0.0,
        message=message,
    )


class _Forwarder:
    """Forwards the new entries of a history.json (rewritten by a task) to a hook."""

    def __init__(self, path: Path, hooks: Hooks, seen: int = -1) -> None:
        self.path, self.hooks = path, hooks
        self.seen, self.mtime = seen, None

    def __call__(self, force: bool = False) -> None:
        if force:
            self.mtime = None
        try:
            m = self.path.stat().st_mtime_ns
        except FileNotFoundError:
            return
        if m == self.mtime:
            return
        self.mtime = m
        try:
            entries = layout.read_history(self.path)
        except json.JSONDecodeError:
            self.mtime = None
            return
        for e in entries:
            if e["iteration"] > self.seen:
                self.seen = e["iteration"]
                if self.hooks.on_iteration is not None:
                    self.hooks.on_iteration(e)


def _resumed_at(out: Path, resume: bool) -> int:
    """The last iteration a resumed stage's checkpoint holds (-1: none), whose history entries
    the caller has seen already."""
    from sae.optimize import OptimizerState

    if not resume:
        return -1
    try:
        return int(OptimizerState.load(out / layout.STATE).iteration)
    except (OSError, ValueError):
        return -1


def follow(
    client,
    future,
    out: Path,
    hooks: Hooks,
    grace: float = CANCEL_GRACE_SECONDS,
    seen: int = -1,
    poll: float = 0.1,
    forward: _Forwarder | None = None,
) -> StageResult | None:
    """Wait for a stage's task, forwarding history entries after iteration ``seen`` (or with
    ``forward``, a forwarder kept across resubmissions of the task) and cancel requests.

    After a cancel request the task gets ``grace`` seconds to stop at its next check; then it
    is cancelled (a task still queued behind busy or absent workers never starts), its
    ``.owner`` file removed (a task already running stops at its next check) and None is
    returned: the caller reports the last checkpoint. The future is released on return,
    whichever way.
    """
    from distributed import wait

    cancelled_at: float | None = None
    forward = forward or _Forwarder(out / layout.HISTORY, hooks, seen)
    stranded = StrandedCheck(client)
    try:
        while True:
            with contextlib.suppress(TimeoutError):
                wait([future], timeout=poll)
            forward()
            if future.done():
                break
            stranded()
            if cancelled_at is None and hooks.stop():
                (out / layout.CANCEL).touch()
                cancelled_at = time.monotonic()
            if cancelled_at is not None and time.monotonic() - cancelled_at > grace:
                with contextlib.suppress(FileNotFoundError):
                    (out / layout.OWNER).unlink()
                client.cancel(future)
                forward(force=True)
                return None
        result = future.result()
        forward(force=True)
        return result
    except BaseException:
        with contextlib.suppress(OSError):  # the folder may be gone
            (out / layout.CANCEL).touch()  # an interrupted driver stops its task
        with contextlib.suppress(Exception):
            client.cancel(future)
        raise
    finally:
        # At once, not when the future is collected (reference cycles through tracebacks
        # can keep it for minutes): while a client holds a future, Dask reruns its finished
        # task when the worker holding the result dies.
        future.release()


def _warm_display() -> None:
    with contextlib.suppress(Exception):
        import matplotlib.backends.backend_agg  # noqa: F401
        import matplotlib.figure  # noqa: F401

        import sae.display  # noqa: F401


STRATEGIES = {"distributed": InDriver, "local": NextToData}
