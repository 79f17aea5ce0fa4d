"""`kiln serve`: the models behind gRPC (KServe v2 + kiln.v1 + health + reflection), HTTP (KServe v2
REST + OpenAI embeddings) and a metrics port, every protocol a thin adapter over one data plane."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import ssl
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path

import grpc
from aiohttp import web
from google.protobuf import descriptor_pool
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2
from kiln.proto import grpc_service_pb2, grpc_service_pb2_grpc, kiln_pb2, kiln_pb2_grpc
from kiln.runtime.errors import ConfigError
from kiln.runtime.manifest import read_manifest
from kiln.runtime.serve.batcher import BatchOptions
from kiln.runtime.serve.dataplane import Call, DataPlane
from kiln.runtime.serve.generative import GenerativeModel
from kiln.runtime.serve.http import HttpApi
from kiln.runtime.serve.interceptors import BearerAuth, LenientDecoding
from kiln.runtime.serve.kserve import InferenceService
from kiln.runtime.serve.metrics import Metrics
from kiln.runtime.serve.models import ServedModel
from kiln.runtime.serve.repository import ModelTable, Repository, Source, scan
from kiln.runtime.serve.tracing import start_tracing
from kiln.runtime.serve.typed import KilnService
from kiln.runtime.session import SessionOptions
from kiln.runtime.tasks import spec_for

log = logging.getLogger("kiln.serve")
# how long onnxruntime's pool threads keep spinning when idle (SessionOptions.spin_after_us). Measured
# here, one int8 MiniLM text every 15 ms: at 500-1000 us the threads fell asleep inside a run (6-7 ms
# a run, as slow as one thread); 2 ms kept the speed of onnxruntime's default (4.7 ms; it spins for
# tens of ms) at 13.6 ms of CPU per run instead of 26.6 (5 ms: 18.9).
SPIN_AFTER_RUN_US = 2000
HEALTH_SYNC_SECONDS = 0.5
HTTP_LINGER_SECONDS = 1.0


@dataclass
class ServeOptions:
    packages: list[Path] = field(default_factory=list)
    names: list[str] = field(default_factory=list)
    model_repository: Path | None = None
    model_control_mode: str = "none"  # none | explicit | poll (Triton's)
    load_models: list[str] = field(default_factory=list)  # explicit mode: what to load at start ("*": all)
    repository_poll_seconds: float = 15.0
    host: str = "127.0.0.1"
    grpc_port: int = 8001
    http_port: int = 8000  # 0: no HTTP
    metrics_port: int = 8002  # 0: no metrics
    max_message_bytes: int = 64 * 1024 * 1024
    batching: BatchOptions = field(default_factory=BatchOptions)
    default_deadline: float | None = 30.0
    workers: int = 8
    session: SessionOptions = field(default_factory=SessionOptions)
    auth_token: str | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None
    grace: float = 30.0
    drain_seconds: float = 2.0  # after SIGTERM, served as NOT_SERVING before new calls are refused
    # HTTP/2 connections are long-lived: an L4 balancer pins each client to one replica for good unless
    # the server closes connections now and then (clients reconnect and spread; none of their calls fail)
    max_connection_age: float | None = None  # seconds
    max_connection_age_grace: float = 30.0  # seconds a closing connection's calls get to finish
    keepalive_time: float = 60.0  # seconds between HTTP/2 pings on an idle connection (dead peers found)
    keepalive_timeout: float = 20.0
    # HTTP: a connection must send each request's head within this many seconds of opening or of its
    # last answer (idle keep-alive connections close then too), and each body within http_body_timeout
    http_header_timeout: float = 15.0
    http_body_timeout: float = 30.0
    access_log: bool = False  # a log line per inference request
    trace_endpoint: str | None = None  # OTLP/HTTP collector for OpenTelemetry spans (None: tracing off)
    chat_template: Path | None = None  # generators: the chat template of packages that carry none


def model_names(options: ServeOptions) -> list[str]:
    names = list(options.names) or [p.resolve().name for p in options.packages]
    if len(names) != len(options.packages):
        raise ConfigError(f"{len(options.packages)} packages but {len(names)} --name values")
    duplicates = {n for n in names if names.count(n) > 1}
    if duplicates:
        raise ConfigError(f"two packages would be served as {', '.join(sorted(duplicates))}; use --name")
    return names


def repository(options: ServeOptions, metrics: Metrics) -> Repository:
    """Positional packages (fixed models), or a Triton-style model repository."""
    session = _bounded_spin(options.session)

    def load(source: Source) -> ServedModel | GenerativeModel:
        args = (source.name, source.path, session, options.batching, metrics, source.version)
        if spec_for(read_manifest(source.path).task).generative:
            return GenerativeModel(*args, chat_template=options.chat_template)
        return ServedModel(*args)

    if options.model_repository is not None:
        if options.packages:
            raise ConfigError("give package directories or --model-repository, not both")
        root = options.model_repository
        return Repository(load, scan(root), options.model_control_mode, root, options.grace)
    if not options.packages:
        raise ConfigError("nothing to serve: give package directories or --model-repository")
    if options.model_control_mode != "none":
        raise ConfigError("--model-control-mode needs --model-repository")
    sources = {n: Source(n, "1", p) for n, p in zip(model_names(options), options.packages, strict=True)}
    return Repository(load, sources, "none", None, options.grace)


async def loaded(options: ServeOptions, metrics: Metrics) -> Repository:
    """The repository with what it serves at start loaded (all, or `--load-model` in explicit mode)."""
    models = repository(options, metrics)
    if models.control_mode == "explicit":
        await models.load_all(None if "*" in options.load_models else options.load_models)
    else:
        await models.load_all()
    return models


async def serve(
    options: ServeOptions,
    ready: asyncio.Event | None = None,
    models: ModelTable | None = None,
    metrics: Metrics | None = None,
    reuse_port: bool = False,
) -> int:
    """Serve until SIGTERM, then drain. A front-end process of `--frontends N` passes the models it
    serves through the engine (loaded) and shares its ports with the other front-ends (`reuse_port`)."""
    metrics = metrics or Metrics()
    if models is None:
        models = await loaded(options, metrics)
    tracing = start_tracing(options.trace_endpoint) if options.trace_endpoint else None
    executor = ThreadPoolExecutor(options.workers, "kiln-worker")
    plane = DataPlane(models, executor, metrics, options.default_deadline, options.access_log, tracing)
    server, health_servicer, grpc_port = await _grpc_server(options, plane, reuse_port)
    http = HttpApi(plane, options.auth_token, options.max_message_bytes, options.http_body_timeout)
    runners = [
        await _http_site(http.app(), options, options.http_port, reuse_port),
        await _http_site(metrics.app(), options, options.metrics_port),
    ]
    # SERVING is said before the port answers, so a client that health-checks its connection (kiln's
    # does) is served at once, not refused UNAVAILABLE for the moment between (a restarted front-end)
    for name in [*models.models, ""]:
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    await server.start()
    log.info(
        "serving",
        extra={
            "fields": {
                "grpc": f"{options.host}:{grpc_port}",
                "http": options.http_port or None,
                "metrics_port": options.metrics_port or None,
                "models": list(models.models),
                "model_control_mode": models.control_mode,
                "tls": bool(options.tls_cert),
                "auth": bool(options.auth_token),
            }
        },
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    poller = (
        asyncio.create_task(models.poll(options.repository_poll_seconds, stop))
        if models.control_mode == "poll"
        else None
    )
    health_sync = asyncio.create_task(_sync_health(plane, health_servicer, stop))
    if ready is not None:
        ready.set()
    await stop.wait()
    await health_sync
    started = time.monotonic()
    log.info("draining", extra={"fields": {"grace_s": options.grace, "drain_s": options.drain_seconds}})
    # 1. say so: health turns NOT_SERVING (readiness probes fail, clients watching health move away),
    #    while calls that still arrive are served for drain_seconds, as balancers catch up
    for name in [*models.models, ""]:
        await health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
    await asyncio.sleep(options.drain_seconds)
    # 2. refuse new work with UNAVAILABLE (retryable: nothing was run), finish what was accepted
    plane.draining = True
    await server.stop(options.grace)
    if poller is not None:
        await poller
    for runner in runners:
        if runner is not None:
            await runner.cleanup()
    await models.stop()
    plane.executor.shutdown(wait=True)
    if tracing is not None:
        await asyncio.to_thread(tracing.shutdown)  # the last spans, sent
    log.info("stopped", extra={"fields": {"drain_s": round(time.monotonic() - started, 2), "answered": plane.answered}})
    return 0


async def _sync_health(plane: DataPlane, servicer: health.aio.HealthServicer, stop: asyncio.Event) -> None:
    """grpc.health.v1 follows each model's readiness (a model loaded or unloaded, a generator whose
    decoding loop is restarting), checked every HEALTH_SYNC_SECONDS until the server stops."""
    status = {True: health_pb2.HealthCheckResponse.SERVING, False: health_pb2.HealthCheckResponse.NOT_SERVING}
    shown: dict[str, bool] = {}
    while not stop.is_set():
        names = {*plane.repository.sources, *plane.repository.models, *shown} - {""}
        now = {name: plane.model_ready(name) for name in names} | {"": plane.ready()}
        try:
            for name, ready in now.items():
                if shown.get(name) != ready:
                    await servicer.set(name, status[ready])
            shown = now
        except Exception:  # health must keep following readiness whatever one update did
            log.exception("updating gRPC health failed")
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), HEALTH_SYNC_SECONDS)


def _api_of(method: str) -> str:
    """The metric label of a gRPC method, as its servicer names its calls (ModelInfer: kserve)."""
    rpc = method.rsplit("/", 1)[-1]
    return "kserve" if rpc == "ModelInfer" else rpc


async def _grpc_server(
    options: ServeOptions, plane: DataPlane, reuse_port: bool = False
) -> tuple[grpc.aio.Server, health.aio.HealthServicer, int]:
    interceptors = [plane.tracing.grpc_interceptor()] if plane.tracing else []
    interceptors += [BearerAuth(options.auth_token)] if options.auth_token else []
    interceptors.append(LenientDecoding(lambda method: plane.count(Call(_api_of(method)), "INVALID_ARGUMENT")))
    server = grpc.aio.server(
        interceptors=interceptors,
        options=[*_channel_options(options), ("grpc.so_reuseport", int(reuse_port))],
    )
    grpc_service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(InferenceService(plane), server)
    kiln_pb2_grpc.add_KilnServicer_to_server(KilnService(plane), server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    services = (
        grpc_service_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name,
        kiln_pb2.DESCRIPTOR.services_by_name["Kiln"].full_name,
        health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
        reflection.SERVICE_NAME,
    )
    reflection.enable_server_reflection(services, server, pool=_reflection_pool())
    address = f"{options.host}:{options.grpc_port}"
    if options.tls_cert or options.tls_key:
        port = server.add_secure_port(address, _tls(options))
    else:
        port = server.add_insecure_port(address)
    if port == 0:
        raise ConfigError(f"cannot listen on {address}")
    return server, health_servicer, port


def _channel_options(options: ServeOptions) -> list[tuple[str, int]]:
    ms = lambda seconds: int(seconds * 1000)  # noqa: E731
    settings = [
        ("grpc.max_receive_message_length", options.max_message_bytes),
        ("grpc.max_send_message_length", options.max_message_bytes),
        ("grpc.keepalive_time_ms", ms(options.keepalive_time)),
        ("grpc.keepalive_timeout_ms", ms(options.keepalive_timeout)),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.min_ping_interval_without_data_ms", 10_000),  # clients may ping every 10 s
    ]
    if options.max_connection_age:
        settings += [
            ("grpc.max_connection_age_ms", ms(options.max_connection_age)),
            ("grpc.max_connection_age_grace_ms", ms(options.max_connection_age_grace)),
        ]
    return settings


def _reflection_pool() -> descriptor_pool.DescriptorPool:
    """kiln's KServe messages live in a private descriptor pool (so tritonclient's `inference`
    package can be imported beside them); reflection answers from one pool holding every service."""
    pool = descriptor_pool.DescriptorPool()
    for module in (grpc_service_pb2, kiln_pb2, health_pb2, reflection_pb2):
        pool.AddSerializedFile(module.DESCRIPTOR.serialized_pb)
    return pool


async def _http_site(
    app: web.Application, options: ServeOptions, port: int, reuse_port: bool = False
) -> web.AppRunner | None:
    if not port:
        return None
    # aiohttp closes a connection that sends no complete request head within keepalive_timeout of
    # opening or of its last answer: that is the header read timeout. After an answer given before the
    # body was read (a 408 for a body too slow, a 401, a 413) it reads what is left for lingering_time,
    # then closes: a client trickling its body holds a connection body timeout + HTTP_LINGER_SECONDS
    runner = web.AppRunner(
        app,
        access_log=None,
        handle_signals=False,
        keepalive_timeout=options.http_header_timeout,
        lingering_time=HTTP_LINGER_SECONDS,
    )
    await runner.setup()
    site = web.TCPSite(
        runner,
        options.host,
        port,
        ssl_context=_ssl_context(options),
        shutdown_timeout=options.grace,
        reuse_port=reuse_port or None,
    )
    try:
        await site.start()
    except OSError as exc:
        await runner.cleanup()
        raise ConfigError(f"cannot listen on {options.host}:{port}: {exc.strerror or exc}") from exc
    return runner


def _ssl_context(options: ServeOptions) -> ssl.SSLContext | None:
    if not (options.tls_cert and options.tls_key):
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(str(options.tls_cert), str(options.tls_key))
    return context


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
