"""``/jobs``: submit, list, show, cancel, resume and delete training jobs."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Header, HTTPException, Query, Response
from pydantic import ValidationError

from service import jobs
from service.deps import (
    API_RESPONSES,
    R404,
    R409,
    R413,
    R422,
    JobId,
    MetricsDep,
    RunnerDep,
    SettingsDep,
    StoreDep,
    job_or_404,
    refusals,
    require_token,
)
from service.runner import Runner
from service.schemas import (
    JobCreated,
    JobLinks,
    JobMetrics,
    JobOut,
    JobPage,
    JobStatus,
    ResumeRequest,
)
from service.store import Job
from worker.evaluate import read_metrics
from worker.spec import TrainSpec

router = APIRouter(tags=["jobs"], dependencies=[Depends(require_token)], responses=API_RESPONSES)


def links(job_id: str) -> JobLinks:
    """URLs of a job's resources."""
    base = f"/jobs/{job_id}"
    return JobLinks(
        self=base,
        cancel=f"{base}/cancel",
        history=f"{base}/history",
        filters=f"{base}/filters.png",
        cost=f"{base}/cost.png",
        model=f"{base}/model.npz",
        encode=f"{base}/encode",
        page=f"/ui/jobs/{job_id}",
        metrics=f"{base}/metrics.json",
        density=f"{base}/density.png",
    )


def job_metrics(job_id: str, runner: Runner) -> JobMetrics | None:
    """The job's metrics.json, or None before it is written (or if it is not metrics)."""
    data = read_metrics(runner.job_dir(job_id))
    if data is None:
        return None
    try:
        return JobMetrics.model_validate(data)
    except ValidationError:
        return None


def job_out(job: Job, runner: Runner) -> JobOut:
    """The public view of a job record."""
    return JobOut(
        id=job.id,
        status=job.status,
        spec=job.spec,
        stage=job.stage,
        iteration=job.iteration,
        max_iter=job.max_iter,
        cost=job.cost,
        grad_norm=job.grad_norm,
        progress=min(max(job.progress, 0.0), 1.0),
        eta_seconds=job.eta_seconds,
        created_at=job.created_at,
        started_at=job.started_at,
        finished_at=job.finished_at,
        updated_at=job.updated_at,
        attempts=job.attempts,
        error=job.error,
        dashboard_url=runner.dashboard_url,
        metrics=job_metrics(job.id, runner),
        links=links(job.id),
    )


@router.post(
    "/jobs",
    response_model=JobCreated,
    status_code=202,
    responses={**R409, **R413, **R422},
)
def submit(
    spec: TrainSpec,
    response: Response,
    settings: SettingsDep,
    store: StoreDep,
    runner: RunnerDep,
    metrics: MetricsDep,
    idempotency_key: Annotated[str | None, Header(alias="Idempotency-Key", max_length=200)] = None,
) -> JobCreated:
    """Queue a training job; a retry with the same `Idempotency-Key` returns the same job."""
    with refusals():
        job = jobs.submit(
            spec,
            idempotency_key,
            store=store,
            runner=runner,
            metrics=metrics,
            data_root=settings.data_root,
        )
    response.headers["Location"] = f"/jobs/{job.id}"
    return JobCreated(id=job.id, status=job.status, links=links(job.id))


@router.get("/jobs", response_model=JobPage)
def list_jobs(
    store: StoreDep,
    runner: RunnerDep,
    status: Annotated[list[JobStatus] | None, Query(description="Only these")] = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
    offset: Annotated[int, Query(ge=0, le=1_000_000_000)] = 0,
) -> JobPage:
    """Jobs, newest first."""
    page, total = store.list(status, limit, offset)
    return JobPage(
        items=[job_out(j, runner) for j in page], total=total, limit=limit, offset=offset
    )


@router.get("/jobs/{job_id}", response_model=JobOut, responses={**R404})
def get_job(job_id: JobId, store: StoreDep, runner: RunnerDep) -> JobOut:
    """A job's status, progress, ETA and error."""
    return job_out(job_or_404(store, job_id), runner)


@router.post("/jobs/{job_id}/cancel", response_model=JobOut, responses={**R404, **R409})
def cancel(job_id: JobId, store: StoreDep, runner: RunnerDep) -> JobOut:
    """Cancel a queued or running job (a running one stops within one evaluation).

    Cancelling a cancelled job again answers 200 (a retried request); a finished job 409.
    """
    with refusals():
        return job_out(jobs.cancel(job_id, store=store, runner=runner), runner)


@router.post(
    "/jobs/{job_id}/resume",
    response_model=JobOut,
    status_code=202,
    responses={**R404, **R409, **R422},
)
def resume(
    job_id: JobId,
    store: StoreDep,
    runner: RunnerDep,
    settings: SettingsDep,
    body: ResumeRequest | None = None,
) -> JobOut:
    """Continue a cancelled, failed or finished job from its last checkpoint, on the
    trajectory of an uninterrupted run; `max_iter` extends a one-layer job."""
    max_iter = body.max_iter if body is not None else None
    with refusals():
        job = jobs.resume(
            job_id, max_iter, store=store, runner=runner, data_root=settings.data_root
        )
        return job_out(job, runner)


@router.post(
    "/jobs/{job_id}/retry", response_model=JobOut, status_code=202, responses={**R404, **R409}
)
def retry(job_id: JobId, store: StoreDep, runner: RunnerDep, settings: SettingsDep) -> JobOut:
    """Run a failed job again from its last checkpoint (after a full disk, a lost cluster or
    the crash budget), with a fresh crash budget; 409 if the job has not failed."""
    with refusals():
        job = jobs.retry(job_id, store=store, runner=runner, data_root=settings.data_root)
        return job_out(job, runner)


@router.delete("/jobs/{job_id}", status_code=204, responses={**R404})
def delete_job(job_id: JobId, runner: RunnerDep) -> Response:
    """Cancel a job if needed and delete it with its artifacts."""
    if not runner.delete(job_id):
        raise HTTPException(404, f"job: no job {job_id!r}")
    return Response(status_code=204)
