"""`kiln serve` in a subprocess on free loopback ports, as the server tests and examples run it."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

# the process layouts a module's shared server runs its tests on: one process, and two front-ends before
# an engine (`kiln serve --frontends N`); use as @pytest.fixture(scope="module", **LAYOUTS) and pass
# "--frontends", request.param
LAYOUTS = {"params": ["0", "2"], "ids": ["one-process", "frontends-2"]}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class Running:
    """A running server: its gRPC address, HTTP base URL, metrics URL and process. Unpacks as
    (address, metrics_url, process)."""

    address: str
    http: str
    metrics_url: str
    process: subprocess.Popen

    def __iter__(self) -> Iterator:
        return iter((self.address, self.metrics_url, self.process))

    def __getitem__(self, index: int):
        return tuple(self)[index]


@contextmanager
def running_server(
    *args: str,
    models: dict[str, Path] | None = None,
    tls: tuple[Path, Path] | None = None,
    ports: tuple[int, int, int] | None = None,
) -> Iterator[Running]:
    """Start `kiln serve` on free ports (or the given gRPC, HTTP and metrics ports; packages by name,
    and/or flags); stop it with SIGTERM."""
    grpc_port, http_port, metrics_port = ports or (free_port(), free_port(), free_port())
    command = [sys.executable, "-m", "kiln.runtime.cli", "serve", *map(str, (models or {}).values())]
    for name in models or {}:
        command += ["--name", name]
    command += ["--grpc-port", str(grpc_port), "--http-port", str(http_port), "--metrics-port", str(metrics_port)]
    command += list(args)
    if tls:
        command += ["--tls-cert", str(tls[0]), "--tls-key", str(tls[1])]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    scheme = "https" if tls else "http"
    running = Running(
        f"127.0.0.1:{grpc_port}",
        f"{scheme}://127.0.0.1:{http_port}",
        f"http://127.0.0.1:{metrics_port}/metrics",
        process,
    )
    try:
        wait_listening(grpc_port, process)
        wait_listening(http_port, process)
        yield running
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()


def wait_listening(port: int, process: subprocess.Popen, timeout: float = 60) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if process.poll() is not None:
            raise RuntimeError(f"server exited: {process.stderr.read()}")
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise RuntimeError("server did not start")


def metric(url: str, name: str, **labels: str) -> float:
    """The sum of a Prometheus metric's samples with these labels, read from the metrics page."""
    text = urllib.request.urlopen(url, timeout=5).read().decode()
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name) and all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def burst(address: str, method: str, requests: list, timeout: float, cancel_after: float | None = None) -> list[str]:
    """kiln.v1 calls sent all at once (grpc.aio writes them together, so the server holds them at the
    same time, as a burst from many clients would arrive); each call's status name, in order. A request
    alone on an idle model runs at once, so tests of queueing need calls that arrive together."""
    import asyncio

    import grpc
    from kiln.proto import kiln_pb2_grpc

    async def send() -> list[str]:
        async with grpc.aio.insecure_channel(address) as channel:
            await channel.channel_ready()
            call = getattr(kiln_pb2_grpc.KilnStub(channel), method)
            tasks = [asyncio.ensure_future(call(request, timeout=timeout)) for request in requests]
            if cancel_after is not None:
                await asyncio.sleep(cancel_after)
                for task in tasks:
                    task.cancel()
            results = await asyncio.gather(*tasks, return_exceptions=True)
        return [
            "OK"
            if not isinstance(r, BaseException)
            else r.code().name
            if isinstance(r, grpc.aio.AioRpcError)
            else "CANCELLED"
            for r in results
        ]

    return asyncio.run(send())
