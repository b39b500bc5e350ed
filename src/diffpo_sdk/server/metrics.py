"""Prometheus metrics of one server, in its own registry so several apps can live in one process."""

from __future__ import annotations

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    generate_latest,
)

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
RATIO_BUCKETS = (0.03, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.8, 1.0, 1.5, 2, 4, 8, 16, 32)
SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


class Metrics:
    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        ProcessCollector(registry=r)  # RSS, CPU, open fds: what a soak test watches
        self.queue_depth = Gauge("diffpo_queue_depth", "Requests waiting for the engine", registry=r)
        self.inflight_items = Gauge("diffpo_inflight_items", "Items in the engine batch now running", registry=r)
        self.requests = Counter(
            "diffpo_requests_total", "HTTP requests answered", ["endpoint", "status"], registry=r
        )
        self.errors = Counter("diffpo_errors_total", "Failed or refused requests, by kind", ["kind"], registry=r)
        self.latency = Histogram(
            "diffpo_request_seconds", "Request latency, end to end", ["endpoint"], buckets=LATENCY_BUCKETS, registry=r
        )
        self.queue_wait = Histogram(
            "diffpo_queue_wait_seconds", "Time from admission to the start of its engine batch",
            buckets=LATENCY_BUCKETS, registry=r,
        )
        self.batch_seconds = Histogram(
            "diffpo_batch_seconds", "Wall time of one engine batch", buckets=LATENCY_BUCKETS, registry=r
        )
        self.batch_items = Histogram(
            "diffpo_batch_items", "Items per engine batch", buckets=SIZE_BUCKETS, registry=r
        )
        self.batch_requests = Histogram(
            "diffpo_batch_requests", "Requests merged into one engine batch", buckets=SIZE_BUCKETS, registry=r
        )
        self.passes_per_token = Histogram(
            "diffpo_passes_per_token", "Forward passes per refined token, per item (AR = 1)",
            buckets=RATIO_BUCKETS, registry=r,
        )
        self.tokens_per_pass = Histogram(
            "diffpo_tokens_per_pass", "Refined tokens per forward pass, per item",
            buckets=(0.5, 1, 1.5, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64), registry=r,
        )
        self.tokens = Counter("diffpo_tokens_total", "Answer tokens decided", registry=r)
        self.oom_splits = Counter("diffpo_oom_splits_total", "Batches split in half after running out of GPU memory", registry=r)

    def render(self) -> bytes:
        return generate_latest(self.registry)
