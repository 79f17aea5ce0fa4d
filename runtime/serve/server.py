"""`kiln serve`: packages behind one gRPC port (KServe v2 + kiln.v1 + health + reflection)."""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from kiln.proto import grpc_service_pb2, grpc_service_pb2_grpc, kiln_pb2, kiln_pb2_grpc
from kiln.runtime.errors import ConfigError
from kiln.runtime.serve.batcher import BatchOptions
from kiln.runtime.serve.handler import ServerState
from kiln.runtime.serve.kserve import InferenceService
from kiln.runtime.serve.metrics import Metrics
from kiln.runtime.serve.models import ServedModel
from kiln.runtime.serve.typed import KilnService
from kiln.runtime.session import SessionOptions

log = logging.getLogger("kiln.serve")
OPEN_METHODS = ("/grpc.health.v1.Health/", "/grpc.reflection.")  # probes need no token
# how long onnxruntime's pool threads keep spinning when idle (SessionOptions.spin_after_us). Measured
# here, one int8 MiniLM text every 15 ms: at 500-1000 us the threads fell asleep inside a run (6-7 ms
# a run, as slow as one thread); 2 ms kept the speed of onnxruntime's default (4.7 ms; it spins for
# tens of ms) at 13.6 ms of CPU per run instead of 26.6 (5 ms: 18.9).
SPIN_AFTER_RUN_US = 2000


@dataclass
class ServeOptions:
    packages: list[Path]
    names: list[str] = field(default_factory=list)
    host: str = "127.0.0.1"
    port: int = 8001
    max_message_bytes: int = 64 * 1024 * 1024
    batching: BatchOptions = field(default_factory=BatchOptions)
    default_deadline: float | None = 30.0
    workers: int = 8
    session: SessionOptions = field(default_factory=SessionOptions)
    metrics_port: int | None = None
    auth_token: str | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None
    grace: float = 30.0


class _BearerAuth(grpc.aio.ServerInterceptor):
    def __init__(self, token: str):
        self._expected = f"Bearer {token}"

    async def intercept_service(self, continuation, details):
        if details.method.startswith(OPEN_METHODS):
            return await continuation(details)
        if dict(details.invocation_metadata or ()).get("authorization") == self._expected:
            return await continuation(details)
        return _deny_handler()


def _deny_handler() -> grpc.RpcMethodHandler:
    async def deny(request, context):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong bearer token in 'authorization'")

    return grpc.unary_unary_rpc_method_handler(deny)


def model_names(options: ServeOptions) -> list[str]:
    names = list(options.names) or [p.resolve().name for p in options.packages]
    if len(names) != len(options.packages):
        raise ConfigError(f"{len(options.packages)} packages but {len(names)} --name values")
    duplicates = {n for n in names if names.count(n) > 1}
    if duplicates:
        raise ConfigError(f"two packages would be served as {', '.join(sorted(duplicates))}; use --name")
    return names


async def serve(options: ServeOptions, ready: asyncio.Event | None = None) -> int:
    metrics = Metrics()
    models = {
        name: ServedModel(name, path, _bounded_spin(options.session), options.batching, metrics)
        for name, path in zip(model_names(options), options.packages, strict=True)
    }
    state = ServerState(models, ThreadPoolExecutor(options.workers, "kiln-worker"), metrics, options.default_deadline)
    interceptors = [_BearerAuth(options.auth_token)] if options.auth_token else []
    server = grpc.aio.server(
        interceptors=interceptors,
        options=[
            ("grpc.max_receive_message_length", options.max_message_bytes),
            ("grpc.max_send_message_length", options.max_message_bytes),
        ],
    )
    grpc_service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(InferenceService(state), server)
    kiln_pb2_grpc.add_KilnServicer_to_server(KilnService(state), server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    services = (
        grpc_service_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name,
        kiln_pb2.DESCRIPTOR.services_by_name["Kiln"].full_name,
        health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
        reflection.SERVICE_NAME,
    )
    reflection.enable_server_reflection(services, server)
    address = f"{options.host}:{options.port}"
    if options.tls_cert or options.tls_key:
        port = server.add_secure_port(address, _tls(options))
    else:
        port = server.add_insecure_port(address)
    if port == 0:
        raise ConfigError(f"cannot listen on {address}")
    for name in [*models, ""]:
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    if options.metrics_port is not None:
        metrics.serve(options.metrics_port, options.host)
    await server.start()
    log.info(
        "serving",
        extra={
            "fields": {
                "address": f"{options.host}:{port}",
                "models": list(models),
                "tls": bool(options.tls_cert),
                "auth": bool(options.auth_token),
                "metrics_port": options.metrics_port,
            }
        },
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    if ready is not None:
        ready.set()
    await stop.wait()
    started = time.monotonic()
    log.info("draining", extra={"fields": {"grace_s": options.grace}})
    state.draining = True
    for name in [*models, ""]:
        await health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
    await server.stop(options.grace)
    for model in models.values():
        model.stop()
    state.executor.shutdown(wait=True)
    log.info("stopped", extra={"fields": {"drain_s": round(time.monotonic() - started, 2)}})
    return 0


def _bounded_spin(session: SessionOptions) -> SessionOptions:
    """A server caps onnxruntime's spinning (SPIN_AFTER_RUN_US) unless the options set a cap."""
    return session if session.spin_after_us is not None else replace(session, spin_after_us=SPIN_AFTER_RUN_US)


def _tls(options: ServeOptions) -> grpc.ServerCredentials:
    if not (options.tls_cert and options.tls_key):
        raise ConfigError("TLS needs both --tls-cert and --tls-key")
    try:
        return grpc.ssl_server_credentials([(options.tls_key.read_bytes(), options.tls_cert.read_bytes())])
    except OSError as exc:
        raise ConfigError(f"cannot read TLS files: {exc}") from exc


class _Formatter(logging.Formatter):
    def __init__(self, structured: bool):
        super().__init__()
        self.structured = structured

    def format(self, record: logging.LogRecord) -> str:
        fields = getattr(record, "fields", {})
        if self.structured:
            return json.dumps(
                {
                    "ts": round(record.created, 3),
                    "level": record.levelname.lower(),
                    "msg": record.getMessage(),
                    **fields,
                },
                ensure_ascii=False,
            )
        extra = " ".join(f"{k}={v}" for k, v in fields.items())
        return f"{time.strftime('%Y-%m-%dT%H:%M:%S', time.gmtime(record.created))} kiln {record.getMessage()} {extra}"


def configure_logging(structured: bool) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_Formatter(structured))
    logger = logging.getLogger("kiln")
    logger.handlers[:] = [handler]
    logger.setLevel(logging.INFO)
    logger.propagate = False
