"""The clients users run, as load generators: one text per request, asyncio, closed and open loops.

- KServe v2 over gRPC through Triton's own client (tritonclient's grpc.aio), as Triton users call;
- KServe v2 over HTTP through a standard HTTP client (aiohttp), JSON tensors, as curl would;
- kiln.v1 (the typed API) through its generated gRPC stub.

A closed loop keeps `concurrency` callers busy; an open loop sends at Poisson arrival times and
measures each request's latency from the time it was due (no coordinated omission).
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections.abc import Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from typing import Any

import numpy as np

Send = Callable[[str], Awaitable[None]]


@dataclass
class Target:
    """A model on a running server, as a client addresses it."""

    grpc: str  # host:port
    http: str | None  # http://host:port, or None
    model: str
    input_name: str = "text"  # the BYTES input the text goes in
    task: str = "text-classification"


class KServeGrpc(AbstractAsyncContextManager):
    name = "KServe gRPC (tritonclient)"

    def __init__(self, target: Target):
        self.target = target

    async def __aenter__(self) -> Send:
        import tritonclient.grpc.aio as triton

        self._client = triton.InferenceServerClient(self.target.grpc)

        async def send(text: str) -> None:
            tensor = triton.InferInput(self.target.input_name, [1], "BYTES")
            tensor.set_data_from_numpy(np.array([text.encode()], dtype=object))
            await self._client.infer(self.target.model, [tensor], client_timeout=60)

        return send

    async def __aexit__(self, *exc: object) -> None:
        await self._client.close()


class KServeHttp(AbstractAsyncContextManager):
    name = "KServe REST (aiohttp)"

    def __init__(self, target: Target):
        self.target = target

    async def __aenter__(self) -> Send:
        import aiohttp

        if not self.target.http:
            raise SystemExit("KServe REST needs the server's HTTP address")
        self._session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
        url = f"{self.target.http}/v2/models/{self.target.model}/infer"

        async def send(text: str) -> None:
            body = {"inputs": [{"name": self.target.input_name, "datatype": "BYTES", "shape": [1], "data": [text]}]}
            async with self._session.post(url, data=json.dumps(body), timeout=aiohttp.ClientTimeout(60)) as reply:
                payload = await reply.read()
                if reply.status != 200:
                    raise RequestFailed(f"HTTP {reply.status}: {payload[:200]!r}")

        return send

    async def __aexit__(self, *exc: object) -> None:
        await self._session.close()


class KilnTyped(AbstractAsyncContextManager):
    name = "kiln.v1 (typed gRPC)"

    def __init__(self, target: Target):
        self.target = target

    async def __aenter__(self) -> Send:
        import grpc
        from kiln.proto import kiln_pb2 as pb
        from kiln.proto import kiln_pb2_grpc
        from kiln.runtime.serve.typed_codec import CODECS

        self._channel = grpc.aio.insecure_channel(self.target.grpc)
        rpc = CODECS[self.target.task].rpc
        call = getattr(kiln_pb2_grpc.KilnStub(self._channel), rpc)
        message = getattr(pb, f"{rpc}Request")
        field_name = message.DESCRIPTOR.fields[1].name  # the repeated texts after `model`

        async def send(text: str) -> None:
            await call(message(model=self.target.model, **{field_name: [text]}), timeout=60)

        return send

    async def __aexit__(self, *exc: object) -> None:
        await self._channel.close()


PROTOCOLS: dict[str, type] = {"kserve-grpc": KServeGrpc, "kserve-http": KServeHttp, "typed": KilnTyped}


class RequestFailed(Exception):
    """A request the server answered with an error."""


@dataclass
class Run:
    latencies: list[float] = field(default_factory=list)
    wall: float = 0.0
    errors: int = 0


def _is_failure(exc: BaseException) -> bool:
    import grpc
    from tritonclient.utils import InferenceServerException

    return isinstance(exc, RequestFailed | InferenceServerException | grpc.RpcError | OSError | TimeoutError)


async def closed_loop(client: AbstractAsyncContextManager, texts: list[str], concurrency: int, requests: int) -> Run:
    run = Run()
    queue = iter(range(requests))
    async with client as send:

        async def caller() -> None:
            for index in queue:
                start = time.perf_counter()
                try:
                    await send(texts[index % len(texts)])
                    run.latencies.append(time.perf_counter() - start)
                except Exception as exc:
                    if not _is_failure(exc):
                        raise
                    run.errors += 1

        start = time.perf_counter()
        await asyncio.gather(*(caller() for _ in range(concurrency)))
        run.wall = time.perf_counter() - start
    return run


async def open_loop(client: AbstractAsyncContextManager, texts: list[str], rate: float, seconds: float) -> Run:
    run = Run()
    rng = random.Random(0)
    async with client as send:

        async def one(index: int, due: float) -> None:
            try:
                await send(texts[index % len(texts)])
                run.latencies.append(time.perf_counter() - due)
            except Exception as exc:
                if not _is_failure(exc):
                    raise
                run.errors += 1

        tasks, start, at, index = [], time.perf_counter(), 0.0, 0
        while at < seconds:
            await asyncio.sleep(max(0.0, start + at - time.perf_counter()))
            tasks.append(asyncio.create_task(one(index, start + at)))
            index += 1
            at += rng.expovariate(rate)  # Poisson arrivals
        await asyncio.gather(*tasks)
        run.wall = time.perf_counter() - start
    return run


def discover(grpc_address: str, http: str | None, model: str) -> Target:
    """A running server's model: its text input and task, from KServe metadata (any KServe v2
    server with a BYTES input works; the task is kiln's, read from the model configuration)."""
    import tritonclient.grpc as triton

    client = triton.InferenceServerClient(grpc_address)
    metadata = client.get_model_metadata(model)
    text_inputs = [i.name for i in metadata.inputs if i.datatype == "BYTES"]
    if not text_inputs:
        raise SystemExit(f"model {model!r} at {grpc_address} takes no BYTES (text) input")
    task = "text-classification"
    try:
        parameters = client.get_model_config(model).config.parameters
        task = parameters["task"].string_value or task if "task" in parameters else task
    except Exception:  # a server without the configuration extension: the typed API is not measured
        pass
    return Target(grpc_address, http, model, text_inputs[0], task)


def run_sync(coroutine: Awaitable[Any]) -> Any:
    return asyncio.run(coroutine)
