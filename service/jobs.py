"""What the job routes do, without HTTP: submit, cancel, resume, encode with a finished model.

Each function refuses with a small exception that the routes answer as an HTTP error
(:func:`service.deps.refusals`): :class:`NotFound` 404, :class:`Conflict` 409, :class:`Invalid`
422 naming the field. Messages start with the field they are about (``"status: ..."``).
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import TYPE_CHECKING

from service import encoding, validation
from service.store import TERMINAL, IdempotencyConflict, Job, JobStore
from worker.spec import TrainSpec

if TYPE_CHECKING:
    from service.metrics import Metrics
    from service.runner import Runner


class NotFound(LookupError):
    """There is no such job."""


class Conflict(RuntimeError):
    """The job's state (or an idempotency key used before) forbids the request."""


class Invalid(ValueError):
    """A field of the request is invalid.

    Parameters
    ----------
    field : str
        The request body's field.
    msg : str
        What is wrong (also ``str(exc)``).
    """

    def __init__(self, field: str, msg: str):
        super().__init__(msg)
        self.field = field


def _get(store: JobStore, job_id: str) -> Job:
    job = store.get(job_id)
    if job is None:
        raise NotFound(f"job: no job {job_id!r}")
    return job


def submit(
    spec: TrainSpec,
    idempotency_key: str | None,
    *,
    store: JobStore,
    runner: Runner,
    metrics: Metrics,
    data_root: str | Path,
) -> Job:
    """Queue a training job, or find the one an earlier request with the same key queued.

    Parameters
    ----------
    spec : TrainSpec
        The job.
    idempotency_key : str or None
        A retry with the same key and spec returns the same job, even if the dataset changed
        since (it is not checked again).
    store, runner, metrics
        The app's job store, runner (woken for a new job) and metrics (counting it).
    data_root : path
        Where the datasets are (the spec is checked against its dataset).

    Returns
    -------
    Job
        The queued job, or the earlier one.

    Raises
    ------
    Conflict
        If the key was used before for another spec.
    Invalid
        If the spec does not fit its dataset (the first problem found).
    """
    spec_json = spec.model_dump(mode="json")
    if idempotency_key is not None:
        try:
            prior = store.find_idempotent(idempotency_key, spec_json)
        except IdempotencyConflict as exc:
            raise Conflict(str(exc)) from None
        if prior is not None:
            return prior
    from service.datasets import guard

    # under the datasets' guard: a deletion of them comes wholly before, or sees the job
    with guard(data_root, spec.dataset, spec.validation_dataset):
        for field, msg in validation.check_spec(spec, data_root):
            raise Invalid(field, msg)
        try:
            first = validation.first_max_iter(spec, data_root)
            job, created = store.create(spec_json, first, idempotency_key)
        except IdempotencyConflict as exc:
            raise Conflict(str(exc)) from None
    if created:
        runner.notify()
        metrics.submitted.inc()
    return job


def cancel(job_id: str, *, store: JobStore, runner: Runner) -> Job:
    """Cancel a queued or running job; cancelling a cancelled job again is no error.

    Raises
    ------
    NotFound
        If there is no such job.
    Conflict
        If the job has finished (succeeded or failed) already.
    """
    job = runner.cancel(job_id)
    if job is not None:
        return job
    job = _get(store, job_id)
    if job.status != "cancelled":
        raise Conflict(f"status: job {job_id} is {job.status} already")
    return job


def _requeue(
    job: Job,
    spec: dict | None,
    max_iter: int | None,
    expected: tuple[str, ...],
    *,
    store: JobStore,
    data_root: str | Path | None,
) -> Job:
    """Queue a finished job again if its datasets are still there; under their guard, so a
    deletion of them comes wholly before (409) or sees the queued job (and refuses)."""
    from service.datasets import BadName, NotFound, get_dataset, guard

    names = (job.spec.get("dataset"), job.spec.get("validation_dataset"))
    with guard(data_root, *names) if data_root is not None else contextlib.nullcontext():
        if data_root is not None:
            for field, name in zip(("dataset", "validation_dataset"), names, strict=True):
                if name is None:
                    continue
                try:
                    get_dataset(data_root, name)
                except (BadName, NotFound):
                    raise Conflict(f"{field}: {name!r} no longer exists") from None
        queued = store.resume(job.id, spec, max_iter, expected=expected)
    if queued is None:  # its status changed meanwhile
        raise Conflict(f"status: job {job.id} is {_get(store, job.id).status}")
    return queued


def resume(
    job_id: str,
    max_iter: int | None,
    *,
    store: JobStore,
    runner: Runner,
    data_root: str | Path | None = None,
) -> Job:
    """Queue a cancelled, failed or finished job again, to continue from its last checkpoint.

    Parameters
    ----------
    job_id : str
        The job.
    max_iter : int or None
        A new iteration limit (one-layer jobs only); None keeps the spec's.
    store, runner
        The app's job store and runner (woken).

    Returns
    -------
    Job
        The job, queued.

    Raises
    ------
    NotFound
        If there is no such job.
    Conflict
        If the job is active, has nothing left to do, or changed status meanwhile.
    Invalid
        If ``max_iter`` cannot be honoured.
    """
    job = _get(store, job_id)
    problem = validation.resume_problem(job, max_iter)
    if problem is not None:  # its statuses are 409 and 422
        field, status, msg = problem
        if status == 422:
            raise Invalid(field, msg)
        raise Conflict(f"{field}: {msg}")
    spec = {**job.spec, "max_iter": max_iter} if max_iter is not None else None
    queued = _requeue(job, spec, max_iter, TERMINAL, store=store, data_root=data_root)
    runner.notify()
    return queued


def retry(
    job_id: str, *, store: JobStore, runner: Runner, data_root: str | Path | None = None
) -> Job:
    """Run a failed job again, from its last checkpoint, with a fresh crash budget.

    Raises
    ------
    NotFound
        If there is no such job.
    Conflict
        If the job has not failed (``resume`` continues a cancelled or finished one).
    """
    job = _get(store, job_id)
    if job.status != "failed":
        hint = (
            "; sae resume (POST /jobs/ID/resume) continues a cancelled or finished job"
            if job.status in ("cancelled", "succeeded")
            else ""
        )
        raise Conflict(f"status: job {job_id} is {job.status}, not failed{hint}")
    queued = _requeue(job, None, None, ("failed",), store=store, data_root=data_root)
    runner.notify()
    return queued


def encode(
    job: Job,
    model_path: Path,
    X: list[list[float]],
    *,
    max_rows: int,
    max_values: int | None,
) -> tuple[list[list[float]], list[list[float]]]:
    """Hidden features and reconstructions of rows ``X`` with a succeeded job's model.

    Parameters
    ----------
    job : Job
        The job.
    model_path : Path
        Its model.npz.
    X : rows of n_visible values
    max_rows, max_values : int
        The most rows, and output values, one request may ask for.

    Returns
    -------
    hidden, reconstruction
        As :func:`service.encoding.encode`.

    Raises
    ------
    Conflict
        If the job has not succeeded.
    Invalid
        If ``X`` has too many rows or values, or rows of the wrong size (field ``X``).
    """
    if job.status != "succeeded":
        raise Conflict(f"status: job {job.id} is {job.status}, not succeeded")
    if len(X) > max_rows:
        raise Invalid("X", f"X: at most {max_rows} rows per request")
    try:
        return encoding.encode(model_path, X, max_values)
    except ValueError as exc:
        raise Invalid("X", str(exc)) from None
