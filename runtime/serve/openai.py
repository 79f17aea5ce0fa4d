"""OpenAI's API on the HTTP port, mounted at /v1: `GET /models`, `POST /completions` and
`POST /chat/completions` for generators, `POST /embeddings` for feature-extraction models.

A thin adapter over the data plane, as the KServe routes are: `openai_codec` reads OpenAI bodies
into kiln's generation parameters and writes answers as OpenAI's objects and stream chunks; this
module routes, runs the requests (n choices, streams merged into one SSE response ending with
`data: [DONE]`) and phrases every error in OpenAI's shape (`{"error": {message, type, param,
code}}`). A client that disconnects mid-stream cancels its sequences, freeing their rows and cache.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from typing import Any

from aiohttp import web
from kiln.runtime.errors import KilnError
from kiln.runtime.generation.decoding import Piece
from kiln.runtime.serve import openai_codec as codec
from kiln.runtime.serve.aio import all_or_none
from kiln.runtime.serve.bodies import json_body
from kiln.runtime.serve.calls import REQUEST_ID, counted_route
from kiln.runtime.serve.dataplane import Answered, Call, DataPlane
from kiln.runtime.serve.generative import Generative
from kiln.runtime.serve.status import http_status_of
from kiln.runtime.tasks.generation import GenerateRequest


class OpenAiApi:
    def __init__(self, plane: DataPlane):
        self.plane = plane

    def add_routes(self, router: web.UrlDispatcher, prefix: str) -> None:
        """OpenAI's routes under `prefix` on the HTTP port's own application (its auth, body timeout,
        error mapping and tracing apply)."""
        router.add_get(prefix + "/models", self.models)
        router.add_post(prefix + "/completions", counted_route(self.plane, "openai-completions", self.completions))
        router.add_post(prefix + "/chat/completions", counted_route(self.plane, "openai-chat", self.chat_completions))
        router.add_post(prefix + "/embeddings", counted_route(self.plane, "openai", self.embeddings))

    async def models(self, request: web.Request) -> web.Response:
        models = self.plane.repository.models.values()
        return web.json_response({"object": "list", "data": [codec.model_card(m) for m in models]})

    async def completions(self, request: web.Request, call: Call) -> web.StreamResponse:
        body = await json_body(request)
        model = self._generator(body, call)
        asked = codec.read_completion(body, model)
        return await self._generate(request, model, asked, call)

    async def chat_completions(self, request: web.Request, call: Call) -> web.StreamResponse:
        body = await json_body(request)
        model = self._generator(body, call)
        asked = codec.read_chat(body, model)
        return await self._generate(request, model, asked, call)

    async def embeddings(self, request: web.Request, call: Call) -> web.Response:
        body = await json_body(request)
        name, texts, encoding, dimensions = codec.read_embeddings(body)
        call.model = name
        model = self.plane.model_for(name, "", call)
        if model.manifest.task != "feature-extraction":
            raise codec.OpenAiInvalid(
                f"model {name!r} is a {model.manifest.task} model; embeddings need feature-extraction", "model"
            )
        if dimensions is not None and dimensions != model.sizes["hidden"]:
            raise codec.OpenAiInvalid(
                f"'dimensions' must be this model's width, {model.sizes['hidden']}, or left out", "dimensions"
            )
        answered = await self.plane.answer(model, {"text": texts}, {}, call)
        return web.json_response(codec.embeddings_body(name, answered.answers, answered.tokens, encoding))

    # ---- generation ----------------------------------------------------------------------------

    def _generator(self, body: dict[str, Any], call: Call) -> Generative:
        name = body.get("model")
        if not isinstance(name, str) or not name:
            raise codec.OpenAiInvalid("'model' must name a served model", "model")
        call.model = name
        model = self.plane.model_for(name, "", call)
        if not model.spec.generative:
            raise codec.OpenAiInvalid(
                f"model {name!r} is a {model.manifest.task} model; completions need a generator", "model"
            )
        return model

    async def _generate(
        self, request: web.Request, model: Generative, asked: codec.Asked, call: Call
    ) -> web.StreamResponse:
        if asked.stream:
            return await self._stream(request, model, asked, call)
        copies = codec.copies(asked)
        answered = await all_or_none(*(self._run(model, copy, call) for copy in copies))
        return web.json_response(codec.response_body(asked, model.name, copies, answered))

    async def _run(self, model: Generative, copy: codec.Copy, call: Call) -> Answered:
        return await self.plane.generate(model, GenerateRequest(copy.prompts, copy.params), call)

    async def _stream(
        self, request: web.Request, model: Generative, asked: codec.Asked, call: Call
    ) -> web.StreamResponse:
        """Every choice's pieces as OpenAI chunks in one SSE response. Each choice is its own stream;
        the first piece of each is awaited before the response starts, so a bad request is an HTTP
        error, not an error event."""
        streams = [
            aiter(self.plane.generate_stream(model, GenerateRequest([prompt], params), call))
            for prompt, params in codec.stream_choices(asked)
        ]
        try:
            firsts = await all_or_none(*(anext(stream) for stream in streams))  # every choice admitted together
            headers = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache", REQUEST_ID: call.request_id}
            response = web.StreamResponse(headers=headers)
            await response.prepare(request)
            writer = codec.StreamWriter(asked, model.name, codec.response_id(asked.chat), int(time.time()))
            for event in writer.opening():
                await response.write(event)
            try:
                async for index, chunk in _merged(streams, firsts):
                    for event in writer.chunk(index, chunk):
                        await response.write(event)
            except KilnError as exc:  # after the first piece: an error event ends the stream
                call.code = exc.grpc_status
                status, message = http_status_of(exc)
                await response.write(codec.event(codec.error_body(status, message, exc)))
            for event in writer.closing():
                await response.write(event)
            await response.write_eof()
            return response
        finally:
            for stream in streams:  # a client gone mid-stream (or an error) cancels every choice
                with contextlib.suppress(Exception):
                    await stream.aclose()


async def _merged(streams: list[AsyncIterator[Piece]], firsts: list[Piece]) -> AsyncIterator[tuple[int, Piece]]:
    """(choice index, chunk) from every stream as the chunks come; the first of each is given."""
    queue: asyncio.Queue = asyncio.Queue()
    done = object()

    async def pump(index: int, stream: AsyncIterator[Piece]) -> None:
        try:
            async for chunk in stream:
                await queue.put((index, chunk))
        except KilnError as exc:
            await queue.put((index, exc))
        finally:
            await queue.put((index, done))

    for index, first in enumerate(firsts):
        yield index, first
    pumps = [
        asyncio.ensure_future(pump(index, stream))
        for index, (stream, first) in enumerate(zip(streams, firsts, strict=True))
        if first.finish_reason is None
    ]
    try:
        open_streams = len(pumps)
        while open_streams:
            index, item = await queue.get()
            if item is done:
                open_streams -= 1
            elif isinstance(item, KilnError):
                raise item
            else:
                yield index, item
    finally:
        for task in pumps:
            task.cancel()
        await asyncio.gather(*pumps, return_exceptions=True)
