"""``/health`` (public, for probes) and ``/metrics`` (for Prometheus: with the bearer token
when the service has one).

Both are ``async``: they never wait for a thread of the default pool, which slow routes may
hold; what they ask the scheduler and the job store runs in threads of their own
(:func:`service.deps.in_status_threads`).
"""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request, Response

from service.deps import (
    R401,
    CredentialsDep,
    MetricsDep,
    RunnerDep,
    SettingsDep,
    authorized,
    in_status_threads,
    require_token,
)
from service.schemas import Health

router = APIRouter(tags=["service"])


@router.get("/health", response_model=Health, response_model_exclude_unset=True)
async def health(
    request: Request, settings: SettingsDep, runner: RunnerDep, creds: CredentialsDep
) -> Health:
    """Liveness; with the token (or on an open service) also the scheduler and running jobs.

    Unauthenticated callers of a service with a token learn only that it is up: the
    scheduler address, dashboard and job ids are for its users.
    """
    if not authorized(settings, creds):
        return Health(status="ok")
    cluster = await in_status_threads(request, runner.cluster_summary)
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


@router.get(
    "/metrics",
    response_class=Response,
    dependencies=[Depends(require_token)],
    responses={200: {"content": {"text/plain": {}}, "description": "Prometheus metrics"}, **R401},
)
async def get_metrics(request: Request, metrics: MetricsDep) -> Response:
    """Prometheus metrics: jobs by status, submissions, iterations. With the service's token
    when it has one (Prometheus: `authorization: {credentials: TOKEN}` in the scrape config,
    sent as `Authorization: Bearer TOKEN`)."""
    body, ctype = await in_status_threads(request, metrics.render)
    return Response(body, media_type=ctype)
