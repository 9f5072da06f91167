"""Prometheus metrics of one app (own registry, so several apps can live in one process)."""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, generate_latest
from prometheus_client.core import GaugeMetricFamily

from service.store import JobStore


class _JobsCollector:
    def __init__(self, store: JobStore, runner):
        self.store, self.runner = store, runner

    def collect(self):
        g = GaugeMetricFamily("sae_jobs", "Jobs by status", labels=["status"])
        for status, n in self.store.counts().items():
            g.add_metric([status], n)
        yield g
        yield GaugeMetricFamily(
            "sae_jobs_running_here",
            "Jobs whose optimizer loop runs in this process",
            value=len(self.runner.running_ids()),
        )
        figures = self.runner.training_figures()
        for key, doc in (
            ("iteration", "Last iteration of a running job (of its current stage)"),
            ("cost", "Cost at the last iteration of a running job"),
            ("evaluations", "Objective evaluations of a running job so far"),
            ("iteration_seconds", "Seconds the last iteration of a running job took"),
            ("samples_per_second", "Examples evaluated per second in the last iteration"),
        ):
            g = GaugeMetricFamily(f"sae_job_{key}", doc, labels=["job"])
            for job_id, f in figures.items():
                if f.get(key) is not None:
                    g.add_metric([job_id], f[key])
            yield g
        cluster = self.runner.cluster_summary()
        for key, doc in (
            ("workers", "Dask workers connected"),
            ("threads", "Dask worker threads in total"),
            ("memory_limit_bytes", "Dask workers' memory limits in total"),
        ):
            if key in cluster:
                yield GaugeMetricFamily(f"sae_cluster_{key}", doc, value=cluster[key])


def new_registry() -> CollectorRegistry:
    """The registry of one app (made with the app, so that request instrumentation installed
    at build time and the job metrics of the lifespan share it)."""
    return CollectorRegistry()


class Metrics:
    """The app's metrics: job counts by status (read at scrape time), submissions and requests
    by route template. Request latencies come from prometheus-fastapi-instrumentator, on the
    same registry (see :func:`instrument`)."""

    def __init__(self, store: JobStore, runner, registry: CollectorRegistry | None = None):
        self.registry = registry if registry is not None else new_registry()
        self.submitted = Counter(
            "sae_jobs_submitted", "Jobs accepted by POST /jobs", registry=self.registry
        )
        self.requests = Counter(
            "sae_http_requests",
            "HTTP requests by method, route and status",
            ["method", "route", "status"],
            registry=self.registry,
        )
        self.registry.register(_JobsCollector(store, runner))

    def render(self) -> tuple[bytes, str]:
        """The exposition text and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


def route_template(request) -> str:
    """The route template of a request (``/jobs/{job_id}``, ``/docs``, ``/static``), or
    ``"unmatched"`` when no route matches (404s of unknown paths)."""
    from prometheus_fastapi_instrumentator.routing import get_route_name
    from starlette.routing import Match, Mount

    name = get_route_name(request, should_include_root_path=False)
    if name:
        return name
    for route in getattr(request.app, "routes", ()):  # static files: a Mount without routes
        if isinstance(route, Mount) and route.matches(request.scope)[0] == Match.FULL:
            return route.path
    return "unmatched"


def instrument(app, registry: CollectorRegistry) -> None:
    """Request latency (``sae_http_request_duration_seconds``) and request and response size
    histograms by route template, from prometheus-fastapi-instrumentator; the request count
    by route and status is :attr:`Metrics.requests`."""
    from prometheus_fastapi_instrumentator import Instrumentator
    from prometheus_fastapi_instrumentator import metrics as pfi

    common = {"metric_namespace": "sae", "registry": registry}
    Instrumentator(
        should_group_status_codes=False,
        should_ignore_untemplated=True,
        excluded_handlers=["/metrics"],
        registry=registry,
    ).add(pfi.latency(**common)).add(pfi.request_size(**common)).add(
        pfi.response_size(**common)
    ).instrument(app)
