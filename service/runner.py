"""The job runner: runs queued jobs in order, one thread per job, under a concurrency limit.

Each job's optimizer loop runs in this process (a thread calling :func:`worker.train.train`);
each evaluation of the objective is one Dask graph on the cluster. The runner owns the Dask
client: with no scheduler address it starts an embedded LocalCluster.

Restarts: on start every job found ``running`` is re-queued (nobody runs it any more) and is
resumed from its last checkpoint. On a clean stop the running jobs are interrupted within one
evaluation and put back in the queue, so they resume on the next start.
"""

from __future__ import annotations

import contextlib
import logging
import math
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from service import datasets
from service.faults import is_store_error, job_failure
from service.settings import Settings
from service.store import Job, JobStore
from worker import schedule
from worker.spec import TrainSpec
from worker.stage_id import StageId

log = logging.getLogger("sae.service")


def stage_of(
    entry: dict[str, Any], spec: TrainSpec, rows: int | None = None
) -> tuple[str | None, int]:
    """How the job status names the stage of a history entry, and the iterations the job did
    before that stage: ``("pretrain k of K", (k - 1) * per_stage)``, ``("fine-tune", K *
    per_stage)``, or ``(None, 0)`` for a one-layer job (``per_stage``: ``max_iter``, or the
    steps of a stochastic stage on ``rows`` rows)."""
    sid = StageId.from_label(entry.get("stage"), spec.n_pretrain_stages)
    if sid.kind == "single":
        return None, 0
    per_stage = spec.stage_iterations(rows)
    if sid.kind == "finetune":
        return "fine-tune", sid.count * per_stage
    return f"pretrain {sid.index} of {sid.count}", (sid.index - 1) * per_stage


def _num(entry: dict[str, Any], name: str) -> float | None:
    """A finite number of a history entry, or None."""
    v = entry.get(name)
    return float(v) if isinstance(v, int | float) and math.isfinite(v) else None


@dataclass
class _Active:
    job: Job
    thread: threading.Thread | None = None
    cancel: threading.Event = field(default_factory=threading.Event)
    t0: float = field(default_factory=time.monotonic)
    first_done: int | None = None
    rows: int = 0  # examples in the dataset (samples per evaluation)
    steps_rows: int | None = None  # rows a stochastic job's batches draw from
    last: dict[str, Any] = field(default_factory=dict)  # figures of the last iteration


TrainFn = Callable[..., Any]


class Runner:
    """Runs the jobs of a store on a Dask cluster.

    Parameters
    ----------
    settings : Settings
    store : JobStore
    train_fn : callable, optional
        The training function (default :func:`worker.train.train`).
    """

    def __init__(self, settings: Settings, store: JobStore, train_fn: TrainFn | None = None):
        self.settings = settings
        self.store = store
        self._train_fn = train_fn
        self._active: dict[str, _Active] = {}
        # the ids of _active, replaced (never changed) under the lock: read without it, so a
        # probe never waits for the lock, which is held across store writes
        self._running: tuple[str, ...] = ()
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._shutdown = threading.Event()
        self._dispatcher: threading.Thread | None = None
        self._client = None
        self._cluster_error: str | None = None
        self._exit = contextlib.ExitStack()
        self.dashboard_url: str | None = settings.public_dashboard_url
        # outcomes of ended jobs that the store could not record (a full disk), retried by
        # the dispatcher every second until they are written: (job id, expected, new, run,
        # fields); ``run`` is the job's ``attempts`` when it ended, so the outcome of an old
        # run never lands on a newer run of the same job
        self._pending: list[tuple[str, list[str], str, int | None, dict[str, Any]]] = []
        self._pending_lock = threading.Lock()
        self._flushing = threading.Lock()

    # -- lifecycle ------------------------------------------------------------------------

    def start(self) -> list[str]:
        """Re-queue orphaned running jobs, connect to the cluster, start dispatching.

        Returns
        -------
        requeued : list of str
            Ids of the jobs found ``running`` (they resume from their checkpoints).
        """
        requeued = self.store.requeue_running()
        if requeued:
            log.info("re-queued jobs left running by a previous process: %s", requeued)
        self._dispatcher = threading.Thread(target=self._dispatch, name="sae-dispatch", daemon=True)
        self._dispatcher.start()
        return requeued

    def stop(self, timeout: float = 60.0) -> None:
        """Interrupt running jobs (they go back to the queue), then close the client.

        Outcomes the store could not write yet are tried once more; what still cannot be
        written is logged (those jobs are found ``running`` at the next start and resumed).
        """
        self._shutdown.set()
        self._wake.set()
        try:
            if self._dispatcher is not None:
                self._dispatcher.join(timeout)
            with self._lock:
                active = list(self._active.values())
            for a in active:
                if a.thread is not None:
                    a.thread.join(timeout)
            for job_id in self.running_ids():  # threads that did not stop in time
                self._record(job_id, ["running"], "queued", crashes=0)
            with contextlib.suppress(Exception):
                self._flush_pending()
            for job_id, _, new, _, _ in self._pending:
                log.error("job %s: could not record %s before stopping", job_id, new)
        finally:
            try:
                self._exit.close()
            except Exception:  # noqa: BLE001 - closing is best effort
                log.exception("closing the Dask client")
            self.store.close()

    def _connect(self) -> Any:
        from worker.cluster import dashboard_link, get_client

        s = self.settings
        client, _ = self._exit.enter_context(
            get_client(
                scheduler=s.scheduler,
                workers=s.workers,
                threads_per_worker=s.threads_per_worker,
                memory_limit=s.memory_limit,
                dashboard_host=s.dashboard_host,
            )
        )
        if self.dashboard_url is None:
            self.dashboard_url = dashboard_link(client)
        return client

    @property
    def cluster_error(self) -> str | None:
        """Why the last attempt to connect to the cluster failed, if it did."""
        return self._cluster_error

    @property
    def client(self) -> Any:
        """The Dask client (connected on first use)."""
        if self._client is None:
            self._client = self._connect()
        return self._client

    def cluster_summary(self, timeout: float = 2.0) -> dict[str, Any]:
        """The scheduler's address, whether it is embedded, its workers, threads and memory.

        Empty before the runner has connected; without the counts when the scheduler does
        not answer within ``timeout`` seconds (``/health`` never hangs on it).
        """
        client = self._client
        if client is None:
            return {}
        out: dict[str, Any] = {
            "scheduler": client.scheduler.address,
            "embedded": self.settings.scheduler is None,
        }
        try:
            info = client.sync(client.scheduler.identity, n_workers=-1, callback_timeout=timeout)
        except Exception:  # noqa: BLE001 - a slow or gone scheduler: report what is known
            return out
        workers = (info or {}).get("workers", {}).values()
        out["workers"] = len(workers)
        out["threads"] = sum(int(w.get("nthreads") or 0) for w in workers)
        out["memory_limit_bytes"] = sum(int(w.get("memory_limit") or 0) for w in workers)
        return out

    def notify(self) -> None:
        """Wake the dispatcher (a job was queued or finished)."""
        self._wake.set()

    # -- dispatching ------------------------------------------------------------------------

    def _dispatch(self) -> None:
        while not self._shutdown.is_set():
            self._wake.clear()
            try:
                self._flush_pending()
                self._fill_slots()
            except Exception:  # noqa: BLE001 - keep dispatching
                log.exception("dispatcher")
            self._wake.wait(1.0)

    def _fill_slots(self) -> None:
        while not self._shutdown.is_set():
            with self._lock:
                if len(self._active) >= self.settings.max_concurrent_jobs:
                    return
            if self._client is not None and getattr(self._client, "status", None) == "closed":
                # the scheduler stayed away longer than the client kept reconnecting: a new
                # client for the next jobs (the old one is closed with the others at stop)
                log.warning("the Dask client closed (scheduler lost); connecting again")
                self._client = None
            if self._client is None:
                try:
                    self.client  # noqa: B018 - connect before claiming a job
                except Exception as exc:  # noqa: BLE001
                    log.exception("cannot connect to the Dask cluster")
                    self._cluster_error = f"{type(exc).__name__}: {exc}"
                    return
                self._cluster_error = None
            # claim and register under the lock, so a cancel cannot fall between the two
            with self._lock:
                job = self.store.claim_next()
                if job is None:
                    return
                active = _Active(job)
                active.thread = threading.Thread(
                    target=self._run, args=(active,), name=f"sae-job-{job.id}", daemon=True
                )
                self._active[job.id] = active
                self._running = tuple(self._active)
            active.thread.start()

    def _record(
        self, job_id: str, expected: list[str], new: str, run: int | None = None, **fields: Any
    ) -> None:
        """Change a job's status (of its run ``run``, its ``attempts``, when given); if the
        store cannot write now (a full disk), keep the change to retry, so the job's slot is
        freed anyway and its outcome lands once it can."""
        try:
            self.store.transition(job_id, expected, new, run=run, **fields)
        except Exception as exc:
            if not is_store_error(exc):
                raise
            log.warning("job %s: cannot record %s now (%s); will retry", job_id, new, exc)
            with self._pending_lock:
                self._pending.append((job_id, expected, new, run, fields))

    def _flush_pending(self) -> None:
        """Write the outcomes the store refused earlier, oldest first; keep what fails.

        One thread at a time (the dispatcher, or a job thread after an iteration), so an
        outcome is never written twice nor overtaken by a later one of the same job.
        """
        if not self._pending or not self._flushing.acquire(blocking=False):
            return
        try:
            while True:
                with self._pending_lock:
                    if not self._pending:
                        return
                    job_id, expected, new, run, fields = self._pending[0]
                try:
                    self.store.transition(job_id, expected, new, run=run, **fields)
                except Exception as exc:
                    if is_store_error(exc):
                        return  # still cannot write: keep it, and what follows, for later
                    log.exception("job %s: dropping the outcome %s", job_id, new)
                with self._pending_lock:
                    self._pending.pop(0)
                log.info("job %s: recorded %s", job_id, new)
        finally:
            self._flushing.release()

    def pending_outcomes(self) -> int:
        """How many ended jobs wait for their outcome to be written (a full disk)."""
        with self._pending_lock:
            return len(self._pending)

    # -- control ----------------------------------------------------------------------------

    def cancel(self, job_id: str) -> Job | None:
        """Cancel a queued or running job; a running one stops within one evaluation.

        Returns
        -------
        job : Job or None
            The job now cancelled, or None if it was not queued or running.
        """
        with self._lock:  # a job claimed meanwhile is registered before we look it up
            job = self.store.transition(job_id, ["queued", "running"], "cancelled")
            active = self._active.get(job_id)
        if active is not None:
            active.cancel.set()
        return job

    def delete(self, job_id: str) -> bool:
        """Cancel a job if needed, forget it, and remove its folder.

        On a full disk the store cannot write even a deletion: the folder of a job this
        process is not running is removed first (freeing its space), then the record.
        """
        try:
            self.cancel(job_id)
            gone = self.store.delete(job_id)
        except Exception as exc:
            with self._lock:
                running = job_id in self._active
            if not is_store_error(exc) or running or self.store.get(job_id) is None:
                raise
            shutil.rmtree(self.job_dir(job_id), ignore_errors=True)
            self.cancel(job_id)
            gone = self.store.delete(job_id)
        with self._lock:
            running = job_id in self._active
        if not running:
            shutil.rmtree(self.job_dir(job_id), ignore_errors=True)
        return gone

    def job_dir(self, job_id: str) -> Path:
        """The folder of a job's artifacts and checkpoints."""
        return self.settings.jobs_dir / job_id

    def running_ids(self) -> list[str]:
        """Ids of the jobs this process is running (never waits for the runner's lock)."""
        return list(self._running)

    def training_figures(self) -> dict[str, dict[str, Any]]:
        """Per running job, the figures of its last iteration: ``iteration``, ``cost``,
        ``evaluations``, ``iteration_seconds`` and ``samples_per_second`` (for /metrics)."""
        with self._lock:
            return {job_id: dict(a.last) for job_id, a in self._active.items() if a.last}

    # -- one job ----------------------------------------------------------------------------

    def _train_function(self) -> TrainFn:
        if self._train_fn is None:
            from worker.train import train

            self._train_fn = train
        return self._train_fn

    def _record_figures(self, active: _Active, entry: dict[str, Any]) -> None:
        prev = active.last
        seconds, evals = _num(entry, "seconds"), _num(entry, "evaluations")
        figures: dict[str, Any] = {
            "iteration": _num(entry, "iteration"),
            "cost": _num(entry, "cost"),
            "evaluations": evals,
            "seconds": seconds,
            "samples": _num(entry, "samples"),
        }
        if prev and seconds is not None and prev.get("seconds") is not None:
            dt = seconds - prev["seconds"]
            if dt > 0:
                figures["iteration_seconds"] = dt
                samples = _num(entry, "samples")
                if samples is not None and prev.get("samples") is not None:  # minibatches
                    figures["samples_per_second"] = (samples - prev["samples"]) / dt
                elif evals is not None and prev.get("evaluations") is not None and active.rows:
                    figures["samples_per_second"] = (evals - prev["evaluations"]) * active.rows / dt
        active.last = figures

    def _on_iteration(self, active: _Active, spec: TrainSpec, entry: dict[str, Any]) -> None:
        self._record_figures(active, entry)
        it = int(_num(entry, "iteration") or 0)
        label, before = stage_of(entry, spec, active.steps_rows)
        stage_max = spec.stage_iterations(active.steps_rows, finetune=label == "fine-tune")
        total = max(spec.total_iterations(active.steps_rows), 1)
        if self._pending:  # the store could not write a moment ago: try again first
            self._flush_pending()
        done = min(before + it, total)
        if active.first_done is None:
            active.first_done, active.t0 = done, time.monotonic()
        eta = None
        ran = done - active.first_done
        if ran > 0:
            rate = (time.monotonic() - active.t0) / ran
            eta = rate * (total - done)
        try:
            still_running = self.store.update_progress(
                active.job.id,
                iteration=it,
                max_iter=stage_max,
                cost=_num(entry, "cost"),
                grad_norm=_num(entry, "grad_norm"),
                stage=label,
                progress=done / total,
                eta_seconds=eta,
            )
        except Exception as exc:
            if not is_store_error(exc):
                raise
            # the checkpoint, not the status row, is what a resume continues: keep training
            log.warning("job %s: cannot record iteration %d now: %s", active.job.id, it, exc)
            return
        if not still_running:  # cancelled or deleted by someone we did not hear from
            active.cancel.set()

    def _run(self, active: _Active) -> None:
        try:
            self._run_job(active)
        finally:  # whatever happened, the slot is free and the dispatcher is woken
            with self._lock:
                self._active.pop(active.job.id, None)
                self._running = tuple(self._active)
            with contextlib.suppress(Exception):
                if self.store.get(active.job.id) is None:  # deleted while it ran
                    shutil.rmtree(self.job_dir(active.job.id), ignore_errors=True)
            self.notify()

    def _roots(self) -> tuple[Path, Path]:
        return (self.settings.data_root, self.settings.state_dir)

    def _run_job(self, active: _Active) -> None:
        job = active.job
        out_dir = self.job_dir(job.id)
        recorded = False
        try:
            spec = TrainSpec(**job.spec)
            path, info = datasets.get_dataset(self.settings.data_root, spec.dataset)
            validation = None
            if spec.validation_dataset is not None:
                root = self.settings.data_root
                validation, _ = datasets.get_dataset(root, spec.validation_dataset)
            active.rows = int(info.shape[0])
            active.steps_rows = schedule.training_rows(spec, info) if spec.is_stochastic else None
            out_dir.mkdir(parents=True, exist_ok=True)
            resume = job.attempts > 1  # a checkpoint may exist: continue its trajectory

            def should_stop() -> bool:
                return active.cancel.is_set() or self._shutdown.is_set()

            result = self._train_function()(
                spec,
                out_dir,
                client=self.client,
                dataset_path=str(path),
                **({"validation_path": str(validation)} if validation is not None else {}),
                on_iteration=lambda entry: self._on_iteration(active, spec, entry),
                should_stop=should_stop,
                resume=resume,
                **({"execution": self.settings.plan} if self.settings.plan != "auto" else {}),
            )
            status = getattr(result, "status", "succeeded")
            iterations = getattr(result, "iterations", None)
            if not spec.is_deep and isinstance(iterations, int):
                # the last checkpoint's figures: a cancelled job's optimizer may have done a few
                # iterations after the cancel reached the store (and stopped recording them)
                with contextlib.suppress(Exception):  # figures only: a full disk loses them
                    self.store.update_progress(
                        job.id,
                        statuses=("running", "cancelled"),
                        iteration=iterations,
                        cost=getattr(result, "final_cost", None),
                    )
            run = job.attempts
            recorded = True  # from here on an outcome is recorded (or kept for later)
            if status == "succeeded":
                self._record(job.id, ["running"], "succeeded", run, progress=1.0)
            elif active.cancel.is_set():
                self._record(job.id, ["running"], "cancelled", run)
            elif self._shutdown.is_set():
                self._record(job.id, ["running"], "queued", run, crashes=0)
            else:
                error = f"training ended with status {status!r}"
                self._record(job.id, ["running"], "failed", run, error=error)
        except Exception as exc:  # noqa: BLE001 - recorded on the job
            recorded = True
            if self._shutdown.is_set() and not active.cancel.is_set():
                log.warning("job %s interrupted by shutdown: %s", job.id, exc)
                self._record(job.id, ["running"], "queued", job.attempts, crashes=0)
            else:
                log.exception("job %s failed", job.id)
                error = job_failure(exc, self._roots())
                self._record(job.id, ["running"], "failed", job.attempts, error=error)
        finally:
            # never leave a job running with nobody on it (but never overwrite an outcome
            # kept for later: it lands when the store can write)
            if not recorded and not self._shutdown.is_set():
                error = "the runner ended without a result"
                self._record(job.id, ["running"], "failed", job.attempts, error=error)
