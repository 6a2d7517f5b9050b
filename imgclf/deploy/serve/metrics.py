"""Prometheus metrics through prometheus_client. Label values come from fixed
sets (known methods, route templates, error codes), never from the request,
so /metrics cannot be made to grow.

With --workers N every worker writes its values to files in one folder
(prometheus_client's multiprocess mode, PROMETHEUS_MULTIPROC_DIR set by
`serve` before the workers start), and /metrics, whichever worker answers,
adds up all of them."""

from __future__ import annotations

import os

import prometheus_client as prom
from prometheus_client import multiprocess

LAT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)
METHODS = {"GET", "POST", "HEAD", "OPTIONS", "PUT", "DELETE", "PATCH"}
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
prom.disable_created_metrics()  # the *_created samples say nothing a scrape needs


class Metrics:
    """One app's metrics, in a registry of its own (tests build several apps in one process)."""

    def __init__(self):
        self.registry = prom.CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = prom.Counter("imgclf_requests", "HTTP requests by method, path and status.",
                                     ["method", "path", "status"], registry=r)
        self.latency = prom.Histogram("imgclf_request_duration_seconds", "Request latency.", ["path"],
                                      buckets=LAT_BUCKETS, registry=r)
        self.batches = prom.Histogram("imgclf_batch_size", "Images per model call (micro-batching).",
                                      buckets=BATCH_BUCKETS, registry=r)
        self.errors = prom.Counter("imgclf_errors", "Rejected requests by error code.", ["code"], registry=r)
        self.images = prom.Counter("imgclf_images", "Images classified.", registry=r)

    def request(self, method: str, route: str, status: int, seconds: float) -> None:
        """route: the matched route's template, or "other"."""
        self.requests.labels(method if method in METHODS else "other", route, str(int(status))).inc()
        self.latency.labels(route).observe(seconds)

    def error(self, code: str) -> None:
        """code: one of the server's own error codes (a fixed set)."""
        self.errors.labels(code).inc()

    def batch(self, n: int) -> None:
        self.batches.observe(n)
        self.images.inc(n)

    def render(self) -> bytes:
        if os.environ.get(MULTIPROC_ENV):  # every worker's values, summed
            registry = prom.CollectorRegistry()
            multiprocess.MultiProcessCollector(registry)
            return prom.generate_latest(registry)
        return prom.generate_latest(self.registry)
