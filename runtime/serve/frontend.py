"""A front-end process of `kiln serve --frontends N`: the same protocols and data plane as the
single process, over models whose rows run in the engine process (kiln.runtime.serve.engine).

Each front-end decodes its calls, validates and tokenizes on its own interpreter, sends token rows
to the engine, and finishes and encodes the answers when the outputs come back, so N front-ends
spread the Python work of serving over N interpreters while one engine batches for the device.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
from concurrent.futures import Executor
from pathlib import Path
from typing import Any

import numpy as np
from kiln.runtime.errors import InvalidInput, ModelUnavailable
from kiln.runtime.package import load_tokenizing_package
from kiln.runtime.pipelines import Pipeline
from kiln.runtime.pipelines.base import Outputs
from kiln.runtime.serve import engine_wire as wire
from kiln.runtime.serve.batcher import BatchOptions, RequestState
from kiln.runtime.serve.engine import raise_error
from kiln.runtime.serve.metrics import Metrics
from kiln.runtime.serve.models import Counted
from kiln.runtime.tasks import TaskSpec, spec_for

log = logging.getLogger("kiln.serve")
RECONNECT_SECONDS = 0.1


class EngineClient:
    """A front-end's connection to the engine: each Run goes out as a frame and its caller waits for
    the matching Ran, which a reader task hands over. If the engine goes away, every waiting call
    fails at once with UNAVAILABLE (nothing hangs to its deadline; clients retry it), readiness
    turns NOT_SERVING, and the client reconnects until an engine answers again."""

    def __init__(self, path: Path):
        self.path = path
        self.hello: wire.Hello | None = None
        self.connected = asyncio.Event()
        self._writer: asyncio.StreamWriter | None = None
        self._waiting: dict[int, asyncio.Future] = {}
        self._ids = itertools.count()
        self._task: asyncio.Task | None = None

    async def start(self, timeout: float) -> wire.Hello:
        """Connect (retrying while the engine starts) and return what it serves."""
        self._task = asyncio.create_task(self._keep_connected())
        await asyncio.wait_for(self.connected.wait(), timeout)
        assert self.hello is not None
        return self.hello

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _keep_connected(self) -> None:
        while True:
            try:
                reader, self._writer = await asyncio.open_unix_connection(str(self.path))
                hello = await wire.read(reader)
                if not isinstance(hello, wire.Hello):
                    raise ConnectionError(f"the engine opened with {type(hello).__name__}, not Hello")
                self.hello = hello
                self.connected.set()
                log.info("engine connected", extra={"fields": {"models": [m.name for m in hello.models]}})
                while True:
                    self._settle(await wire.read(reader))
            except (OSError, ConnectionError, asyncio.IncompleteReadError) as exc:
                if self.connected.is_set():
                    log.error("engine connection lost (%s); failing %d calls", exc, len(self._waiting))
                self._lost()
            await asyncio.sleep(RECONNECT_SECONDS)

    def _settle(self, message: wire.Message) -> None:
        if isinstance(message, wire.Ran | wire.StatisticsAre):
            future = self._waiting.pop(message.id, None)
            if future is not None and not future.done():
                future.set_result(message)

    def _lost(self) -> None:
        self.connected.clear()
        self._writer = None
        waiting, self._waiting = self._waiting, {}
        for future in waiting.values():
            if not future.done():
                future.set_exception(ModelUnavailable("the engine process stopped; retry"))

    def _send(self, message: wire.Message) -> None:
        if self._writer is None or not self.connected.is_set():
            raise ModelUnavailable("the engine process is not running; retry")
        self._writer.write(wire.frame(message))

    async def _ask(self, message: wire.Run | wire.Statistics) -> Any:
        future = asyncio.get_running_loop().create_future()
        self._waiting[message.id] = future
        try:
            self._send(message)
        except BaseException:
            self._waiting.pop(message.id, None)
            raise
        try:
            return await future
        except asyncio.CancelledError:  # the caller went away: the engine drops what is still queued
            self._waiting.pop(message.id, None)
            with contextlib.suppress(ModelUnavailable):
                self._send(wire.Cancel(message.id))
            raise

    async def run(self, model: RemoteModel, rows: list[Any], state: RequestState, company: bool) -> Outputs:
        ids = [np.asarray(row.ids, dtype=np.int64).tobytes() for row in rows]
        types = [np.asarray(row.type_ids, dtype=np.int64).tobytes() for row in rows]
        run = wire.Run(next(self._ids), model.name, model.version, state.deadline, company, ids, types)
        ran: wire.Ran = await self._ask(run)
        for stage, start, end in ran.stages:
            state.add_stage(stage, start, end)
        if ran.error is not None:
            raise_error(ran.error)
        assert ran.outputs is not None
        return [{name: array.numpy() for name, array in row.items()} for row in ran.outputs]

    def done(self, done: wire.Done) -> None:
        with contextlib.suppress(ModelUnavailable):  # statistics lost with an engine that went away
            self._send(done)

    async def statistics(self, name: str, version: str) -> dict[str, Any]:
        answer: wire.StatisticsAre = await self._ask(wire.Statistics(next(self._ids), name, version))
        body = json.loads(answer.body)
        if "error" in body:
            raise_error(tuple(body["error"]))
        return body


class RemoteModel(Counted):
    """A model as a front-end serves it: its tokenizer and pipeline here, its session in the engine.
    Admission control is the engine's (`--max-queue` counts every front-end's rows), and so are
    Triton's statistics (each request's outcome is sent there)."""

    def __init__(self, info: wire.ModelInfo, client: EngineClient, metrics: Metrics):
        self.name, self.version, self.path = info.name, info.version, Path(info.path)
        self.package = load_tokenizing_package(self.path)
        self.manifest = self.package.manifest
        self.spec: TaskSpec = spec_for(self.manifest.task)
        self.provider = info.provider
        self.pipeline: Pipeline = self.spec.pipeline(self.package)
        self.metrics = metrics
        super().__init__()
        self.max_queue = info.max_queue
        self.options = BatchOptions(
            max_tokens=info.max_tokens, max_size=info.max_size, max_delay=info.max_delay,
            max_queue=info.max_queue, instances=info.instances,
        )  # fmt: skip
        self.sizes = dict(info.sizes)
        self.client = client

    @property
    def healthy(self) -> bool:
        return self.client.connected.is_set()

    def admit(self, items: int) -> None:
        if items > self.max_queue:
            raise InvalidInput(
                f"request has {items} items; model {self.name} takes at most {self.max_queue} in one request "
                "(--max-queue)"
            )

    def release(self, items: int) -> None:
        pass

    def record_result(self, ok: bool, seconds: float, count: int, stages: dict[str, float]) -> None:
        self.client.done(wire.Done(self.name, ok, seconds, count, dict(stages)))

    async def collected_statistics(self) -> dict[str, Any]:
        return (await self.client.statistics(self.name, self.version))["model_stats"][0]

    async def run(self, prepare: Any, request: RequestState, executor: Executor, short: bool = False) -> Any:
        """prepare -> the engine -> finish; a short request is prepared and finished on the loop."""
        loop = asyncio.get_running_loop()
        if short:
            prepared = self.timed_prepare(prepare, request)
        else:
            prepared = await loop.run_in_executor(executor, self.timed_prepare, prepare, request)
        outputs = await self.client.run(self, prepared.encodings, request, self.others_in_progress)
        if short:
            return self.finish(prepared, outputs, request)
        return await loop.run_in_executor(executor, self.finish, prepared, outputs, request)

    async def run_tokens(self, sequences: list[Any], request: RequestState, executor: Executor) -> Outputs:
        return await self.client.run(self, sequences, request, self.others_in_progress)

    def stop(self) -> None:
        pass
