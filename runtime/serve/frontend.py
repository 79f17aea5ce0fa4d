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
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import Executor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec
import numpy as np
from kiln.runtime.errors import DeadlineExceeded, InvalidInput, ModelUnavailable
from kiln.runtime.generation.decoding import Piece
from kiln.runtime.generation.package import load_generator
from kiln.runtime.package import load_tokenizing_package
from kiln.runtime.pipelines import Pipeline
from kiln.runtime.pipelines.base import Outputs
from kiln.runtime.serve import engine_wire as wire
from kiln.runtime.serve.batcher import BatchOptions, RequestState
from kiln.runtime.serve.counted import Counted
from kiln.runtime.serve.engine import raise_error
from kiln.runtime.serve.generative import Generative
from kiln.runtime.serve.metrics import Metrics
from kiln.runtime.serve.repository import IndexEntry, ModelTable, Source
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
        self.models: wire.Models | None = None  # the engine's latest snapshot
        # a MirroredRepository's: takes a snapshot, returns the models it replaced
        self.on_models: Callable[[wire.Models], Awaitable[list[Counted]]] | None = None
        self.connected = asyncio.Event()
        self._writer: asyncio.StreamWriter | None = None
        self._outbox: wire.Outbox | None = None  # the writer's, written once per turn of the loop
        self._waiting: dict[int, asyncio.Future] = {}
        self._streams: dict[int, list[asyncio.Queue]] = {}  # a Generate's id -> each prompt's pieces
        self._ids = itertools.count()
        self._task: asyncio.Task | None = None
        self._acks: set[asyncio.Task] = set()

    async def start(self, timeout: float) -> wire.Models:
        """Connect (retrying while the engine starts) and return what it serves."""
        self._task = asyncio.create_task(self._keep_connected())
        await asyncio.wait_for(self.connected.wait(), timeout)
        assert self.models is not None
        return self.models

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _keep_connected(self) -> None:
        while True:
            try:
                reader, self._writer = await asyncio.open_unix_connection(str(self.path))
                self._outbox = wire.Outbox(self._writer)
                models = await wire.read(reader)
                if not isinstance(models, wire.Models):
                    raise ConnectionError(f"the engine opened with {type(models).__name__}, not Models")
                await self._mirror(models)  # an engine restarted may serve another set
                self.connected.set()
                log.info("engine connected", extra={"fields": {"models": [m.name for m in models.models]}})
                while True:
                    message = await wire.read(reader)
                    if isinstance(message, wire.Models):
                        await self._mirror(message)  # in order: before the Changed that follows it
                    else:
                        self._settle(message)
            except (OSError, ConnectionError, asyncio.IncompleteReadError, msgspec.DecodeError) as exc:
                if self.connected.is_set():
                    log.error("engine connection lost (%s); failing %d calls", exc, len(self._waiting))
                if self._writer is not None:
                    self._writer.close()
                self._lost()
            await asyncio.sleep(RECONNECT_SECONDS)

    async def _mirror(self, models: wire.Models) -> None:
        """Take the engine's snapshot, and once the requests that hold a replaced model here are done,
        say so: the engine frees a replaced version only when no front-end can send work for it."""
        self.models = models
        replaced = await self.on_models(models) if self.on_models is not None else []
        task = asyncio.get_running_loop().create_task(self._mirrored(models.generation, replaced))
        self._acks.add(task)
        task.add_done_callback(self._acks.discard)

    async def _mirrored(self, generation: int, replaced: list[Counted]) -> None:
        while any(model.in_flight for model in replaced):
            await asyncio.sleep(0.01)
        with contextlib.suppress(ModelUnavailable):
            self._send(wire.Mirrored(generation))

    def _settle(self, message: wire.Message) -> None:
        if isinstance(message, wire.Pieces):
            queues = self._streams.get(message.id)
            if queues is not None:
                queues[message.index].put_nowait(message)
            return
        if isinstance(message, wire.Ran | wire.StatisticsAre | wire.Opened | wire.Changed):
            future = self._waiting.pop(message.id, None)
            if future is not None and not future.done():
                future.set_result(message)

    def _lost(self) -> None:
        self.connected.clear()
        self._writer = self._outbox = None
        waiting, self._waiting = self._waiting, {}
        for future in waiting.values():
            if not future.done():
                future.set_exception(ModelUnavailable("the engine process stopped; retry"))
        streams, self._streams = self._streams, {}
        for queues in streams.values():
            for queue in queues:
                queue.put_nowait(wire.Pieces(-1, 0, [], ("ModelUnavailable", "the engine process stopped; retry")))

    def _send(self, message: wire.Message) -> None:
        if self._outbox is None or not self.connected.is_set():
            raise ModelUnavailable("the engine process is not running; retry")
        self._outbox.send(message)

    async def _ask(self, message: wire.Run | wire.Statistics | wire.Generate | wire.Change) -> Any:
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

    async def generate(
        self, model: RemoteGenerator, prompts: list[str], params: dict[str, Any], state: RequestState
    ) -> list[RemoteStream]:
        ask = wire.Generate(next(self._ids), model.name, model.version, state.deadline, prompts, params)
        queues: list[asyncio.Queue] = [asyncio.Queue() for _ in prompts]
        self._streams[ask.id] = queues
        try:
            opened: wire.Opened = await self._ask(ask)
            if opened.error is not None:
                raise_error(opened.error)
        except BaseException:
            self._streams.pop(ask.id, None)
            raise
        ended = set[int]()

        def cancel(index: int) -> None:  # the request is over once every stream is: then it is forgotten
            ended.add(index)
            if len(ended) == len(queues) and self._streams.pop(ask.id, None) is not None:
                with contextlib.suppress(ModelUnavailable):
                    self._send(wire.Cancel(ask.id))  # whatever still decodes stops (a no-op once all ended)

        return [
            RemoteStream(queue, prefix, prompt_tokens, truncated, lambda i=i: cancel(i))
            for i, (queue, (prefix, prompt_tokens, truncated)) in enumerate(zip(queues, opened.streams, strict=True))
        ]

    async def change(self, action: str, name: str) -> None:
        """A repository load or unload, done by the engine and mirrored here before it returns."""
        changed: wire.Changed = await self._ask(wire.Change(next(self._ids), action, name))
        if changed.error is not None:
            raise_error(changed.error)

    def done(self, done: wire.Done) -> None:
        with contextlib.suppress(ModelUnavailable):  # statistics lost with an engine that went away
            self._send(done)

    async def statistics(self, name: str, version: str) -> dict[str, Any]:
        answer: wire.StatisticsAre = await self._ask(wire.Statistics(next(self._ids), name, version))
        body = json.loads(answer.body)
        if "error" in body:
            raise_error(tuple(body["error"]))
        return body


class EngineSide:
    """What a front-end's model leaves to the engine, encoder or generator: health (the engine is
    connected), admission control (counted there over every front-end; only a request larger than
    --max-queue could ever take is refused here) and Triton's statistics (kept there)."""

    name: str
    version: str
    max_queue: int
    client: EngineClient

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
        """Nothing to give back here: the engine released the items when it answered."""

    def record_result(self, ok: bool, seconds: float, count: int, stages: dict[str, float]) -> None:
        self.client.done(wire.Done(self.name, ok, seconds, count, dict(stages)))

    async def collected_statistics(self) -> dict[str, Any]:
        return (await self.client.statistics(self.name, self.version))["model_stats"][0]


class RemoteModel(EngineSide, Counted):
    """A model as a front-end serves it: its tokenizer and pipeline here, its session in the engine."""

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


@dataclass
class RemoteStream:
    """One prompt decoding in the engine: its pieces arrive on `queue` from the client's reader."""

    queue: asyncio.Queue
    prefix: str
    prompt_tokens: int
    truncated: bool
    on_cancel: Callable[[], None]
    cancelled: bool = False

    def cancel(self) -> None:
        if not self.cancelled:
            self.cancelled = True
            self.on_cancel()


class RemoteGenerator(EngineSide, Generative):
    """A generator as a front-end serves it: tokenizer, settings and chat template here (requests
    are checked before they leave), the decoding loop in the engine, which sends the text back."""

    def __init__(self, info: wire.ModelInfo, client: EngineClient, metrics: Metrics, chat_template: Path | None):
        super().__init__()
        self.name, self.version, self.path = info.name, info.version, Path(info.path)
        self.generator = load_generator(self.path, verify_hashes=False, chat_template=chat_template, sessions=False)
        self.manifest = self.generator.manifest
        self.spec = spec_for(self.manifest.task)
        self.provider = info.provider
        self.metrics = metrics
        self.max_queue = info.max_queue
        self.options = BatchOptions(max_size=info.max_size, max_queue=info.max_queue, instances=info.instances)
        self.sizes = dict(info.sizes)
        self.client = client

    async def open(self, texts: list[str], params: dict[str, Any], state: RequestState) -> list[RemoteStream]:
        self.settings_for(params)  # a bad setting is refused here, before the engine is asked
        return await self.client.generate(self, texts, params, state)

    async def pieces(self, stream: RemoteStream, state: RequestState) -> AsyncIterator[Piece]:
        try:
            while True:
                remaining = None if state.deadline is None else max(state.deadline - time.monotonic(), 0)
                try:
                    message: wire.Pieces = await asyncio.wait_for(stream.queue.get(), remaining)
                except TimeoutError as exc:
                    raise DeadlineExceeded("deadline passed while generating; the sequence was stopped") from exc
                if message.error is not None:
                    raise_error(message.error)
                for text, tokens, finish_reason in message.pieces:
                    yield Piece(text, tokens, finish_reason)
                    if finish_reason is not None:
                        return
        finally:
            stream.cancel()

    def stop(self) -> None:
        pass


class MirroredRepository(ModelTable):
    """A front-end's copy of the engine's model table, kept by the engine's snapshots (sent on
    connecting and after every change, in order, before the reply to the change): a model here is
    its tokenizer side (RemoteModel / RemoteGenerator), built when a name or a version is new.
    Load and unload are asked of the engine, so every front-end sees them; the one that asked
    returns once it has mirrored the change, so its caller finds the model on the next call."""

    def __init__(self, client: EngineClient, build: Callable[[wire.ModelInfo], Any], snapshot: wire.Models):
        super().__init__(snapshot.control_mode)
        self.client = client
        self._build = build
        client.on_models = self.mirror

    async def mirror(self, snapshot: wire.Models) -> list[Counted]:
        """Take a snapshot; the models it replaced or removed are returned (requests may still hold them)."""
        models = {}
        for info in snapshot.models:
            current = self.models.get(info.name)
            same = current is not None and (current.version, str(current.path)) == (info.version, info.path)
            models[info.name] = current if same else await asyncio.to_thread(self._build, info)
        replaced = [model for name, model in self.models.items() if models.get(name) is not model]
        self.models = models
        self.states = {row.name: IndexEntry(row.name, row.version, row.state, row.reason) for row in snapshot.index}
        self.sources = {row.name: Source(row.name, row.version, Path()) for row in snapshot.index}
        return replaced

    def index(self, ready_only: bool = False) -> list[IndexEntry]:
        entries = sorted(self.states.values(), key=lambda entry: entry.name)
        return [e for e in entries if e.state == "READY"] if ready_only else entries

    async def load(self, name: str) -> None:
        await self.client.change("load", name)

    async def unload(self, name: str) -> None:
        await self.client.change("unload", name)

    async def poll(self, interval: float, stop: asyncio.Event) -> None:
        """Nothing to do: the engine polls the repository, and its snapshots bring the changes here."""

    async def stop(self) -> None:
        self.models.clear()
