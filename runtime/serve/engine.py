"""The engine process of `kiln serve --frontends N`: it owns the sessions and the batchers, and
batches the rows every front-end sends into one queue per model, so the device sees batches as
big as the whole server's load. Front-ends do everything else (protocols, tokenization,
post-processing: kiln.runtime.serve.frontend).

Per connection (one per front-end), frames arrive in order: a `Run` is admitted (`--max-queue`
counts every front-end's rows, here), its rows queued in the model's batcher, and its outputs
sent back as a `Ran` by the event loop once its last row has run; a `Cancel` or the connection
closing drops what is still queued. Sessions run on the batchers' threads, never on the loop.
A `Generate` opens a stream per prompt in the generator's decoding loop (continuous batching over
every front-end's sequences) and sends each stream's text as it comes (`Pieces`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import numpy as np
from kiln.runtime import errors
from kiln.runtime.errors import KilnError
from kiln.runtime.serve import engine_wire as wire
from kiln.runtime.serve.aio import Wakeup
from kiln.runtime.serve.batcher import RequestState, row_error, when_all
from kiln.runtime.serve.generative import GenerativeModel, Stream
from kiln.runtime.serve.models import ServedModel
from kiln.runtime.serve.repository import Repository
from kiln.runtime.serve.tokens import TokenRow

log = logging.getLogger("kiln.serve")


def model_info(model: ServedModel | GenerativeModel) -> wire.ModelInfo:
    options = model.options
    return wire.ModelInfo(
        model.name, model.version, str(model.path), model.provider, model.sizes,
        options.max_size, options.max_tokens, options.max_delay, model.max_queue, options.instances,
    )  # fmt: skip


class Engine:
    def __init__(self, repository: Repository):
        self.repository = repository
        self.connections = 0
        self.generation = 0  # repository changes so far
        self._mirrored: dict[Any, int] = {}  # each front-end connection's write -> the generation it mirrored
        self._handlers: set[asyncio.Task] = set()
        self._writers: set[asyncio.StreamWriter] = set()
        self._wakeup: Wakeup | None = None  # the batchers' way back to the loop (made in serve)
        repository.on_change = self._changed
        repository.change_seen = self._change_seen

    def snapshot(self) -> wire.Models:
        index = [wire.IndexRow(e.name, e.version, e.state, e.reason) for e in self.repository.index()]
        infos = [model_info(m) for m in self.repository.models.values()]
        return wire.Models(self.generation, self.repository.control_mode, infos, index)

    def _changed(self) -> None:
        """The repository changed: every front-end is told (before any Changed that follows)."""
        self.generation += 1
        snapshot = self.snapshot()
        for send in self._mirrored:
            send(snapshot)

    def _change_seen(self) -> Callable[[], bool]:
        """Whether every front-end connected now has mirrored the latest change (one that goes
        away counts as having seen it)."""
        generation, connections = self.generation, list(self._mirrored)
        return lambda: all(self._mirrored.get(c, generation) >= generation for c in connections)

    async def serve(self, path: Path, stop: asyncio.Event, started: Callable[[], None] = lambda: None) -> None:
        """Answer front-ends on the Unix socket at `path` until `stop` is set."""
        self._wakeup = Wakeup(asyncio.get_running_loop())
        with contextlib.suppress(FileNotFoundError):
            path.unlink()  # left by an engine that died
        server = await asyncio.start_unix_server(self._connection, path=str(path))
        started()
        try:
            await stop.wait()
        finally:
            server.close()
            await server.wait_closed()
            for writer in self._writers:  # each connection's task then ends as a front-end gone would
                writer.close()
            await asyncio.gather(*self._handlers, return_exceptions=True)

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        handler = asyncio.current_task()
        assert handler is not None
        self._handlers.add(handler)
        self._writers.add(writer)
        held: dict[int, RequestState] = {}  # this front-end's Runs and Generates not yet answered
        generating: dict[int, list[Stream]] = {}  # the open streams of its Generates
        send = wire.Outbox(writer).send
        send(self.snapshot())
        self._mirrored[send] = -1
        try:
            while True:
                message = await wire.read(reader)
                if isinstance(message, wire.Run):
                    self._run(message, held, send)
                elif isinstance(message, wire.Generate):
                    self._generate(message, held, generating, send)
                elif isinstance(message, wire.Cancel):
                    if message.id in held:
                        held[message.id].cancelled = True
                    for stream in generating.get(message.id, ()):
                        stream.cancel()
                elif isinstance(message, wire.Done):
                    self._done(message)
                elif isinstance(message, wire.Statistics):
                    send(wire.StatisticsAre(message.id, self._statistics(message)))
                elif isinstance(message, wire.Mirrored):
                    self._mirrored[send] = message.generation
                elif isinstance(message, wire.Change):
                    asyncio.get_running_loop().create_task(self._change(message, send))
        except (asyncio.IncompleteReadError, ConnectionError):
            pass  # the front-end has gone (stopped, or died): what it left queued is dropped
        except Exception:
            log.exception("engine: a front-end connection failed; closing it")
        finally:
            self.connections -= 1
            self._handlers.discard(handler)
            self._writers.discard(writer)
            self._mirrored.pop(send, None)
            for state in held.values():
                state.cancelled = True
            for streams in generating.values():
                for stream in streams:
                    stream.cancel()
            writer.close()

    def _run(self, run: wire.Run, held: dict[int, RequestState], send: Any) -> None:
        try:
            model = self._model(run.model, run.version)
            rows = [
                TokenRow(np.frombuffer(ids, dtype=np.int64), np.frombuffer(types, dtype=np.int64))
                for ids, types in zip(run.ids, run.type_ids, strict=True)
            ]
            model.admit(len(rows))
        except Exception as exc:
            send(wire.Ran(run.id, None, _error(exc), []))
            return
        state = RequestState(deadline=run.deadline, spans=[])
        held[run.id] = state
        model.in_flight += 1

        def over() -> None:
            held.pop(run.id, None)
            model.in_flight -= 1
            model.release(len(rows))

        def answer(futures: list[Future]) -> None:  # on the loop, once every row has settled
            over()
            error = row_error(futures)
            if error is not None:
                send(wire.Ran(run.id, None, _error(error), state.spans or []))
                return
            outputs = [{name: wire.Array.of(value) for name, value in f.result().items()} for f in futures]
            send(wire.Ran(run.id, outputs, None, state.spans or []))

        try:
            futures = model.batcher.submit(rows, state, run.company or model.in_flight > 1)
        except Exception as exc:
            over()
            send(wire.Ran(run.id, None, _error(exc), []))
            return
        wakeup = self._wakeup
        assert wakeup is not None
        when_all(futures, lambda: wakeup.call(lambda: answer(futures)))

    def _generate(
        self, ask: wire.Generate, held: dict[int, RequestState], generating: dict[int, list[Stream]], send: Any
    ) -> None:
        """Open a stream per prompt, then send each stream's pieces as they come; every way out of
        the request (done, failed, cancelled, the front-end gone) gives back what it held."""
        try:
            model = self.repository.serving(ask.model, ask.version)
            if not model.spec.generative:
                raise errors.InvalidInput(f"model {ask.model!r} is a {model.manifest.task} model, not a generator")
            model.admit(len(ask.prompts))
        except Exception as exc:
            send(wire.Opened(ask.id, [], _error(exc)))
            return
        state = RequestState(deadline=ask.deadline)
        held[ask.id] = state
        model.in_flight += 1
        asyncio.get_running_loop().create_task(self._stream(model, ask, state, held, generating, send))

    async def _stream(
        self,
        model: GenerativeModel,
        ask: wire.Generate,
        state: RequestState,
        held: dict[int, RequestState],
        generating: dict[int, list[Stream]],
        send: Any,
    ) -> None:
        try:
            try:
                streams = await model.open(ask.prompts, ask.params, state)
            except Exception as exc:
                send(wire.Opened(ask.id, [], _error(exc)))
                return
            generating[ask.id] = streams
            opened = [(s.prefix, s.prompt_tokens, s.truncated) for s in streams]
            send(wire.Opened(ask.id, opened, None))
            await asyncio.gather(*(self._pump(model, ask.id, i, s, state, send) for i, s in enumerate(streams)))
        finally:
            for stream in generating.pop(ask.id, ()):
                stream.cancel()
            held.pop(ask.id, None)
            model.in_flight -= 1
            model.release(len(ask.prompts))

    @staticmethod
    async def _pump(
        model: GenerativeModel, ask: int, index: int, stream: Stream, state: RequestState, send: Any
    ) -> None:
        try:
            async for piece in model.pieces(stream, state):
                send(wire.Pieces(ask, index, [(piece.text, piece.tokens, piece.finish_reason)]))
        except Exception as exc:
            send(wire.Pieces(ask, index, [], _error(exc)))

    async def _change(self, change: wire.Change, send: Any) -> None:
        try:
            if change.action == "load":
                await self.repository.load(change.name)
            else:
                await self.repository.unload(change.name)
            send(wire.Changed(change.id, self.generation, None))
        except Exception as exc:
            send(wire.Changed(change.id, self.generation, _error(exc)))

    def _model(self, name: str, version: str) -> ServedModel:
        model = self.repository.serving(name, version)
        if model.spec.generative:
            raise errors.InvalidInput(f"model {name!r} is a generator; it does not run token rows")
        return model

    def _done(self, done: wire.Done) -> None:
        with contextlib.suppress(KilnError):
            self.repository.get(done.model).record_result(done.ok, done.seconds, done.count, done.stages)

    def _statistics(self, ask: wire.Statistics) -> bytes:
        try:
            models = [self.repository.get(ask.name, ask.version)] if ask.name else self.repository.models.values()
            return json.dumps({"model_stats": [m.statistics() for m in models]}).encode()
        except KilnError as exc:
            return json.dumps({"error": list(_error(exc))}).encode()


def _error(exc: BaseException) -> tuple[str, str]:
    if isinstance(exc, KilnError):
        return type(exc).__name__, str(exc)
    log.error("engine: a run failed", exc_info=exc)
    return "InternalError", f"{type(exc).__name__}: {exc}"


def raise_error(error: tuple[str, str]) -> None:
    """A `Ran`'s error, raised again on the front-end as the KilnError it was."""
    kind = getattr(errors, error[0], None)
    if isinstance(kind, type) and issubclass(kind, KilnError):
        raise kind(error[1])
    raise errors.InternalError(error[1])
