"""`kiln serve --frontends N`: one engine process, N front-end processes, and this process to
watch over them (as vLLM splits its API servers from its engine core).

- The engine (kiln.runtime.serve.engine) loads every model's session and batcher once and batches
  the rows of every front-end together.
- Each front-end (kiln.runtime.serve.frontend) runs the gRPC and HTTP servers on the shared ports
  (SO_REUSEPORT: the kernel spreads connections over them) and does the protocol and tokenizer work,
  which in one process is what limits the server (bench/README.md, "The server's own cost").
- This process serves the metrics port, one page summed over every process (prometheus_client's
  multiprocess mode), restarts a front-end or an engine that dies, and on SIGTERM drains the
  front-ends (each as the single process drains: NOT_SERVING, then refusing new calls while
  finishing what it took) before it stops the engine.

Generators decode in the engine (one continuous batch over every front-end's sequences), which
sends their text back as it comes; front-ends check requests and render chat templates. The model
repository is the engine's (load, unload, version swaps, polling); each front-end mirrors it from
the engine's snapshots (frontend.MirroredRepository). Options the single process would refuse are
refused here, before any child starts; an engine that cannot start its models ends the server with
exit code 1 rather than being restarted for ever.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing as mp
import os
import shutil
import signal
import socket
import tempfile
import time
from dataclasses import dataclass, replace
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any

from aiohttp import web
from kiln.runtime.errors import ConfigError, KilnError
from kiln.runtime.manifest import read_manifest
from kiln.runtime.serve.engine import Engine
from kiln.runtime.serve.engine_wire import ModelInfo
from kiln.runtime.serve.frontend import EngineClient, MirroredRepository, RemoteGenerator, RemoteModel
from kiln.runtime.serve.logs import configure_logging
from kiln.runtime.serve.metrics import Metrics
from kiln.runtime.serve.server import ServeOptions, loaded, repository, serve
from kiln.runtime.tasks import spec_for
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest, multiprocess
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

log = logging.getLogger("kiln.serve")
WATCH_SECONDS = 0.2
RESTART_BACKOFF_SECONDS = (0.5, 1, 2, 5)  # a process that keeps dying is restarted ever more slowly
ENGINE_START_SECONDS = 600.0  # how long a front-end waits for the engine to load its models


@dataclass(frozen=True)
class Logging:
    structured: bool = False
    verbose: int = 0


def check_options(options: ServeOptions) -> None:
    """What the single process would refuse at start, refused here before any child starts (names,
    the repository directory, the control mode): a child that cannot start would only be restarted."""
    repository(options, Metrics())


def run(options: ServeOptions, frontends: int, logging_: Logging) -> int:
    """The supervisor's life: start the engine and the front-ends, watch them, drain on SIGTERM."""
    check_options(options)
    if options.grpc_port == 0:  # every front-end must bind the same port
        options = replace(options, grpc_port=_free_port(options.host))
    with tempfile.TemporaryDirectory(prefix="kiln-") as folder:
        metrics_dir = Path(folder) / "metrics"
        metrics_dir.mkdir()
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(metrics_dir)  # children inherit it; set before they start
        try:
            return asyncio.run(_supervise(options, frontends, logging_, Path(folder) / "engine.sock"))
        finally:
            os.environ.pop("PROMETHEUS_MULTIPROC_DIR", None)
            shutil.rmtree(metrics_dir, ignore_errors=True)


class _Child:
    """One supervised process and how to start it again."""

    def __init__(self, name: str, target: Any, args: tuple):
        self.name, self.target, self.args = name, target, args
        self.process: BaseProcess | None = None
        self.restarts = 0
        self.started = 0.0

    def start(self) -> None:
        self.process = mp.get_context("spawn").Process(target=self.target, args=self.args, name=self.name)
        self.process.start()
        self.started = time.monotonic()
        log.info("process started", extra={"fields": {"process": self.name, "pid": self.process.pid}})

    def died(self) -> bool:
        return self.process is not None and not self.process.is_alive()

    def restart_after(self) -> float:
        """Seconds to wait before starting it again: longer while it keeps dying soon after starting."""
        if time.monotonic() - self.started > 30:
            self.restarts = 0
        delay = RESTART_BACKOFF_SECONDS[min(self.restarts, len(RESTART_BACKOFF_SECONDS) - 1)]
        self.restarts += 1
        return delay


async def _supervise(options: ServeOptions, frontends: int, logging_: Logging, engine_socket: Path) -> int:
    engine_started = mp.get_context("spawn").Event()
    engine = _Child("kiln-engine", engine_main, (options, engine_socket, logging_, engine_started))
    fronts = [
        _Child(f"kiln-frontend-{i}", frontend_main, (options, engine_socket, logging_, i)) for i in range(frontends)
    ]
    engine.start()
    for front in fronts:
        front.start()
    metrics = await _metrics_site(options, [engine, *fronts])
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    log.info("supervising", extra={"fields": {"frontends": frontends, "grpc_port": options.grpc_port}})
    code = 0
    while not stop.is_set():
        if engine.died() and not engine_started.is_set():
            log.error("the engine could not start its models (its log says why); stopping")
            code = 1
            break
        for child in (engine, *fronts):
            if child.died():
                await _restart(child, stop)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), WATCH_SECONDS)
    log.info("draining front-ends", extra={"fields": {"frontends": frontends}})
    await _stop(fronts, options.drain_seconds + options.grace + 5)
    await _stop([engine], options.grace + 5)
    if metrics is not None:
        await metrics.cleanup()
    log.info("stopped", extra={"fields": {"exit_code": code}})
    return code


async def _restart(child: _Child, stop: asyncio.Event) -> None:
    assert child.process is not None
    code, pid = child.process.exitcode, child.process.pid
    multiprocess.mark_process_dead(pid)  # its live gauges (queue depth) leave the page
    delay = child.restart_after()
    log.error("process died; restarting", extra={"fields": {"process": child.name, "pid": pid, "exit_code": code,
                                                           "restart_in_s": delay}})  # fmt: skip
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), delay)
    if not stop.is_set():
        child.start()


async def _stop(children: list[_Child], timeout: float) -> None:
    """SIGTERM each and wait for them all; what does not stop in time is killed."""
    for child in children:
        if child.process is not None and child.process.is_alive():
            child.process.terminate()
    end = time.monotonic() + timeout
    for child in children:
        if child.process is None:
            continue
        while child.process.is_alive() and time.monotonic() < end:
            await asyncio.sleep(0.05)
        if child.process.is_alive():
            log.error("process did not stop in time; killing it", extra={"fields": {"process": child.name}})
            child.process.kill()
        child.process.join()


async def _metrics_site(options: ServeOptions, children: list[_Child]) -> web.AppRunner | None:
    """/metrics, summed over every process (the engine's batches, every front-end's requests)."""
    if not options.metrics_port:
        return None
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry)
    registry.register(_ProcessesCollector(children))

    async def metrics(request: web.Request) -> web.Response:
        body = await asyncio.to_thread(generate_latest, registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    app = web.Application()
    app.router.add_get("/metrics", metrics)
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    try:
        await web.TCPSite(runner, options.host, options.metrics_port).start()
    except OSError as exc:
        await runner.cleanup()
        raise ConfigError(f"cannot listen on {options.host}:{options.metrics_port}: {exc.strerror or exc}") from exc
    return runner


class _ProcessesCollector:
    """The standard process metrics, one sample per process of the layout (label `process`: the
    supervisor, kiln-engine, kiln-frontend-<i>), read from /proc when the page is asked for."""

    def __init__(self, children: list[_Child]):
        self.children = children

    def collect(self) -> Any:
        memory = GaugeMetricFamily("process_resident_memory_bytes", "Resident memory size in bytes", labels=["process"])
        cpu = CounterMetricFamily("process_cpu_seconds", "User and system CPU time in seconds", labels=["process"])
        processes = [("kiln-supervisor", os.getpid())]
        processes += [(c.name, c.process.pid) for c in self.children if c.process is not None and c.process.is_alive()]
        ticks, page = os.sysconf("SC_CLK_TCK"), os.sysconf("SC_PAGE_SIZE")
        for name, pid in processes:
            with contextlib.suppress(OSError, ValueError, IndexError):
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
                cpu.add_metric([name], (int(fields[11]) + int(fields[12])) / ticks)
                memory.add_metric([name], int(fields[21]) * page)
        yield memory
        yield cpu


def _free_port(host: str) -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


# ---- the children's entry points (spawned: a fresh interpreter each) ----------------------------


def _child(name: str) -> None:
    """A child's first step: its name as `ps`, `top` and /proc/PID/comm show it (15 characters at
    most), and SIGTERM (a drain) when the supervisor dies, killed or not, so no child is orphaned."""
    import ctypes

    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None)
        libc.prctl(15, name.encode()[:15], 0, 0, 0)  # PR_SET_NAME
        libc.prctl(1, signal.SIGTERM, 0, 0, 0)  # PR_SET_PDEATHSIG
    if os.getppid() == 1:  # the supervisor died before the line above: nothing would tell us
        raise SystemExit(1)


def engine_main(options: ServeOptions, engine_socket: Path, logging_: Logging, started: Any) -> None:
    _child("kiln-engine")
    configure_logging(logging_.structured, logging_.verbose)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # ^C reaches the whole group; the supervisor decides
    try:
        asyncio.run(_engine(options, engine_socket, started))
    except KilnError as exc:
        log.error("engine cannot start: %s", exc)
        raise SystemExit(1) from exc


async def _engine(options: ServeOptions, engine_socket: Path, started: Any) -> None:
    models = await loaded(options, Metrics())
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    poller = None
    if models.control_mode == "poll":
        poller = asyncio.create_task(models.poll(options.repository_poll_seconds, stop))
    log.info("engine serving", extra={"fields": {"models": list(models.models), "socket": str(engine_socket)}})
    await Engine(models).serve(engine_socket, stop, started.set)
    if poller is not None:
        await poller
    await models.stop()


def frontend_main(options: ServeOptions, engine_socket: Path, logging_: Logging, index: int = 0) -> None:
    _child(f"kiln-frontend-{index}")
    configure_logging(logging_.structured, logging_.verbose)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    asyncio.run(_frontend(options, engine_socket))


async def _frontend(options: ServeOptions, engine_socket: Path) -> int:
    client = EngineClient(engine_socket)
    metrics = Metrics()

    def build(info: ModelInfo) -> RemoteModel | RemoteGenerator:
        if spec_for(read_manifest(Path(info.path)).task).generative:
            return RemoteGenerator(info, client, metrics, options.chat_template)
        return RemoteModel(info, client, metrics)

    snapshot = await client.start(ENGINE_START_SECONDS)
    models = MirroredRepository(client, build, snapshot)
    await models.mirror(snapshot)
    try:
        return await serve(replace(options, metrics_port=0), models=models, metrics=metrics, reuse_port=True)
    finally:
        await client.close()
