"""`kiln serve` arguments and the ServeOptions they make (ports as Triton's: HTTP 8000, gRPC 8001,
metrics 8002)."""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from pathlib import Path
from typing import Any

CONTROL_MODES = ("none", "explicit", "poll")  # Triton's model control modes
ENV_PREFIX = "KILN_"
BOOLEANS = {"1": True, "true": True, "yes": True, "on": True, "0": False, "false": False, "no": False, "off": False}
ENVIRONMENT_HELP = (
    "Every flag can also come from the environment as KILN_<FLAG> (KILN_GRPC_PORT=8001, "
    "KILN_ACCESS_LOG=true, KILN_NAME=a,b for a repeated flag); a flag given here wins."
)


def add_serve_arguments(serve: argparse.ArgumentParser) -> None:
    serve.add_argument("packages", nargs="*", help="package directories (or --model-repository)")
    serve.add_argument("--name", action="append", help="model name per package (default: directory name)")
    serve.add_argument("--model-repository", type=Path, help="a Triton-style model repository directory")
    serve.add_argument("--model-control-mode", choices=CONTROL_MODES, default="none", help="as Triton's")
    serve.add_argument(
        "--load-model", action="append", default=[], help="explicit mode: a model to load at start ('*': all)"
    )
    serve.add_argument("--repository-poll-secs", type=float, default=15.0, help="poll mode: seconds between scans")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    serve.add_argument("--grpc-port", "--port", dest="grpc_port", type=int, default=8001, help="gRPC port")
    serve.add_argument("--http-port", type=int, default=8000, help="KServe v2 REST and OpenAI embeddings (0: off)")
    serve.add_argument("--metrics-port", type=int, default=8002, help="Prometheus /metrics (0: off)")
    serve.add_argument("--max-message-mb", type=float, default=64, help="largest request or response, MiB")
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
    serve.add_argument("--max-batch-size", type=int, default=64, help="rows per batch")
    serve.add_argument(
        "--max-queue-delay-ms", type=float, default=2.0, help="how long a row may wait for others to batch with"
    )
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
        "--frontends",
        type=frontend_count,
        default=0,
        help="front-end processes sharing the ports, each decoding, tokenizing and encoding, in front of one "
        "engine process that batches and decodes for the device (0: everything in this one process; auto: "
        "half the cores the CPU quota allows, at least 1; see docs/serving.md)",
    )
    serve.add_argument(
        "--instances", type=int, default=0, help="batches run at once per model (0: one per core on CPU, 1 on a GPU)"
    )
    serve.add_argument(
        "--lone-cores",
        choices=("auto", "all", "one"),
        default="auto",
        help="CPU with several instances: a batch that runs alone gets every core (all), one (one), or every "
        "core where a row runs measurably faster on them, timed when the model loads (auto)",
    )
    serve.add_argument(
        "--spin",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="let onnxruntime's pool threads busy-wait between ops (lower latency, more CPU)",
    )
    serve.add_argument("--provider", default="cpu", help="cpu | cuda | tensorrt | auto")
    serve.add_argument(
        "--cuda-graphs",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="encoders on cuda: capture a CUDA graph per batch/length shape (batch <= 8) and replay it",
    )
    serve.add_argument(
        "--cache-dir",
        type=Path,
        help="writable state (TensorRT engines); packages are only read (default: ~/.cache/kiln, else /tmp/kiln-cache)",
    )
    serve.add_argument("--auth-token", help="require 'authorization: Bearer TOKEN'")
    serve.add_argument("--tls-cert", help="PEM certificate chain (TLS on gRPC and HTTP)")
    serve.add_argument("--tls-key", help="PEM private key")
    serve.add_argument("--grace", type=float, default=30.0, help="seconds accepted calls get to finish on SIGTERM")
    serve.add_argument(
        "--drain-seconds",
        type=float,
        default=2.0,
        help="after SIGTERM: seconds the server keeps serving while reporting NOT_SERVING, before refusing calls",
    )
    serve.add_argument("--log-format", choices=["text", "json"], default="text", help="log lines as text or JSON")
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
    # Triton's names, in Triton's units (milliseconds)
    serve.add_argument("--grpc-keepalive-time", type=int, default=60000, help="ms between keepalive pings, as Triton's")
    serve.add_argument("--grpc-keepalive-timeout", type=int, default=20000, help="ms to wait for a ping's ack")


def frontend_count(value: str) -> int:
    """--frontends: a count, or `auto`. The engine's sessions want cores as much as the front-ends do,
    so auto gives the front-ends half of what the CPU quota (cgroup) or affinity allows."""
    if value == "auto":
        from kiln.runtime.session import cpu_count

        return max(1, cpu_count() // 2)
    try:
        count = int(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"must be a number or auto, got {value!r}") from exc
    if count < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {count}")
    return count


def take_environment(parser: argparse.ArgumentParser, environ: Mapping[str, str]) -> None:
    """Every flag's default from KILN_<FLAG> where that is set (KILN_GRPC_PORT=8001,
    KILN_ACCESS_LOG=true, KILN_NAME=a,b), as TEI and Infinity take theirs: how Kubernetes manifests
    configure a server. A flag on the command line still wins; a value that does not parse is an
    error that names the variable."""
    for action in parser._actions:
        if not action.dest or action.dest == "help":
            continue
        variable = ENV_PREFIX + action.dest.upper()
        if variable in environ:
            action.default = _from_environment(parser, action, variable, environ[variable])
            action.required = False


def _from_environment(parser: argparse.ArgumentParser, action: argparse.Action, variable: str, raw: str) -> Any:
    if action.nargs == 0 or isinstance(action, argparse.BooleanOptionalAction):  # a switch
        if raw.strip().lower() not in BOOLEANS:
            parser.error(f"{variable}={raw!r}: expected one of {', '.join(sorted(BOOLEANS))}")
        return BOOLEANS[raw.strip().lower()]
    many = isinstance(action, argparse._AppendAction) or action.nargs in ("*", "+")
    values = [v.strip() for v in raw.split(",") if v.strip()] if many else [raw]
    converted = []
    for value in values:
        try:
            value = action.type(value) if action.type else value
        except (TypeError, ValueError):
            parser.error(f"{variable}={raw!r}: not a valid {getattr(action.type, '__name__', 'value')}")
        if action.choices is not None and value not in action.choices:
            parser.error(f"{variable}={raw!r}: choose from {', '.join(map(str, action.choices))}")
        converted.append(value)
    return converted if many else converted[0]


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
            lone_cores=args.lone_cores,
        ),
        default_deadline=args.default_deadline or None,
        workers=args.workers,
        session=SessionOptions(
            provider=args.provider,
            intra_op_threads=args.threads,
            spin=args.spin,
            cache_dir=args.cache_dir,
            cuda_graphs=args.cuda_graphs,
        ),
        auth_token=args.auth_token,
        tls_cert=args.tls_cert and Path(args.tls_cert),
        tls_key=args.tls_key and Path(args.tls_key),
        grace=args.grace,
        drain_seconds=args.drain_seconds,
        max_connection_age=args.grpc_max_connection_age,
        max_connection_age_grace=args.grpc_max_connection_age_grace,
        keepalive_time=args.grpc_keepalive_time / 1000,
        keepalive_timeout=args.grpc_keepalive_timeout / 1000,
        http_header_timeout=args.http_header_timeout,
        http_body_timeout=args.http_body_timeout,
        chat_template=args.chat_template,
        access_log=args.access_log,
        trace_endpoint=args.trace_endpoint,
    )
