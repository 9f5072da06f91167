"""What the routes share: dependencies, the bearer-token checks, path types, response docs.

The routes (:mod:`service.routes`) get the settings, the job store, the runner and the metrics
of the app serving the request from ``request.app.state`` through the ``*Dep`` annotations
here, never from globals; the app's lifespan makes them (:func:`service.app.create_app`).
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Annotated, TypeVar

import anyio
from fastapi import Depends, HTTPException, Request
from fastapi import Path as PathParam
from fastapi.exceptions import RequestValidationError
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from service import jobs
from service.metrics import Metrics
from service.runner import Runner
from service.schemas import Message, ValidationFailed
from service.settings import Settings
from service.store import Job, JobStore

T = TypeVar("T")

# ------------------------------------------------------------------------- response docs

R400 = {400: {"model": Message, "description": "Malformed request"}}
R401 = {401: {"model": Message, "description": "Missing or wrong bearer token"}}
R404 = {404: {"model": Message, "description": "No such job or dataset"}}
R409 = {409: {"model": Message, "description": "Conflict with the current state"}}
R413 = {413: {"description": "Request body too large"}}
R503 = {503: {"model": Message, "description": "Busy: retry after Retry-After seconds"}}
R422 = {422: {"model": ValidationFailed, "description": "Invalid input; loc names the field"}}
#: The answers every route of the JSON API may give (routers that :func:`require_token`).
API_RESPONSES = {**R400, **R401, **R413}
#: The answers every route a browser loads may give (routers that
#: :func:`require_token_or_query`).
ASSET_RESPONSES = {**R401}

#: A job id in a path: lower-case hexadecimal.
JobId = Annotated[str, PathParam(min_length=1, max_length=64, pattern=r"^[0-9a-f]+$")]

# ------------------------------------------------------------------------- app state
# (async: a dependency that is a plain function would take a thread of the default pool)


async def get_settings(request: Request) -> Settings:
    """The settings of the app serving ``request``."""
    return request.app.state.settings


async def get_store(request: Request) -> JobStore:
    """The job store."""
    return request.app.state.store


async def get_runner(request: Request) -> Runner:
    """The job runner."""
    return request.app.state.runner


async def get_app_metrics(request: Request) -> Metrics:
    """The app's Prometheus metrics (made in the lifespan)."""
    return request.app.state.metrics


SettingsDep = Annotated[Settings, Depends(get_settings)]
StoreDep = Annotated[JobStore, Depends(get_store)]
RunnerDep = Annotated[Runner, Depends(get_runner)]
MetricsDep = Annotated[Metrics, Depends(get_app_metrics)]

# ------------------------------------------------------------------------- bearer token

_bearer = HTTPBearer(auto_error=False, description="The service's token, if it has one")
#: The credentials of the Authorization header, if any (never required by the scheme itself).
CredentialsDep = Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]


def _token_ok(given: str | None, settings: Settings) -> bool:
    """Whether ``given`` is the service's token (compared in constant time)."""
    return bool(given) and secrets.compare_digest(given.encode(), settings.token.encode())


def _refuse() -> HTTPException:
    """The 401 of a request without the right token."""
    return HTTPException(
        401,
        "token: missing or wrong bearer token",
        headers={"WWW-Authenticate": 'Bearer realm="sae"'},
    )


def authorized(settings: Settings, creds: HTTPAuthorizationCredentials | None) -> bool:
    """Whether a request with the header credentials ``creds`` may use the service: the
    service has no token, or ``creds`` carry it."""
    return not settings.token or _token_ok(creds.credentials if creds else None, settings)


async def require_token(settings: SettingsDep, creds: CredentialsDep) -> None:
    """Refuse the request (401) unless it carries the service's bearer token (header only)."""
    if not authorized(settings, creds):
        raise _refuse()


async def require_token_or_query(
    request: Request, settings: SettingsDep, creds: CredentialsDep
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


# ------------------------------------------------------------------------- thread pools


async def in_encode_threads(request: Request, fn: Callable[[], T]) -> T:
    """``fn()`` in a thread of the app's encode pool (``max_concurrent_encodes`` threads).

    CPU-heavy encodes never hold the threads the other routes run in, so ``/health`` and the
    status routes answer while they run. A request finding ``max_waiting_encodes`` others
    already waiting is refused at once.

    Raises
    ------
    HTTPException
        503 with ``Retry-After`` when too many encodes wait.
    """
    settings: Settings = request.app.state.settings
    limiter: anyio.CapacityLimiter = request.app.state.encode_limiter
    stats = limiter.statistics()
    if (
        stats.borrowed_tokens >= limiter.total_tokens
        and stats.tasks_waiting >= settings.max_waiting_encodes
    ):
        raise HTTPException(
            503,
            f"encode: {stats.borrowed_tokens} encode requests run and {stats.tasks_waiting} "
            "wait already; retry shortly",
            headers={"Retry-After": "1"},
        )
    return await anyio.to_thread.run_sync(fn, limiter=limiter)


async def in_status_threads(request: Request, fn: Callable[[], T]) -> T:
    """``fn()`` in a thread of the app's status pool: the blocking calls of ``/health`` and
    ``/metrics`` (the scheduler, the job store) never queue behind other routes."""
    return await anyio.to_thread.run_sync(fn, limiter=request.app.state.status_limiter)


# ------------------------------------------------------------------------- errors


def field_error(field: str, msg: str) -> RequestValidationError:
    """A 422 naming one field of the request body."""
    return RequestValidationError([{"loc": ("body", field), "msg": msg, "type": "value_error"}])


def job_or_404(store: JobStore, job_id: str) -> Job:
    """The job ``job_id``.

    Raises
    ------
    HTTPException
        404 if there is no such job.
    """
    job = store.get(job_id)
    if job is None:
        raise HTTPException(404, f"job: no job {job_id!r}")
    return job


@contextmanager
def refusals() -> Iterator[None]:
    """Answer the refusals of :mod:`service.jobs` as HTTP errors.

    :class:`~service.jobs.NotFound` is a 404, :class:`~service.jobs.Conflict` a 409 and
    :class:`~service.jobs.Invalid` a 422 naming its field; the message is the exception's.
    """
    try:
        yield
    except jobs.NotFound as exc:
        raise HTTPException(404, str(exc)) from None
    except jobs.Conflict as exc:
        raise HTTPException(409, str(exc)) from None
    except jobs.Invalid as exc:
        raise field_error(exc.field, str(exc)) from None
