"""Where a stage runs: in the driver, or as one task next to its data.

Two strategies with one interface, ``run(stage, hooks, resume) -> StageResult``:

- :class:`InDriver` (``"distributed"``): the optimizer runs in this process; each evaluation
  is one Dask graph over the chunks (:class:`worker.engine.DistributedObjective`).
- :class:`NextToData` (``"local"``): for a stage whose data are small, the whole optimisation
  runs as one task on one worker (:class:`worker.engine.LocalObjective`: the same sums and
  tree, so the same bits). The task writes the checkpoints and history itself; this process
  follows them, forwards ``on_iteration`` and asks the task to stop through a ``.cancel``
  file. If the worker dies, Dask reruns the task, which resumes from the last checkpoint.
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

from worker import layout
from worker.engine import BatchObjective, DistributedObjective, LocalObjective
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
        owner = uuid.uuid4().hex
        for old in out.glob(layout.STARTED_PREFIX + "*"):  # markers of earlier runs
            with contextlib.suppress(FileNotFoundError):
                old.unlink()
        layout.write_bytes(out / layout.OWNER, lambda fh: fh.write(owner.encode()))
        if hooks.stop():  # asked to stop before the task started: it never does
            result = abandoned_stage(stage, "cancelled before the stage started")
            result.history = layout.read_history(out / layout.HISTORY)
            return result
        future = self.client.submit(
            run_local_stage,
            dataclasses.replace(stage, folder=out.resolve()),
            self.dataset_path,
            owner=owner,
            resume=resume,
            refresh_seconds=self.refresh_seconds,
            key=f"train-{self.job}-{uuid.uuid4().hex[:8]}",
            pure=False,
            **self._placement(out),
        )
        result = follow(
            self.client, future, out, hooks, self.cancel_grace, _resumed_at(out, resume)
        )
        if result is None:
            result = abandoned_stage(stage)
        result.history = layout.read_history(out / layout.HISTORY)
        save_cost(result.history, out / layout.COST)
        layout.clear_cancel(out)
        return result

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
    service restart). Returns the result without its history (the driver reads the file).
    """
    out = Path(stage.folder)
    cancel, owner_file = out / layout.CANCEL, out / layout.OWNER
    marker = out / f"{layout.STARTED_PREFIX}{owner or 'anonymous'}"
    if marker.exists():
        resume = True  # a rerun of this task: continue its own checkpoints
    else:
        out.mkdir(parents=True, exist_ok=True)
        layout.write_bytes(marker, lambda fh: fh.write(b""))

    def superseded() -> bool:
        if owner is None:
            return False
        try:
            return owner_file.read_text() != owner
        except FileNotFoundError:
            return True

    def stop() -> bool:
        return cancel.exists() or superseded()

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
    )
    with contextlib.suppress(FileNotFoundError):
        marker.unlink()
    res.history = []
    return res


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
) -> StageResult | None:
    """Wait for a stage's task, forwarding history entries after iteration ``seen`` and
    cancel requests.

    After a cancel request the task gets ``grace`` seconds to stop at its next check; then it
    is cancelled (a task still queued behind busy or absent workers never starts), its
    ``.owner`` file removed (a task already running stops at its next check) and None is
    returned: the caller reports the last checkpoint.
    """
    from distributed import wait

    cancelled_at: float | None = None
    forward = _Forwarder(out / layout.HISTORY, hooks, seen)
    try:
        while True:
            with contextlib.suppress(TimeoutError):
                wait([future], timeout=poll)
            forward()
            if future.done():
                break
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
        (out / layout.CANCEL).touch()  # an interrupted driver stops its task
        with contextlib.suppress(Exception):
            client.cancel(future)
        raise


def _warm_display() -> None:
    with contextlib.suppress(Exception):
        import matplotlib.backends.backend_agg  # noqa: F401
        import matplotlib.figure  # noqa: F401

        import sae.display  # noqa: F401


STRATEGIES = {"distributed": InDriver, "local": NextToData}
