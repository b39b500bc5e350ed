"""Prometheus metrics of one server, in its own registry so several apps can live in one process.

Names follow Prometheus' conventions (base units, ``_seconds`` / ``_total`` suffixes) and
mirror vLLM's where the concept is the same (``e2e_request_latency_seconds``,
``request_queue_time_seconds``, ``time_to_first_token_seconds``, ``prompt_tokens_total``,
``generation_tokens_total``, ``num_requests_running`` / ``num_requests_waiting``), under the
``diffpo_`` prefix; every series but the process ones carries a ``model`` label (the refiner
served; empty until it has loaded). Ratios are left to queries: passes per token is
``rate(diffpo_forward_passes_total) / rate(diffpo_generation_tokens_total)``, which adds up
across replicas where a per-item ratio histogram cannot. docs/observability.md lists them all.
"""

from __future__ import annotations

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    generate_latest,
)

PREFIX = "diffpo_"
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)
M = ("model",)


class Metrics:
    """The server's metric families, and their series for the model being served (:meth:`bind`)."""

    def __init__(self, model: str = "") -> None:
        self.registry = r = CollectorRegistry()
        ProcessCollector(registry=r)  # RSS, CPU, open fds: what a soak test watches

        def gauge(name: str, doc: str) -> Gauge:
            return Gauge(PREFIX + name, doc, M, registry=r)

        def counter(name: str, doc: str, labels: tuple[str, ...] = ()) -> Counter:
            return Counter(PREFIX + name, doc, (*labels, *M), registry=r)

        def histogram(name: str, doc: str, buckets: tuple[float, ...], labels: tuple[str, ...] = ()) -> Histogram:
            return Histogram(PREFIX + name, doc, (*labels, *M), buckets=buckets, registry=r)

        self._waiting = gauge("num_requests_waiting", "Requests admitted and waiting for the engine")
        self._running = gauge("num_requests_running", "Requests whose items are decoding in the engine batch now")
        self._items_running = gauge("num_items_running", "Items decoding in the engine batch now")
        self._requests = counter("requests_total", "HTTP requests answered, by endpoint and status code",
                                 ("endpoint", "status"))
        self._errors = counter("errors_total", "Failed or refused requests and fail-open refinements, by kind",
                               ("kind",))
        self._http_duration = histogram("http_request_duration_seconds", "HTTP request latency, by endpoint",
                                        LATENCY_BUCKETS, ("endpoint",))
        self._e2e = histogram("e2e_request_latency_seconds",
                              "Refinement latency, admission to the last item's answer", LATENCY_BUCKETS)
        self._queue_time = histogram("request_queue_time_seconds",
                                     "Time from admission until the request joins an engine batch", LATENCY_BUCKETS)
        self._ttft = histogram("time_to_first_token_seconds",
                               "Time from admission until the request's first refined token is verified",
                               LATENCY_BUCKETS)
        self._batch_duration = histogram("batch_duration_seconds", "Wall time of one engine batch", LATENCY_BUCKETS)
        self._batch_items = histogram("batch_items", "Items per engine batch, joiners included", SIZE_BUCKETS)
        self._batch_requests = histogram("batch_requests", "Requests merged into one engine batch", SIZE_BUCKETS)
        self._prompt_tokens = counter("prompt_tokens_total", "Prompt tokens the refiner read (chat template applied)")
        self._generation_tokens = counter("generation_tokens_total", "Answer tokens the refiner decided")
        self._passes = counter("forward_passes_total",
                               "Forward passes spent on answers, per item (one batch pass counts for each item in it)")
        self._success = counter("request_success_total", "Items answered, by finish reason (stop, length)",
                                ("finished_reason",))
        self._oom_splits = counter("oom_splits_total", "Batches split in half after running out of GPU memory")
        self._engine_families = (self._waiting, self._running, self._items_running, self._e2e, self._queue_time,
                                 self._ttft, self._batch_duration, self._batch_items, self._batch_requests,
                                 self._prompt_tokens, self._generation_tokens, self._passes, self._oom_splits)
        self.model = model
        self.bind(model)

    def bind(self, model: str) -> None:
        """Serve ``model``: the engine's series carry its name (those of the name before, unused
        until an engine loads, are dropped); the gauges start at 0."""
        if model != self.model:
            for family in self._engine_families:
                family.remove(self.model)
        self.model = model
        self.waiting = self._waiting.labels(model)
        self.running = self._running.labels(model)
        self.items_running = self._items_running.labels(model)
        self.e2e = self._e2e.labels(model)
        self.queue_time = self._queue_time.labels(model)
        self.ttft = self._ttft.labels(model)
        self.batch_duration = self._batch_duration.labels(model)
        self.batch_items = self._batch_items.labels(model)
        self.batch_requests = self._batch_requests.labels(model)
        self.prompt_tokens = self._prompt_tokens.labels(model)
        self.generation_tokens = self._generation_tokens.labels(model)
        self.passes = self._passes.labels(model)
        self.oom_splits = self._oom_splits.labels(model)
        for g in (self.waiting, self.running, self.items_running):
            g.set(0)

    def error(self, kind: str) -> None:
        """Count one failure (``queue_full`` is a 429, ``refine_failed_open`` a returned draft)."""
        self._errors.labels(kind, self.model).inc()

    def request(self, endpoint: str, status: int, seconds: float | None) -> None:
        """Count one answered HTTP request (and its latency, when it is worth a histogram)."""
        self._requests.labels(endpoint, str(status), self.model).inc()
        if seconds is not None:
            self._http_duration.labels(endpoint, self.model).observe(seconds)

    def item_done(self, finish_reason: str, prompt_tokens: int, new_tokens: int, passes: int) -> None:
        """Count one answered item: its tokens, the passes it took and how it finished."""
        self._success.labels(finish_reason, self.model).inc()
        self.prompt_tokens.inc(prompt_tokens)
        self.generation_tokens.inc(new_tokens)
        self.passes.inc(passes)

    def render(self) -> bytes:
        return generate_latest(self.registry)
