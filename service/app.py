"""The FastAPI application: datasets, jobs, artifacts, web page, health and metrics.

Routes are thin: each parses its input, calls one function of the store, the runner, the
dataset module or the job checks, and returns. The Dask client and the job runner are made in
the lifespan, never at import time.
"""

from __future__ import annotations

import logging
import math
import re
import secrets
import shutil
import tempfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import urlsplit

from fastapi import (
    APIRouter,
    Depends,
    FastAPI,
    File,
    Form,
    Header,
    HTTPException,
    Query,
    Request,
    Response,
    UploadFile,
)
from fastapi import Path as PathParam
from fastapi.concurrency import run_in_threadpool
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from fastapi.staticfiles import StaticFiles
from fastapi_offline import FastAPIOffline

from service import datasets, encoding, metrics, validation
from service.errors import clean_errors
from service.runner import Runner
from service.schemas import (
    Dataset,
    EncodeRequest,
    EncodeResponse,
    Health,
    JobCreated,
    JobLinks,
    JobOut,
    JobPage,
    JobStatus,
    Message,
    PhotographPatches,
    ResumeRequest,
    ValidationFailed,
)
from service.settings import Settings
from service.store import IdempotencyConflict, Job, JobStore
from worker.spec import TrainSpec

log = logging.getLogger("sae.service")
STATIC = Path(__file__).parent / "static"
#: BokehJS as the installed bokeh package ships it (the job page's plots; no CDN).
BOKEHJS = Path(__import__("bokeh").__file__).parent / "server" / "static"

R401 = {401: {"model": Message, "description": "Missing or wrong bearer token"}}
R404 = {404: {"model": Message, "description": "No such job or dataset"}}
R409 = {409: {"model": Message, "description": "Conflict with the current state"}}
R413 = {413: {"description": "Request body too large"}}
R422 = {422: {"model": ValidationFailed, "description": "Invalid input; loc names the field"}}
R400 = {400: {"model": Message, "description": "Malformed request"}}

JobId = Annotated[str, PathParam(min_length=1, max_length=64, pattern=r"^[0-9a-f]+$")]


# ------------------------------------------------------------------------- dependencies


def get_settings(request: Request) -> Settings:
    """The app's settings."""
    return request.app.state.settings


def get_store(request: Request) -> JobStore:
    """The job store."""
    return request.app.state.store


def get_runner(request: Request) -> Runner:
    """The job runner."""
    return request.app.state.runner


SettingsDep = Annotated[Settings, Depends(get_settings)]
StoreDep = Annotated[JobStore, Depends(get_store)]
RunnerDep = Annotated[Runner, Depends(get_runner)]
_bearer = HTTPBearer(auto_error=False, description="The service's token, if it has one")


def _token_ok(given: str | None, settings: Settings) -> bool:
    return bool(given) and secrets.compare_digest(given.encode(), settings.token.encode())


def _refuse() -> HTTPException:
    return HTTPException(
        401,
        "token: missing or wrong bearer token",
        headers={"WWW-Authenticate": 'Bearer realm="sae"'},
    )


def require_token(
    settings: SettingsDep,
    creds: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> None:
    """Refuse the request (401) unless it carries the service's bearer token (header only)."""
    if settings.token and not _token_ok(creds.credentials if creds else None, settings):
        raise _refuse()


def require_token_or_query(
    request: Request,
    settings: SettingsDep,
    creds: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> None:
    """As :func:`require_token`, but also accept ``?token=``.

    Only for GET routes a browser loads without headers (pictures, downloads linked from the
    web page); the JSON API takes the token in the Authorization header only, so it does not
    end up in addresses, histories and logs.
    """
    if not settings.token:
        return
    given = creds.credentials if creds else request.query_params.get("token")
    if not _token_ok(given, settings):
        raise _refuse()


class RedactTokens(logging.Filter):
    """Replace the value of ``token=`` in log records (uvicorn's access log) with ``***``."""

    _PATTERN = re.compile(r"(token=)[^&\s\"']*", re.IGNORECASE)

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.msg, str):
            record.msg = self._PATTERN.sub(r"\1***", record.msg)
        if isinstance(record.args, tuple):
            record.args = tuple(
                self._PATTERN.sub(r"\1***", a) if isinstance(a, str) else a for a in record.args
            )
        return True


class QuietPolling(logging.Filter):
    """Drop the access-log lines of what the web page and ``sae wait`` poll every second or
    two (successful GETs of the job list, a job, its history and pictures, the dataset list,
    health): a log of what changed stays readable. Errors and every other request are kept."""

    _POLLED = re.compile(
        r"^/(health|datasets|jobs|jobs/[^/?]+(/(history|filters\.png|cost\.png))?)/?(\?.*)?$"
    )

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        if not (isinstance(args, tuple) and len(args) == 5):
            return True
        _, method, path, _, status = args
        try:
            ok = int(status) < 400
        except (TypeError, ValueError):
            return True
        return not (method in ("GET", "HEAD") and ok and self._POLLED.match(str(path)))


def redact_access_log() -> None:
    """Install :class:`RedactTokens` and :class:`QuietPolling` on ``uvicorn.access`` (once)."""
    logger = logging.getLogger("uvicorn.access")
    for cls in (QuietPolling, RedactTokens):
        if not any(isinstance(f, cls) for f in logger.filters):
            logger.addFilter(cls())


def json_safe(value: Any) -> Any:
    """``value`` with every non-finite float replaced by its text (``"inf"``, ``"nan"``).

    Standard JSON has no NaN or infinity, so a validation error that echoes such an input
    back could not be serialised.
    """
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    return value


def field_error(field: str, msg: str) -> RequestValidationError:
    """A 422 naming one field of the request body."""
    return RequestValidationError([{"loc": ("body", field), "msg": msg, "type": "value_error"}])


# ------------------------------------------------------------------------- presentation


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
    )


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
        links=links(job.id),
    )


def _found(job: Job | None, job_id: str) -> Job:
    if job is None:
        raise HTTPException(404, f"job: no job {job_id!r}")
    return job


def _artifact(runner: Runner, store: JobStore, job_id: str, name: str) -> Path:
    _found(store.get(job_id), job_id)
    path = runner.job_dir(job_id) / name
    if not path.is_file():
        raise HTTPException(404, f"{name}: not written yet")
    return path


# ------------------------------------------------------------------------- app


def create_app(settings: Settings | None = None, train_fn=None) -> FastAPI:
    """Build the application.

    Parameters
    ----------
    settings : Settings, optional
        Default: from ``SAE_*`` environment variables.
    train_fn : callable, optional
        Training function for the runner (default :func:`worker.train.train`).
    """
    settings = settings or Settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        redact_access_log()
        settings.state_dir.mkdir(parents=True, exist_ok=True)
        settings.data_root.mkdir(parents=True, exist_ok=True)
        store = JobStore(settings.db_path)
        runner = Runner(settings, store, train_fn=train_fn)
        app.state.store, app.state.runner = store, runner
        app.state.metrics = metrics.Metrics(store, runner, app.state.registry)
        runner.start()
        try:
            yield
        finally:
            await run_in_threadpool(runner.stop)

    # /docs and /redoc with Swagger UI and ReDoc served from the package, not a CDN: the docs
    # work on a machine without internet access.
    app = FastAPIOffline(
        title="Sparse autoencoder training service",
        version="0.1.0",
        description="Submit training jobs for sparse and deep autoencoders, watch them, and "
        "download their models. Datasets are Zarr stores under the data root.",
        lifespan=lifespan,
        max_body_size=settings.max_body_bytes,
    )
    app.state.settings = settings
    app.state.registry = metrics.new_registry()
    metrics.instrument(app, app.state.registry)

    @app.middleware("http")
    async def count_requests(request: Request, call_next):
        route = metrics.route_template(request)  # before routing rewrites the scope (mounts)
        response = await call_next(request)
        m = getattr(request.app.state, "metrics", None)
        if m is not None:
            m.requests.labels(request.method, route, str(response.status_code)).inc()
        return response

    @app.middleware("http")
    async def refuse_cross_site(request: Request, call_next):
        """Without a token, refuse unsafe requests a browser sends on behalf of another site.

        With a token the API is safe from CSRF already (browsers never add the Authorization
        header by themselves); an open service must check where the request comes from.
        """
        if not settings.token and request.method not in ("GET", "HEAD", "OPTIONS"):
            site = request.headers.get("sec-fetch-site", "").lower()
            origin = request.headers.get("origin")
            host = request.headers.get("host", "").lower()
            foreign = origin is not None and urlsplit(origin).netloc.lower() != host
            if site == "cross-site" or foreign:
                return JSONResponse(
                    {"detail": "origin: cross-site requests are refused"}, status_code=403
                )
        return await call_next(request)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = json_safe(jsonable_encoder(json_safe(clean_errors(exc.errors()))))
        return JSONResponse({"detail": errors}, status_code=422)

    @app.exception_handler(datasets.BadName)
    async def _bad_name(request: Request, exc: datasets.BadName) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=404)

    public = APIRouter()
    api = APIRouter(dependencies=[Depends(require_token)], responses={**R400, **R401, **R413})
    # what the web page links to (img src, download links): these also take ?token=
    assets = APIRouter(dependencies=[Depends(require_token_or_query)], responses={**R401})

    # -- health, metrics, web page --------------------------------------------------------

    @public.get(
        "/health", response_model=Health, response_model_exclude_unset=True, tags=["service"]
    )
    def health(
        settings: SettingsDep,
        runner: RunnerDep,
        creds: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
    ) -> Health:
        """Liveness; with the token (or on an open service) also the scheduler and running jobs.

        Unauthenticated callers of a service with a token learn only that it is up: the
        scheduler address, dashboard and job ids are for its users.
        """
        if settings.token and not _token_ok(creds.credentials if creds else None, settings):
            return Health(status="ok")
        cluster = runner.cluster_summary()
        return Health(
            status="ok",
            scheduler=cluster.get("scheduler", settings.scheduler),
            embedded=cluster.get("embedded", settings.scheduler is None),
            workers=cluster.get("workers"),
            threads=cluster.get("threads"),
            memory_limit_bytes=cluster.get("memory_limit_bytes"),
            dashboard_url=runner.dashboard_url,
            running=runner.running_ids(),
            cluster_error=runner.cluster_error,
        )

    @public.get(
        "/metrics",
        tags=["service"],
        response_class=Response,
        responses={200: {"content": {"text/plain": {}}, "description": "Prometheus metrics"}},
    )
    def get_metrics(request: Request) -> Response:
        """Prometheus metrics: jobs by status, submissions, iterations."""
        body, ctype = request.app.state.metrics.render()
        return Response(body, media_type=ctype)

    @public.get("/", response_class=HTMLResponse, include_in_schema=False)
    def index() -> FileResponse:
        return FileResponse(STATIC / "index.html")

    @public.get("/ui/jobs/{job_id}", response_class=HTMLResponse, include_in_schema=False)
    def job_page(job_id: str) -> FileResponse:
        return FileResponse(STATIC / "job.html")

    # -- datasets -------------------------------------------------------------------------

    @api.get("/datasets", response_model=list[Dataset], tags=["datasets"])
    def list_datasets(settings: SettingsDep) -> list[dict[str, Any]]:
        """Every dataset under the data root."""
        return datasets.list_datasets(settings.data_root)

    @api.post(
        "/datasets",
        response_model=Dataset,
        status_code=201,
        tags=["datasets"],
        responses={**R400, **R409, **R413, **R422},
        max_body_size=settings.max_upload_bytes,
    )
    def upload_dataset(
        settings: SettingsDep,
        name: Annotated[str, Form(min_length=1, max_length=512)],
        file: Annotated[UploadFile, File(description=".npy or IDX file, gzip allowed")],
        sample_shape: Annotated[
            str | None,
            Form(
                max_length=64,
                pattern=r"^[1-9][0-9]*(x[1-9][0-9]*)*$",
                description="Shape of one example as a picture, e.g. 28x28 or 12x12x3",
            ),
        ] = None,
    ) -> dict[str, Any]:
        """Ingest an uploaded `.npy` or IDX file (gzip allowed) as dataset `name`."""
        try:
            datasets.check_name(name)
        except datasets.BadName as exc:
            raise field_error("name", str(exc)) from None
        shape = tuple(int(d) for d in sample_shape.split("x")) if sample_shape else None
        filename = Path(file.filename or "").name[:200] or None
        with tempfile.NamedTemporaryFile(dir=settings.state_dir, suffix=".upload") as tmp:
            file.file.seek(0)
            shutil.copyfileobj(file.file, tmp, 1 << 20)
            tmp.flush()
            try:
                return datasets.ingest_upload(
                    settings.data_root,
                    name,
                    Path(tmp.name),
                    settings.max_dataset_bytes,
                    filename=filename,
                    sample_shape=shape,
                )
            except datasets.Exists as exc:
                raise HTTPException(409, str(exc)) from None
            except datasets.BadName as exc:
                raise field_error("name", str(exc)) from None
            except ValueError as exc:
                field = "sample_shape" if str(exc).startswith("sample_shape") else "file"
                raise field_error(field, str(exc)) from None
            except OSError as exc:
                msg = f"name: cannot create {name!r} ({exc.strerror})"
                raise field_error("name", msg) from None

    @api.post(
        "/datasets/photographs",
        response_model=Dataset,
        status_code=201,
        tags=["datasets"],
        responses={**R409, **R413, **R422},
    )
    def ingest_photographs(settings: SettingsDep, body: PhotographPatches) -> dict[str, Any]:
        """Sample patches of the bundled sample photographs into a new dataset."""
        opts = body.model_dump(exclude={"name"})
        n_features = body.patch_size**2 * (1 if body.gray else 3)
        if body.n_patches * n_features * 8 > settings.max_dataset_bytes:
            raise field_error(
                "n_patches",
                f"n_patches: {body.n_patches} patches of {n_features} values would exceed "
                f"{settings.max_dataset_bytes} bytes",
            )
        try:
            return datasets.ingest_photographs(settings.data_root, body.name, **opts)
        except datasets.Exists as exc:
            raise HTTPException(409, str(exc)) from None
        except datasets.BadName as exc:
            raise field_error("name", str(exc)) from None
        except ValueError as exc:
            raise field_error(str(exc).split(":")[0].strip() or "name", str(exc)) from None
        except OSError as exc:
            msg = f"name: cannot create {body.name!r} ({exc.strerror})"
            raise field_error("name", msg) from None

    @api.get("/datasets/{name:path}", response_model=Dataset, tags=["datasets"], responses={**R404})
    def get_dataset(settings: SettingsDep, name: str) -> dict[str, Any]:
        """One dataset."""
        try:
            _, info = datasets.get_dataset(settings.data_root, name)
        except datasets.NotFound as exc:
            raise HTTPException(404, str(exc)) from None
        return datasets.describe(name, info)

    @api.delete(
        "/datasets/{name:path}",
        status_code=204,
        tags=["datasets"],
        responses={**R404, **R409},
    )
    def delete_dataset(settings: SettingsDep, store: StoreDep, name: str) -> Response:
        """Delete a dataset (refused while a queued or running job uses it)."""
        try:
            validation.dataset_unused(store, name)
            datasets.delete_dataset(settings.data_root, name)
        except datasets.NotFound as exc:
            raise HTTPException(404, str(exc)) from None
        except validation.InUse as exc:
            raise HTTPException(409, str(exc)) from None
        return Response(status_code=204)

    # -- jobs -----------------------------------------------------------------------------

    @api.post(
        "/jobs",
        response_model=JobCreated,
        status_code=202,
        tags=["jobs"],
        responses={**R409, **R413, **R422},
    )
    def submit(
        spec: TrainSpec,
        response: Response,
        settings: SettingsDep,
        store: StoreDep,
        runner: RunnerDep,
        idempotency_key: Annotated[
            str | None, Header(alias="Idempotency-Key", max_length=200)
        ] = None,
    ) -> JobCreated:
        """Queue a training job; a retry with the same `Idempotency-Key` returns the same job."""
        if idempotency_key is not None:  # a retry succeeds even if the dataset changed since
            try:
                prior = store.find_idempotent(idempotency_key, spec.model_dump(mode="json"))
            except IdempotencyConflict as exc:
                raise HTTPException(409, str(exc)) from None
            if prior is not None:
                response.headers["Location"] = f"/jobs/{prior.id}"
                return JobCreated(id=prior.id, status=prior.status, links=links(prior.id))
        for field, msg in validation.check_spec(spec, settings.data_root):
            raise field_error(field, msg)
        try:
            job, created = store.create(
                spec.model_dump(mode="json"), validation.first_max_iter(spec), idempotency_key
            )
        except IdempotencyConflict as exc:
            raise HTTPException(409, str(exc)) from None
        if created:
            runner.notify()
            app.state.metrics.submitted.inc()
        response.headers["Location"] = f"/jobs/{job.id}"
        return JobCreated(id=job.id, status=job.status, links=links(job.id))

    @api.get("/jobs", response_model=JobPage, tags=["jobs"])
    def list_jobs(
        store: StoreDep,
        runner: RunnerDep,
        status: Annotated[list[JobStatus] | None, Query(description="Only these")] = None,
        limit: Annotated[int, Query(ge=1, le=500)] = 50,
        offset: Annotated[int, Query(ge=0, le=1_000_000_000)] = 0,
    ) -> JobPage:
        """Jobs, newest first."""
        jobs, total = store.list(status, limit, offset)
        return JobPage(
            items=[job_out(j, runner) for j in jobs], total=total, limit=limit, offset=offset
        )

    @api.get("/jobs/{job_id}", response_model=JobOut, tags=["jobs"], responses={**R404})
    def get_job(job_id: JobId, store: StoreDep, runner: RunnerDep) -> JobOut:
        """A job's status, progress, ETA and error."""
        return job_out(_found(store.get(job_id), job_id), runner)

    @api.post(
        "/jobs/{job_id}/cancel",
        response_model=JobOut,
        tags=["jobs"],
        responses={**R404, **R409},
    )
    def cancel(job_id: JobId, store: StoreDep, runner: RunnerDep) -> JobOut:
        """Cancel a queued or running job (a running one stops within one evaluation).

        Cancelling a cancelled job again answers 200 (a retried request); a finished job 409.
        """
        job = runner.cancel(job_id)
        if job is None:
            job = _found(store.get(job_id), job_id)
            if job.status == "cancelled":
                return job_out(job, runner)
            raise HTTPException(409, f"status: job {job_id} is {job.status} already")
        return job_out(job, runner)

    @api.post(
        "/jobs/{job_id}/resume",
        response_model=JobOut,
        status_code=202,
        tags=["jobs"],
        responses={**R404, **R409, **R422},
    )
    def resume(
        job_id: JobId, store: StoreDep, runner: RunnerDep, body: ResumeRequest | None = None
    ) -> JobOut:
        """Continue a cancelled, failed or finished job from its last checkpoint, on the
        trajectory of an uninterrupted run; `max_iter` extends a one-layer job."""
        job = _found(store.get(job_id), job_id)
        max_iter = body.max_iter if body is not None else None
        problem = validation.resume_problem(job, max_iter)
        if problem is not None:
            field, status, msg = problem
            if status == 422:
                raise field_error(field, msg)
            raise HTTPException(status, f"{field}: {msg}")
        spec = {**job.spec, "max_iter": max_iter} if max_iter is not None else None
        queued = store.resume(job_id, spec, max_iter)
        if queued is None:  # its status changed meanwhile
            job = _found(store.get(job_id), job_id)
            raise HTTPException(409, f"status: job {job_id} is {job.status}")
        runner.notify()
        return job_out(queued, runner)

    @api.delete("/jobs/{job_id}", status_code=204, tags=["jobs"], responses={**R404})
    def delete_job(job_id: JobId, runner: RunnerDep) -> Response:
        """Cancel a job if needed and delete it with its artifacts."""
        if not runner.delete(job_id):
            raise HTTPException(404, f"job: no job {job_id!r}")
        return Response(status_code=204)

    @assets.get("/jobs/{job_id}/history", tags=["artifacts"], responses={**R404})
    def history(job_id: JobId, store: StoreDep, runner: RunnerDep) -> Response:
        """The training history, as history.json (an empty list before the first iteration)."""
        _found(store.get(job_id), job_id)
        path = runner.job_dir(job_id) / "history.json"
        body = path.read_bytes() if path.is_file() else b"[]"
        return Response(body, media_type="application/json")

    png = {200: {"content": {"image/png": {}}, "description": "PNG picture"}, **R404}

    @assets.get(
        "/jobs/{job_id}/filters.png", tags=["artifacts"], response_class=Response, responses=png
    )
    def filters_png(job_id: JobId, store: StoreDep, runner: RunnerDep) -> Response:
        """The current filters (first-layer weights) as a grid, refreshed during training."""
        try:
            path = _artifact(runner, store, job_id, "filters.png")
        except HTTPException:  # a deep job draws them per stage until it finishes
            stages = sorted(runner.job_dir(job_id).glob("stage-*/filters.png"))
            if not stages:
                raise
            path = stages[0]
        return Response(
            path.read_bytes(), media_type="image/png", headers={"Cache-Control": "no-store"}
        )

    @assets.get(
        "/jobs/{job_id}/cost.png", tags=["artifacts"], response_class=Response, responses=png
    )
    def cost_png(job_id: JobId, store: StoreDep, runner: RunnerDep) -> Response:
        """The cost curve."""
        path = _artifact(runner, store, job_id, "cost.png")
        return Response(
            path.read_bytes(), media_type="image/png", headers={"Cache-Control": "no-store"}
        )

    @assets.get(
        "/jobs/{job_id}/model.npz",
        tags=["artifacts"],
        response_class=FileResponse,
        responses={
            200: {"content": {"application/octet-stream": {}}, "description": "The model"},
            **R404,
        },
    )
    def model_npz(job_id: JobId, store: StoreDep, runner: RunnerDep) -> FileResponse:
        """The trained model, as `sae train` writes it. A cancelled or failed job's model is
        its last checkpoint, marked `X-SAE-Partial: true` (resume the job to finish it)."""
        job = _found(store.get(job_id), job_id)
        if job.status not in ("succeeded", "cancelled", "failed"):
            raise HTTPException(404, f"model.npz: job {job_id} is {job.status}, not finished")
        path = _artifact(runner, store, job_id, "model.npz")
        partial = {"X-SAE-Partial": "true"} if job.status != "succeeded" else {}
        return FileResponse(
            path, media_type="application/octet-stream", filename="model.npz", headers=partial
        )

    @api.post(
        "/jobs/{job_id}/encode",
        response_model=EncodeResponse,
        tags=["artifacts"],
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
        job = _found(store.get(job_id), job_id)
        if job.status != "succeeded":
            raise HTTPException(409, f"status: job {job_id} is {job.status}, not succeeded")
        if len(body.X) > settings.max_encode_rows:
            raise field_error("X", f"X: at most {settings.max_encode_rows} rows per request")
        try:
            hidden, recon = encoding.encode(
                runner.job_dir(job_id) / "model.npz", body.X, settings.max_encode_values
            )
        except ValueError as exc:
            raise field_error("X", str(exc)) from None
        return EncodeResponse(hidden=hidden, reconstruction=recon if body.reconstruct else None)

    app.include_router(public)
    app.include_router(api)
    app.include_router(assets)
    app.mount("/static/bokeh", StaticFiles(directory=BOKEHJS), name="bokehjs")
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    return app
