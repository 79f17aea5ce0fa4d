"""Triton's generate extension on the HTTP port, for generators: `POST .../generate` (one JSON
answer) and `.../generate_stream` (server-sent events, one per piece of text), a thin adapter over
the data plane as the KServe REST routes are beside it (kiln.runtime.serve.http)."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
from aiohttp import web
from kiln.runtime.errors import InvalidInput, KilnError
from kiln.runtime.generation.decoding import Piece
from kiln.runtime.serve.bodies import json_body, json_object, model_of
from kiln.runtime.serve.calls import REQUEST_ID, counted_route
from kiln.runtime.serve.dataplane import Call, DataPlane
from kiln.runtime.tasks.generation import GenerateRequest, read_request


class GenerateApi:
    def __init__(self, plane: DataPlane):
        self.plane = plane

    def add_routes(self, router: web.UrlDispatcher, base: str) -> None:
        """The extension's two routes under a model's path (`/v2/models/{name}[/versions/{version}]`)."""
        router.add_post(base + "/generate", counted_route(self.plane, "generate-http", self.generate))
        router.add_post(base + "/generate_stream", counted_route(self.plane, "generate-http", self.generate_stream))

    async def generate(self, request: web.Request, call: Call) -> web.Response:
        """Triton's generate extension: one JSON answer."""
        name, version = model_of(request)
        generate = generate_request(await json_body(request))
        answered = await self.plane.generate(self.plane.model_for(name, version, call), generate, call)
        answer = answered.answers[0] if len(answered.answers) == 1 else None
        body: dict[str, Any] = {"model_name": answered.model.name, "model_version": answered.model.version}
        if answer is None:
            body["text_output"] = [a.text for a in answered.answers]
            return web.json_response(body)
        body.update(text_output=answer.text, finish_reason=answer.finish_reason, truncated=answer.truncated)
        body["usage"] = {"prompt_tokens": answer.prompt_tokens, "completion_tokens": answer.tokens}
        return web.json_response(body)

    async def generate_stream(self, request: web.Request, call: Call) -> web.StreamResponse:
        """Triton's generate extension, streamed as server-sent events: one event per piece of text,
        the last with the finish reason. An error before the first piece is an HTTP error; after it,
        an event `{"error": ...}` ends the stream."""
        name, version = model_of(request)
        generate = generate_request(await json_body(request))
        chunks = aiter(self.plane.generate_stream(self.plane.model_for(name, version, call), generate, call))
        first = await anext(chunks)  # errors here become the HTTP status, as for any request
        headers = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache", REQUEST_ID: call.request_id}
        response = web.StreamResponse(headers=headers)
        await response.prepare(request)
        model = {"model_name": name, "model_version": version or "1"}
        try:
            await response.write(_event({**model, **_chunk_json(first)}))
            async for chunk in chunks:
                await response.write(_event({**model, **_chunk_json(chunk)}))
        except KilnError as exc:
            call.code = exc.grpc_status  # answered inside a started response; still counted as what it was
            await response.write(_event({"error": str(exc)}))
        finally:
            await chunks.aclose()
        await response.write_eof()
        return response


def generate_request(body: dict[str, Any]) -> GenerateRequest:
    """Triton's generate JSON: inputs by name at the top level, request parameters in `parameters`."""
    parameters = json_object(body.get("parameters", {}), "'parameters'")
    tensors: dict[str, np.ndarray] = {}
    for name, value in body.items():
        if name in ("parameters", "id"):
            continue
        if name in ("text_input", "sampling_parameters"):
            texts = value if isinstance(value, list) else [value]
            texts = [json.dumps(t) if name == "sampling_parameters" and isinstance(t, dict) else t for t in texts]
            if not texts or not all(isinstance(t, str) for t in texts):
                raise InvalidInput(f"{name!r} must be a string or a list of strings")
            # a lone surrogate passes through here, to be refused by name with the rest of the text checks
            tensors[name] = np.array([t.encode("utf-8", "surrogatepass") for t in texts], dtype=object)
        elif isinstance(value, bool):
            tensors[name] = np.array([value])
        elif isinstance(value, int):
            if not -(2**63) <= value < 2**63:
                raise InvalidInput(f"input {name!r} is {value}, past the INT64 range")
            tensors[name] = np.array([value], dtype=np.int64)
        else:
            raise InvalidInput(f"input {name!r} must be a boolean or an integer, got {type(value).__name__}")
    return read_request(tensors, parameters)


def _chunk_json(chunk: Piece) -> dict[str, Any]:
    body: dict[str, Any] = {"text_output": chunk.text}
    if chunk.finish_reason is not None:
        body.update(finish_reason=chunk.finish_reason, truncated=chunk.truncated)
        body["usage"] = {"prompt_tokens": chunk.prompt_tokens, "completion_tokens": chunk.generated_tokens}
    return body


def _event(data: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(data, ensure_ascii=False).encode("utf-8") + b"\n\n"
