"""A job's artifacts: ``/jobs/{job_id}/history``, ``filters.png``, ``cost.png``,
``model.npz``, ``metrics.json``, ``density.png`` and ``encode``.

Two routers: :data:`router` (``encode``, JSON API: the token in the Authorization header) and
:data:`downloads` (what the web page links to, in ``img src`` and download links: these also
take ``?token=``). File names are the job folder's (:mod:`worker.layout`).
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, Depends, HTTPException, Response
from fastapi.responses import FileResponse

from service import jobs
from service.deps import (
    API_RESPONSES,
    ASSET_RESPONSES,
    R404,
    R409,
    R413,
    R422,
    JobId,
    RunnerDep,
    SettingsDep,
    StoreDep,
    job_or_404,
    refusals,
    require_token,
    require_token_or_query,
)
from service.schemas import EncodeRequest, EncodeResponse
from worker import layout

router = APIRouter(
    tags=["artifacts"], dependencies=[Depends(require_token)], responses=API_RESPONSES
)
downloads = APIRouter(
    tags=["artifacts"], dependencies=[Depends(require_token_or_query)], responses=ASSET_RESPONSES
)
_NO_STORE = {"Cache-Control": "no-store"}
_PNG = {200: {"content": {"image/png": {}}, "description": "PNG picture"}, **R404}


def _written(path: Path | None, name: str) -> Path:
    """``path``, or a 404 naming the file ``name`` when it is not written yet (None)."""
    if path is None:
        raise HTTPException(404, f"{name}: not written yet")
    return path


@router.post(
    "/jobs/{job_id}/encode",
    response_model=EncodeResponse,
    responses={**R404, **R409, **R413, **R422},
)
def encode(
    job_id: JobId,
    body: EncodeRequest,
    settings: SettingsDep,
    store: StoreDep,
    runner: RunnerDep,
) -> EncodeResponse:
    """Hidden features (and reconstructions) of posted rows, with the job's finished model."""
    job = job_or_404(store, job_id)
    with refusals():
        hidden, recon = jobs.encode(
            job,
            runner.job_dir(job_id) / layout.MODEL,
            body.X,
            max_rows=settings.max_encode_rows,
            max_values=settings.max_encode_values,
        )
    return EncodeResponse(hidden=hidden, reconstruction=recon if body.reconstruct else None)


@downloads.get("/jobs/{job_id}/history", responses={**R404})
def history(job_id: JobId, store: StoreDep, runner: RunnerDep) -> Response:
    """The training history, as history.json (an empty list before the first iteration)."""
    job_or_404(store, job_id)
    path = layout.artifact(runner.job_dir(job_id), layout.HISTORY)
    body = path.read_bytes() if path is not None else b"[]"
    return Response(body, media_type="application/json")


@downloads.get("/jobs/{job_id}/filters.png", response_class=Response, responses=_PNG)
def filters_png(job_id: JobId, store: StoreDep, runner: RunnerDep) -> Response:
    """The current filters (first-layer weights) as a grid, refreshed during training."""
    job_or_404(store, job_id)
    path = _written(layout.filters_picture(runner.job_dir(job_id)), layout.FILTERS)
    return Response(path.read_bytes(), media_type="image/png", headers=_NO_STORE)


@downloads.get("/jobs/{job_id}/cost.png", response_class=Response, responses=_PNG)
def cost_png(job_id: JobId, store: StoreDep, runner: RunnerDep) -> Response:
    """The cost curve."""
    job_or_404(store, job_id)
    path = _written(layout.artifact(runner.job_dir(job_id), layout.COST), layout.COST)
    return Response(path.read_bytes(), media_type="image/png", headers=_NO_STORE)


@downloads.get(
    "/jobs/{job_id}/metrics.json",
    responses={
        200: {"content": {"application/json": {}}, "description": "The metrics"},
        **R404,
    },
)
def metrics_json(job_id: JobId, store: StoreDep, runner: RunnerDep) -> Response:
    """The final model's metrics (reconstruction error, explained variance, L0, dead
    latents, ...) on the held-out chunks or all of them, written when the job's model is
    evaluated."""
    job_or_404(store, job_id)
    path = _written(layout.artifact(runner.job_dir(job_id), layout.METRICS), layout.METRICS)
    return Response(path.read_bytes(), media_type="application/json", headers=_NO_STORE)


@downloads.get("/jobs/{job_id}/density.png", response_class=Response, responses=_PNG)
def density_png(job_id: JobId, store: StoreDep, runner: RunnerDep) -> Response:
    """The histogram of the final model's latents' log10 firing frequencies (dead latents
    in a bar of their own)."""
    job_or_404(store, job_id)
    path = _written(layout.artifact(runner.job_dir(job_id), layout.DENSITY), layout.DENSITY)
    return Response(path.read_bytes(), media_type="image/png", headers=_NO_STORE)


@downloads.get(
    "/jobs/{job_id}/model.npz",
    response_class=FileResponse,
    responses={
        200: {"content": {"application/octet-stream": {}}, "description": "The model"},
        **R404,
    },
)
def model_npz(job_id: JobId, store: StoreDep, runner: RunnerDep) -> FileResponse:
    """The trained model, as `sae train` writes it. A cancelled or failed job's model is
    its last checkpoint, marked `X-SAE-Partial: true` (resume the job to finish it)."""
    job = job_or_404(store, job_id)
    if job.status not in ("succeeded", "cancelled", "failed"):
        raise HTTPException(404, f"{layout.MODEL}: job {job_id} is {job.status}, not finished")
    path = _written(layout.artifact(runner.job_dir(job_id), layout.MODEL), layout.MODEL)
    partial = {"X-SAE-Partial": "true"} if job.status != "succeeded" else {}
    return FileResponse(
        path, media_type="application/octet-stream", filename=layout.MODEL, headers=partial
    )
