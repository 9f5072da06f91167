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


class Metrics:
    """The app's metrics: job counts by status (read at scrape time) and submissions."""

    def __init__(self, store: JobStore, runner):
        self.registry = CollectorRegistry()
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
