"""The server's Prometheus metrics, on a registry of its own (several servers may live in one process)."""

from __future__ import annotations

from typing import Any


class Metrics:
    """Requests by status, latency, queue depth, busy workers, images, batch sizes, worker restarts."""

    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        self.requests = Counter(
            "dgrun_requests",
            "Requests by endpoint and HTTP status",
            ["endpoint", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "dgrun_request_seconds",
            "Seconds from arrival to response, image endpoints",
            ["endpoint"],
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120, 300),
            registry=self.registry,
        )
        self.pipeline = Histogram(
            "dgrun_pipeline_seconds",
            "Seconds of the pipeline call that made a request's images",
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120, 300),
            registry=self.registry,
        )
        self.queue = Gauge("dgrun_queue_depth", "Requests waiting for a worker", registry=self.registry)
        self.busy = Gauge("dgrun_busy_workers", "Workers running a pipeline call", registry=self.registry)
        self.ready = Gauge("dgrun_workers_ready", "Workers loaded, applied and warm", registry=self.registry)
        self.images = Counter("dgrun_images", "Images made", registry=self.registry)
        self.batches = Histogram(
            "dgrun_batch_size",
            "Requests per pipeline call",
            buckets=(1, 2, 3, 4, 6, 8, 12, 16, 32),
            registry=self.registry,
        )
        self.restarts = Counter(
            "dgrun_worker_restarts", "Workers restarted after dying", registry=self.registry
        )

    def observe(self, event: str, value: Any) -> None:
        """The pool's events (see `Pool.observe`)."""
        if event == "queue":
            self.queue.set(value)
        elif event == "busy":
            self.busy.set(value)
        elif event == "batch":
            self.batches.observe(value)
        elif event == "images":
            self.images.inc(value)

    def render(self) -> tuple[bytes, str]:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(self.registry), CONTENT_TYPE_LATEST
