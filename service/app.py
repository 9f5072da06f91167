"""The FastAPI application: its lifespan, middlewares, error handlers and routers.

The routes are in :mod:`service.routes` (one module per resource), what they share in
:mod:`service.deps`. The Dask client and the job runner are made in the lifespan, never at
import time.
"""

from __future__ import annotations

import logging
import math
import re
import sqlite3
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any
from urllib.parse import unquote_plus, urlsplit

import anyio
from fastapi import FastAPI, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.encoders import jsonable_encoder
from fastapi.exception_handlers import http_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.staticfiles import StaticFiles
from fastapi_offline import FastAPIOffline
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException as StarletteHTTPException

from service import datasets, faults, metrics
from service.errors import clean_errors
from service.routes import artifacts, health, jobs, pages
from service.routes import datasets as dataset_routes
from service.routes.pages import STATIC
from service.runner import Runner
from service.settings import Settings
from service.store import JobStore

__all__ = [
    "BOKEHJS",
    "AllowedHosts",
    "STATIC",
    "QuietPolling",
    "RedactTokens",
    "create_app",
    "json_safe",
    "redact_access_log",
]

log = logging.getLogger("sae.service")
#: BokehJS as the installed bokeh package ships it (the job page's plots; no CDN).
BOKEHJS = Path(__import__("bokeh").__file__).parent / "server" / "static"
_CallNext = Callable[[Request], Awaitable[Response]]
#: Threads for the blocking calls of /health and /metrics (the scheduler, the job store).
STATUS_THREADS = 4


# ------------------------------------------------------------------------- logging, JSON


class RedactTokens(logging.Filter):
    """Replace the value of ``token=`` in log records (uvicorn's access log) with ``***``.

    Also of a parameter whose name says ``token`` once percent-decoded (``tok%65n=``, which
    the service reads as ``token``; uvicorn logs the query as sent), and of any name ending
    in ``token`` (``access_token=``).
    """

    _PATTERN = re.compile(r"(token=)[^&\s\"']*", re.IGNORECASE)
    #: A parameter's name (after ``?`` or ``&``) and its ``=``; the value runs to ``_VALUE``'s end.
    _NAME = re.compile(r"[?&]([^?&=\s\"']+)=")
    _VALUE = re.compile(r"[^&\s]*")  # a quote may be part of a value: redact through it

    @classmethod
    def redact(cls, text: str) -> str:
        """``text`` with the values of its token parameters replaced by ``***``."""
        out, pos = [], 0
        for m in cls._NAME.finditer(text):  # names inside another's value are seen too
            if m.end() < pos or not unquote_plus(m[1]).lower().endswith("token"):
                continue
            end = cls._VALUE.match(text, m.end()).end()
            out += [text[pos : m.end()], "***"]
            pos = end
        out.append(text[pos:])
        return cls._PATTERN.sub(r"\1***", "".join(out))

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.msg, str):
            record.msg = self.redact(record.msg)
        if isinstance(record.args, tuple):
            record.args = tuple(self.redact(a) if isinstance(a, str) else a for a in record.args)
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


# ------------------------------------------------------------------------- app


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    """Make the folders, the job store, the runner (with ``app.state.train_fn``) and the job
    metrics; start the runner, and stop it at shutdown."""
    settings: Settings = app.state.settings
    redact_access_log()
    settings.state_dir.mkdir(parents=True, exist_ok=True)
    settings.data_root.mkdir(parents=True, exist_ok=True)
    for left in datasets.remove_leftovers(settings.data_root, settings.state_dir):
        logging.getLogger("sae.service").warning("removed %s, left by an interrupted write", left)
    store = JobStore(settings.db_path)
    runner = Runner(settings, store, train_fn=app.state.train_fn)
    app.state.store, app.state.runner = store, runner
    app.state.metrics = metrics.Metrics(store, runner, app.state.registry)
    # threads of their own: encodes (CPU) and the status routes never wait for each other,
    # nor for the default thread pool of the other routes
    app.state.encode_limiter = anyio.CapacityLimiter(settings.max_concurrent_encodes)
    app.state.status_limiter = anyio.CapacityLimiter(STATUS_THREADS)
    runner.start()
    try:
        yield
    finally:
        await run_in_threadpool(runner.stop)


class AllowedHosts:
    """Refuse (400) a request whose Host header names none of ``hosts``.

    A page of another site can point its own name at 127.0.0.1 (DNS rebinding): its
    requests then reach the service with Host and Origin both naming that site, so the
    cross-site check (:func:`refuse_cross_site`) lets them through. The host names a user
    types (loopback, the address listened on, :attr:`Settings.allowed_hosts`) are kept.
    Like Starlette's ``TrustedHostMiddleware``, with ``*.domain`` and ``*`` patterns, but the
    refusal is the API's JSON ``{"detail": "host: ..."}``.

    Parameters
    ----------
    app : ASGI application
    hosts : names, lower case, IPv6 addresses without brackets
    """

    _HOST = re.compile(r"^(?:\[(?P<v6>[0-9a-f:.]+)\]|(?P<name>[^\[\]:/@\s]+))(?::\d*)?$", re.I)

    def __init__(self, app: Any, hosts: list[str]):
        self.app = app
        self.any = "*" in hosts
        self.names = {h for h in hosts if not h.startswith("*.")}
        self.suffixes = tuple(h[1:] for h in hosts if h.startswith("*."))

    def allowed(self, header: str | None) -> bool:
        """Whether the Host header ``header`` names one of the hosts."""
        m = self._HOST.match(header or "")
        if m is None:
            return False
        name = (m["v6"] or m["name"]).lower().rstrip(".")
        return name in self.names or name.endswith(self.suffixes)

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if self.any or scope["type"] not in ("http", "websocket"):
            return await self.app(scope, receive, send)
        header = Headers(scope=scope).get("host")
        if self.allowed(header):
            return await self.app(scope, receive, send)
        detail = (
            f"host: {header!r} is not a name of this service; serve it with "
            "--allowed-host NAME (SAE_ALLOWED_HOSTS) to allow it"
            if header
            else "host: the request has no Host header"
        )
        await JSONResponse({"detail": detail}, status_code=400)(scope, receive, send)


async def count_requests(request: Request, call_next: _CallNext) -> Response:
    """Count the request by method, route template and status (:attr:`Metrics.requests`)."""
    route = metrics.route_template(request)  # before routing rewrites the scope (mounts)
    response = await call_next(request)
    m = getattr(request.app.state, "metrics", None)
    if m is not None:
        m.requests.labels(request.method, route, str(response.status_code)).inc()
    return response


async def refuse_cross_site(request: Request, call_next: _CallNext) -> Response:
    """Without a token, refuse unsafe requests a browser sends on behalf of another site.

    With a token the API is safe from CSRF already (browsers never add the Authorization
    header by themselves); an open service must check where the request comes from.
    """
    if not request.app.state.settings.token and request.method not in ("GET", "HEAD", "OPTIONS"):
        site = request.headers.get("sec-fetch-site", "").lower()
        origin = request.headers.get("origin")
        host = request.headers.get("host", "").lower()
        foreign = origin is not None and urlsplit(origin).netloc.lower() != host
        if site == "cross-site" or foreign:
            return JSONResponse(
                {"detail": "origin: cross-site requests are refused"}, status_code=403
            )
    return await call_next(request)


async def invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
    """A 422 whose errors name their fields once and survive JSON (no NaN, no infinity)."""
    errors = json_safe(jsonable_encoder(json_safe(clean_errors(exc.errors()))))
    return JSONResponse({"detail": errors}, status_code=422)


#: FastAPI's answer to a body it cannot parse for another reason than bad JSON syntax.
_UNPARSED = "There was an error parsing the body"


async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
    """FastAPI's answer to an HTTP exception, except that a body which cannot be parsed (a
    JSON number of more than 4300 digits, which Python refuses to read) names the body."""
    if exc.status_code == 400 and exc.detail == _UNPARSED:
        cause = exc.__cause__
        reason = (
            "a number has more digits than the 4300 allowed"
            if isinstance(cause, ValueError) and "digits" in str(cause)
            else "it cannot be parsed"
        )
        return JSONResponse({"detail": f"body: {reason}"}, status_code=400)
    return await http_exception_handler(request, exc)


async def bad_dataset_name(request: Request, exc: datasets.BadName) -> JSONResponse:
    """A 404 for a dataset name that cannot exist (outside the data root, say)."""
    return JSONResponse({"detail": str(exc)}, status_code=404)


def create_app(settings: Settings | None = None, train_fn=None) -> FastAPI:
    """Build the application.

    Parameters
    ----------
    settings : Settings, optional
        Default: from ``SAE_*`` environment variables.
    train_fn : callable, optional
        Training function for the runner (default :func:`worker.train.train`).

    Returns
    -------
    FastAPI
        The app; its lifespan starts the runner.
    """
    settings = settings or Settings()
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
    app.state.settings, app.state.train_fn = settings, train_fn
    app.state.registry = metrics.new_registry()
    metrics.instrument(app, app.state.registry)
    app.middleware("http")(count_requests)
    app.middleware("http")(refuse_cross_site)
    app.add_middleware(AllowedHosts, hosts=settings.trusted_hosts)  # the outer one: runs first
    app.add_exception_handler(RequestValidationError, invalid_request)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(datasets.BadName, bad_dataset_name)
    app.add_exception_handler(OSError, faults.storage_error)  # a full disk: 507
    app.add_exception_handler(sqlite3.Error, faults.storage_error)

    app.include_router(health.router)
    app.include_router(pages.router)
    app.include_router(dataset_routes.router)
    app.include_router(dataset_routes.uploads, max_body_size=settings.max_upload_bytes)
    app.include_router(jobs.router)
    app.include_router(artifacts.router)
    app.include_router(artifacts.downloads)
    app.mount("/static/bokeh", StaticFiles(directory=BOKEHJS), name="bokehjs")
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    return app
