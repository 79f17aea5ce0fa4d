"""OpenTelemetry tracing, on with `kiln serve --trace-endpoint URL` (OTLP over HTTP), off and free
otherwise: nothing here is imported, no span is made and no stage time is kept per request.

OpenTelemetry's own instrumentation makes the server spans: its grpc aio interceptor, and its
aiohttp instrumentor, which puts a middleware on every aiohttp application made after
`start_tracing` (the server calls it first); both honour an incoming W3C `traceparent`. kiln adds
one child span per stage a request went through (`tokenize`, `queue`, `infer`, `postprocess`),
written after the request from the times its stages recorded, so the threads that ran them never
touch the tracer. Needs the `tracing` extra: `pip install 'kiln-serve[tracing]'`.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Any

from kiln.runtime.errors import ConfigError

EXCLUDED_URLS = "OTEL_PYTHON_AIOHTTP_SERVER_EXCLUDED_URLS"
# a stage's statistic (Triton's name) -> its span's name
SPAN_NAMES = {"compute_input": "tokenize", "queue": "queue", "compute_infer": "infer", "compute_output": "postprocess"}


@dataclass
class Tracing:
    provider: Any  # opentelemetry.sdk.trace.TracerProvider
    tracer: Any

    def grpc_interceptor(self) -> Any:
        from opentelemetry.instrumentation.grpc import aio_server_interceptor

        return aio_server_interceptor(tracer_provider=self.provider)

    def record(self, spans: list[tuple[str, float, float]], attributes: dict[str, Any]) -> None:
        """Child spans of the current (server) span, one per stage: (statistic, start, end) in
        time.monotonic() seconds, as RequestState keeps them."""
        offset_ns = time.time_ns() - time.monotonic_ns()
        for stage, start, end in spans:
            span = self.tracer.start_span(
                SPAN_NAMES.get(stage, stage), start_time=int(start * 1e9) + offset_ns, attributes=attributes
            )
            span.end(end_time=int(end * 1e9) + offset_ns)

    def shutdown(self) -> None:
        """Send what is still buffered (at the server's stop)."""
        self.provider.shutdown()


def start_tracing(endpoint: str, service: str = "kiln") -> Tracing:
    """A tracer provider exporting to an OTLP/HTTP collector (`http://HOST:4318`, or a URL ending
    in /v1/traces), in batches off the request path."""
    try:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.instrumentation.aiohttp_server import AioHttpServerInstrumentor
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
    except ImportError as exc:
        missing = f"--trace-endpoint needs the tracing extra: pip install 'kiln-serve[tracing]' ({exc})"
        raise ConfigError(missing) from exc
    url = endpoint if endpoint.rstrip("/").endswith("/v1/traces") else endpoint.rstrip("/") + "/v1/traces"
    provider = TracerProvider(resource=Resource.create({"service.name": service}))
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=url)))
    # aiohttp's instrumentation is a process-wide switch (applications made from now on carry its
    # middleware); probes and scrapes are left out unless the operator's environment says otherwise
    os.environ.setdefault(EXCLUDED_URLS, "/metrics,/v2/health")
    AioHttpServerInstrumentor().instrument(tracer_provider=provider)
    return Tracing(provider, provider.get_tracer("kiln.serve"))
