"""`kiln serve` arguments and the ServeOptions they make (ports as Triton's: HTTP 8000, gRPC 8001,
metrics 8002)."""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

CONTROL_MODES = ("none", "explicit", "poll")  # Triton's model control modes


def add_serve_arguments(serve: argparse.ArgumentParser) -> None:
    serve.add_argument("packages", nargs="*", help="package directories (or --model-repository)")
    serve.add_argument("--name", action="append", help="model name per package (default: directory name)")
    serve.add_argument("--model-repository", type=Path, help="a Triton-style model repository directory")
    serve.add_argument("--model-control-mode", choices=CONTROL_MODES, default="none", help="as Triton's")
    serve.add_argument(
        "--load-model", action="append", default=[], help="explicit mode: a model to load at start ('*': all)"
    )
    serve.add_argument("--repository-poll-secs", type=float, default=15.0, help="poll mode: seconds between scans")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--grpc-port", "--port", dest="grpc_port", type=int, default=8001)
    serve.add_argument("--http-port", type=int, default=8000, help="KServe v2 REST and OpenAI embeddings (0: off)")
    serve.add_argument("--metrics-port", type=int, default=8002, help="Prometheus /metrics (0: off)")
    serve.add_argument("--max-message-mb", type=float, default=64)
    serve.add_argument(
        "--http-header-timeout",
        type=float,
        default=15.0,
        help="seconds an HTTP connection may take to send a request's head (and may stay idle between requests)",
    )
    serve.add_argument(
        "--http-body-timeout", type=float, default=30.0, help="seconds an HTTP request body may take to arrive (408)"
    )
    serve.add_argument(
        "--max-batch-tokens",
        type=int,
        default=0,
        help="padded tokens per batch (0: 512 on CPU, where larger batches only add memory traffic; 8192 on a GPU)",
    )
    serve.add_argument("--max-batch-size", type=int, default=64)
    serve.add_argument("--max-queue-delay-ms", type=float, default=2.0)
    serve.add_argument("--max-queue", type=int, default=1024, help="waiting sequences before RESOURCE_EXHAUSTED")
    serve.add_argument(
        "--max-generating",
        type=int,
        default=32,
        help="generators: sequences decoded side by side (continuous batching)",
    )
    serve.add_argument(
        "--max-cache-tokens",
        type=int,
        default=65536,
        help="generators: KV cache tokens (prompt + max new tokens) reserved by admitted sequences; "
        "past it RESOURCE_EXHAUSTED",
    )
    serve.add_argument(
        "--chat-template",
        type=Path,
        help="generators: a Jinja chat template file for OpenAI's chat completions, for packages that carry none",
    )
    serve.add_argument("--default-deadline", type=float, default=30.0, help="seconds, for calls without one")
    serve.add_argument("--threads", type=int, default=0, help="onnxruntime intra-op threads (0: one per core)")
    serve.add_argument("--workers", type=int, default=8, help="tokenization/post-processing threads")
    serve.add_argument(
        "--instances", type=int, default=0, help="batches run at once per model (0: one per core on CPU, 1 on a GPU)"
    )
    serve.add_argument(
        "--spin",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="let onnxruntime's pool threads busy-wait between ops (lower latency, more CPU)",
    )
    serve.add_argument("--provider", default="cpu", help="cpu | cuda | tensorrt | auto")
    serve.add_argument("--auth-token", help="require 'authorization: Bearer TOKEN' (or set KILN_AUTH_TOKEN)")
    serve.add_argument("--tls-cert", help="PEM certificate chain")
    serve.add_argument("--tls-key", help="PEM private key")
    serve.add_argument("--grace", type=float, default=30.0, help="seconds accepted calls get to finish on SIGTERM")
    serve.add_argument(
        "--drain-seconds",
        type=float,
        default=2.0,
        help="after SIGTERM: seconds the server keeps serving while reporting NOT_SERVING, before refusing calls",
    )
    serve.add_argument("--log-format", choices=["text", "json"], default="text")
    serve.add_argument("--log-verbose", type=int, default=0, help="as Triton's: 0 INFO, 1 or more DEBUG")
    serve.add_argument(
        "--access-log",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="a log line per inference request: model, api, code, ms, request id",
    )
    serve.add_argument(
        "--trace-endpoint",
        help="OpenTelemetry: send spans to this OTLP/HTTP collector (http://HOST:4318); needs kiln-serve[tracing]",
    )
    serve.add_argument(
        "--grpc-max-connection-age",
        type=float,
        help="seconds after which a gRPC connection is closed gracefully, so L4 balancers spread clients again",
    )
    serve.add_argument("--grpc-max-connection-age-grace", type=float, default=30.0, help="seconds to finish calls")
    serve.add_argument("--grpc-keepalive-time", type=float, default=60.0, help="seconds between keepalive pings")
    serve.add_argument("--grpc-keepalive-timeout", type=float, default=20.0, help="seconds to wait for a ping ack")


def serve_options(args: argparse.Namespace) -> Any:
    """The ServeOptions of these arguments (imported here: the serving stack loads only to serve)."""
    from kiln.runtime.serve.batcher import BatchOptions
    from kiln.runtime.serve.server import ServeOptions
    from kiln.runtime.session import SessionOptions

    return ServeOptions(
        packages=[Path(p) for p in args.packages],
        names=args.name or [],
        model_repository=args.model_repository,
        model_control_mode=args.model_control_mode,
        load_models=args.load_model,
        repository_poll_seconds=args.repository_poll_secs,
        host=args.host,
        grpc_port=args.grpc_port,
        http_port=args.http_port,
        metrics_port=args.metrics_port,
        max_message_bytes=int(args.max_message_mb * 1024 * 1024),
        batching=BatchOptions(
            max_tokens=args.max_batch_tokens,
            max_size=args.max_batch_size,
            max_delay=args.max_queue_delay_ms / 1000,
            max_queue=args.max_queue,
            max_generating=args.max_generating,
            max_cache_tokens=args.max_cache_tokens,
            instances=args.instances,
        ),
        default_deadline=args.default_deadline or None,
        workers=args.workers,
        session=SessionOptions(provider=args.provider, intra_op_threads=args.threads, spin=args.spin),
        auth_token=args.auth_token or os.environ.get("KILN_AUTH_TOKEN"),
        tls_cert=args.tls_cert and Path(args.tls_cert),
        tls_key=args.tls_key and Path(args.tls_key),
        grace=args.grace,
        drain_seconds=args.drain_seconds,
        max_connection_age=args.grpc_max_connection_age,
        max_connection_age_grace=args.grpc_max_connection_age_grace,
        keepalive_time=args.grpc_keepalive_time,
        keepalive_timeout=args.grpc_keepalive_timeout,
        http_header_timeout=args.http_header_timeout,
        http_body_timeout=args.http_body_timeout,
        chat_template=args.chat_template,
        access_log=args.access_log,
        trace_endpoint=args.trace_endpoint,
    )
