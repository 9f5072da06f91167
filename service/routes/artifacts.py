"""A job's artifacts: ``/jobs/{job_id}/history``, ``filters.png``, ``cost.png``,
``model.npz``, ``metrics.json``, ``density.png`` and ``encode``.

Two routers: :data:`router` (``encode``, JSON API: the token in the Authorization header) and
:data:`downloads` (what the web page links to, in ``img src`` and download links: these also
take ``?token=``). File names are the job folder's (:mod:`worker.layout`).

Files are sent in chunks from the file as it was opened (never read whole into memory; a
picture rewritten meanwhile, as filters.png is every iteration, is sent as it was). Encodes
run in threads of their own (:func:`service.deps.in_encode_threads`).
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, BinaryIO

import anyio
from fastapi import APIRouter, Depends, HTTPException, Request, Response
from fastapi.responses import FileResponse, StreamingResponse

from service import jobs
from service.deps import (
    API_RESPONSES,
    ASSET_RESPONSES,
    R404,
    R409,
    R413,
    R422,
    R503,
    JobId,
    RunnerDep,
    SettingsDep,
    StoreDep,
    in_encode_threads,
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
_CHUNK = 64 * 1024
_PNG = {200: {"content": {"image/png": {}}, "description": "PNG picture"}, **R404}


def _written(path: Path | None, name: str) -> Path:
    """``path``, or a 404 naming the file ``name`` when it is not written yet (None)."""
    if path is None:
        raise HTTPException(404, f"{name}: not written yet")
    return path


def _open(path: Path | None) -> BinaryIO | None:
    """The file ``path`` opened for reading, or None when it is not (or no longer) there."""
    if path is None:
        return None
    try:
        return path.open("rb")
    except FileNotFoundError:  # removed since it was found (a job reset)
        return None


async def _chunks(fh: BinaryIO, size: int) -> AsyncIterator[bytes]:
    """The first ``size`` bytes of ``fh``, in chunks read in worker threads; closes it."""
    async with anyio.wrap_file(fh) as f:
        while size > 0:
            chunk = await f.read(min(_CHUNK, size))
            if not chunk:
                return
            size -= len(chunk)
            yield chunk


def _opened(path: Path | None, name: str) -> BinaryIO:
    """The file ``path`` opened, or a 404 naming the file ``name`` when it is not written
    yet (``path`` None, or removed meanwhile)."""
    fh = _open(path)
    if fh is None:
        raise HTTPException(404, f"{name}: not written yet")
    return fh


class _FileStream(StreamingResponse):
    """A streamed opened file that is closed when the response ends, however it ends (a
    client that disconnects mid-download leaves the body's generator unfinished)."""

    def __init__(self, fh: BinaryIO, size: int, **kw: Any) -> None:
        super().__init__(_chunks(fh, size), **kw)
        self._fh = fh

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._fh.close()


def _send(
    fh: BinaryIO, media_type: str, headers: dict[str, str] | None = None
) -> StreamingResponse:
    """The opened file ``fh`` streamed, its size (when opened) as Content-Length."""
    size = os.fstat(fh.fileno()).st_size
    return _FileStream(
        fh,
        size,
        media_type=media_type,
        headers={**(headers or {}), "Content-Length": str(size)},
    )


@router.post(
    "/jobs/{job_id}/encode",
    response_model=EncodeResponse,
    responses={**R404, **R409, **R413, **R422, **R503},
)
async def encode(
    request: Request,
    job_id: JobId,
    body: EncodeRequest,
    settings: SettingsDep,
    store: StoreDep,
    runner: RunnerDep,
) -> Response:
    """Hidden features (and reconstructions) of posted rows, with the job's finished model.

    At most `max_concurrent_encodes` requests compute at once; beyond `max_waiting_encodes`
    waiting, 503 with `Retry-After`."""

    def compute() -> bytes:
        job = job_or_404(store, job_id)
        with refusals():
            hidden, recon = jobs.encode(
                job,
                runner.job_dir(job_id) / layout.MODEL,
                body.X,
                max_rows=settings.max_encode_rows,
                max_values=settings.max_encode_values,
            )
        # (lists of floats already: not validated again; serialised here, a large answer
        # takes CPU too)
        out = EncodeResponse.model_construct(
            hidden=hidden, reconstruction=recon if body.reconstruct else None
        )
        return out.model_dump_json().encode()

    return Response(await in_encode_threads(request, compute), media_type="application/json")


@downloads.get("/jobs/{job_id}/history", responses={**R404})
def history(job_id: JobId, store: StoreDep, runner: RunnerDep) -> Response:
    """The training history, as history.json (an empty list before the first iteration)."""
    job_or_404(store, job_id)
    fh = _open(layout.artifact(runner.job_dir(job_id), layout.HISTORY))
    if fh is None:
        return Response(b"[]", media_type="application/json")
    return _send(fh, "application/json")


@downloads.get("/jobs/{job_id}/filters.png", response_class=Response, responses=_PNG)
def filters_png(job_id: JobId, store: StoreDep, runner: RunnerDep) -> Response:
    """The current filters (first-layer weights) as a grid, refreshed during training."""
    job_or_404(store, job_id)
    path = layout.filters_picture(runner.job_dir(job_id))
    return _send(_opened(path, layout.FILTERS), "image/png", _NO_STORE)


@downloads.get("/jobs/{job_id}/cost.png", response_class=Response, responses=_PNG)
def cost_png(job_id: JobId, store: StoreDep, runner: RunnerDep) -> Response:
    """The cost curve."""
    job_or_404(store, job_id)
    path = layout.artifact(runner.job_dir(job_id), layout.COST)
    return _send(_opened(path, layout.COST), "image/png", _NO_STORE)


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
    path = layout.artifact(runner.job_dir(job_id), layout.METRICS)
    return _send(_opened(path, layout.METRICS), "application/json", _NO_STORE)


@downloads.get("/jobs/{job_id}/density.png", response_class=Response, responses=_PNG)
def density_png(job_id: JobId, store: StoreDep, runner: RunnerDep) -> Response:
    """The histogram of the final model's latents' log10 firing frequencies (dead latents
    in a bar of their own)."""
    job_or_404(store, job_id)
    path = layout.artifact(runner.job_dir(job_id), layout.DENSITY)
    return _send(_opened(path, layout.DENSITY), "image/png", _NO_STORE)


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
