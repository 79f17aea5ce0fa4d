"""Prometheus metrics of one server, in its own registry (no process-global state), served on the
metrics port at /metrics only (any other path is 404, so a probe pointed there cannot pass by accident)."""

from __future__ import annotations

from aiohttp import web
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)

LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        for collector in (ProcessCollector, PlatformCollector, GCCollector):  # the standard process metrics
            collector(registry=self.registry)
        self.requests = Counter(
            "kiln_requests",
            "Requests by model, API and gRPC status code",
            ["model", "api", "code"],
            registry=self.registry,
        )
        self.stage_seconds = Histogram(
            "kiln_stage_seconds",
            "Time per request stage: queue, tokenize, infer, postprocess",
            ["model", "stage"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.request_seconds = Histogram(
            "kiln_request_seconds",
            "Whole request latency",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.batch_size = Histogram(
            "kiln_batch_size",
            "Sequences per executed batch",
            ["model"],
            buckets=(1, 2, 4, 8, 16, 32, 64, 128),
            registry=self.registry,
        )
        self.padded_tokens = Histogram(
            "kiln_batch_padded_tokens",
            "Padded tokens (rows x longest) per executed batch",
            ["model"],
            buckets=(16, 64, 256, 1024, 4096, 16384, 65536),
            registry=self.registry,
        )
        self.padding_ratio = Histogram(
            "kiln_batch_padding_ratio",
            "Share of a batch's tokens that are padding",
            ["model"],
            buckets=(0.0, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0),
            registry=self.registry,
        )
        self.batches = Counter(
            "kiln_batches",
            "Executed batches by the session that ran them: 'all' cores (a batch running alone) or 'one' core "
            "(instances side by side under load)",
            ["model", "cores"],
            registry=self.registry,
        )
        self.queue_depth = Gauge(
            "kiln_queue_depth",
            "Items accepted and not yet answered (what --max-queue bounds)",
            ["model"],
            registry=self.registry,
            multiprocess_mode="livesum",  # --frontends N: the engine's, the one process that admits
        )
        # generators: one decoding iteration steps every running sequence (continuous batching)
        self.decoding_rows = Histogram(
            "kiln_decoding_rows",
            "Sequences stepped per decoding iteration",
            ["model"],
            buckets=(1, 2, 4, 8, 16, 32, 64),
            registry=self.registry,
        )
        self.generated_tokens = Counter("kiln_generated_tokens", "Tokens generated", ["model"], registry=self.registry)
        self.cache_tokens = Gauge(
            "kiln_kv_cache_tokens",
            "KV cache tokens held by running sequences",
            ["model"],
            registry=self.registry,
            multiprocess_mode="livesum",
        )

    def app(self) -> web.Application:
        async def metrics(request: web.Request) -> web.Response:
            body = generate_latest(self.registry)
            return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

        app = web.Application()
        app.router.add_get("/metrics", metrics)
        return app
