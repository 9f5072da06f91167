"""``/health`` and ``/metrics``: public, for probes and Prometheus."""

from __future__ import annotations

from fastapi import APIRouter, Response

from service.deps import CredentialsDep, MetricsDep, RunnerDep, SettingsDep, authorized
from service.schemas import Health

router = APIRouter(tags=["service"])


@router.get("/health", response_model=Health, response_model_exclude_unset=True)
def health(settings: SettingsDep, runner: RunnerDep, creds: CredentialsDep) -> Health:
    """Liveness; with the token (or on an open service) also the scheduler and running jobs.

    Unauthenticated callers of a service with a token learn only that it is up: the
    scheduler address, dashboard and job ids are for its users.
    """
    if not authorized(settings, creds):
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


@router.get(
    "/metrics",
    response_class=Response,
    responses={200: {"content": {"text/plain": {}}, "description": "Prometheus metrics"}},
)
def get_metrics(metrics: MetricsDep) -> Response:
    """Prometheus metrics: jobs by status, submissions, iterations."""
    body, ctype = metrics.render()
    return Response(body, media_type=ctype)
