"""``diffpo serve`` sends traces and metrics where the standard ``OTEL_*`` variables say.

A library leaves the OpenTelemetry SDK to the application; ``diffpo serve`` is an
application, so it sets the SDK up itself when the operator asks for an exporter
(``OTEL_TRACES_EXPORTER``, ``OTEL_METRICS_EXPORTER`` or ``OTEL_EXPORTER_OTLP_ENDPOINT``),
the way ``opentelemetry-instrument`` would: exporters by their registered names (``otlp``
needs ``opentelemetry-exporter-otlp``), the resource from ``OTEL_SERVICE_NAME`` /
``OTEL_RESOURCE_ATTRIBUTES``, ``OTEL_SDK_DISABLED`` honoured. When a provider is already
set (``opentelemetry-instrument diffpo serve``, or the embedding application) it is left alone.
"""

from __future__ import annotations

import logging
import os
from importlib.metadata import entry_points
from typing import Any

from opentelemetry import metrics, trace

log = logging.getLogger("diffpo_sdk.server")

SERVICE_NAME = "diffpo-serve"
EXPORTER_ENV = {"traces": "OTEL_TRACES_EXPORTER", "metrics": "OTEL_METRICS_EXPORTER"}


def exporter_names(signal: str) -> list[str]:
    """The exporters the environment names for ``signal`` (``otlp`` when only an endpoint is set)."""
    value = os.environ.get(EXPORTER_ENV[signal])
    if value is None:
        value = "otlp" if os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT") else "none"
    return [n.strip() for n in value.split(",") if n.strip() and n.strip() != "none"]


def load_exporter(signal: str, name: str) -> Any | None:
    """The exporter class registered under ``name`` (what ``opentelemetry-instrument`` looks up)."""
    group = f"opentelemetry_{signal}_exporter"
    found = list(entry_points(group=group, name=name))
    if not found:
        hint = " (pip install opentelemetry-exporter-otlp)" if name == "otlp" else ""
        log.error("no OpenTelemetry %s exporter named %r is installed%s; not exporting it", signal, name, hint)
        return None
    return found[0].load()


def configure_from_env() -> list[str]:
    """Install SDK tracer and meter providers for the exporters the ``OTEL_*`` variables name;
    returns what it set up (``["traces:console", ...]``), empty when nothing was asked or a
    provider was already there."""
    if os.environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return []
    if not isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider):
        return []  # opentelemetry-instrument or the application configured the SDK
    wanted = {signal: exporter_names(signal) for signal in EXPORTER_ENV}
    if not any(wanted.values()):
        return []
    try:
        from opentelemetry.sdk.metrics import MeterProvider
        from opentelemetry.sdk.metrics.export import MetricReader, PeriodicExportingMetricReader
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
    except ImportError:
        log.error("OTEL_* exporters are set but opentelemetry-sdk is not installed (pip install 'diffpo-sdk[server]')")
        return []
    resource = Resource.create()  # OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES are read here
    if str(resource.attributes.get("service.name", "")).startswith("unknown_service"):
        resource = resource.merge(Resource({"service.name": SERVICE_NAME}))
    done = []
    spans = [(n, cls) for n in wanted["traces"] if (cls := load_exporter("traces", n)) is not None]
    if spans:
        provider = TracerProvider(resource=resource)
        for _, cls in spans:
            provider.add_span_processor(BatchSpanProcessor(cls()))
        trace.set_tracer_provider(provider)
        done += [f"traces:{n}" for n, _ in spans]
    readers = []
    for name in wanted["metrics"]:
        if (cls := load_exporter("metrics", name)) is not None:
            # a pull exporter (prometheus) is a reader itself; a push exporter is read periodically
            readers.append(cls() if issubclass(cls, MetricReader) else PeriodicExportingMetricReader(cls()))
            done.append(f"metrics:{name}")
    if readers:
        metrics.set_meter_provider(MeterProvider(resource=resource, metric_readers=readers))
    if done:
        log.info("OpenTelemetry export from the environment: %s", ", ".join(done))
    return done
