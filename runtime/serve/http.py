"""HTTP on its own port: KServe v2 REST (Triton's HTTP API, binary tensor extension included) and
the model repository API here; for generators Triton's generate extension
(`kiln.runtime.serve.generate_http`) and OpenAI's API under /v1 (`kiln.runtime.serve.openai`) —
thin adapters over the data plane, each API in its module, on one application. Errors are mapped
once, here: `{"error": message}` on KServe's routes, OpenAI's error object on OpenAI's.

aiohttp, in the server's own event loop beside grpc.aio: measured on this 2-core machine with wrk
(64 connections, a KServe-shaped JSON POST answered with JSON), aiohttp 3.14 served 9,961-10,142
requests/s against 8,147-8,830 for Starlette 1.10 on uvicorn 0.54 (httptools); it also brings the
HTTP client the bench uses, and needs no second server loop or signal handling of its own.
"""

from __future__ import annotations

import hmac
import json
from typing import Any

import numpy as np
from aiohttp import web
from kiln.runtime.errors import InvalidInput, KilnError, Unauthenticated
from kiln.runtime.inputs import parse_json
from kiln.runtime.serve import openai_codec
from kiln.runtime.serve.bodies import BODY_TIMEOUT, json_body, json_object, model_of, read_body
from kiln.runtime.serve.calls import CALL, REQUEST_ID, counted_route, take_kserve_id
from kiln.runtime.serve.dataplane import Call, DataPlane, InferRequest
from kiln.runtime.serve.generate_http import GenerateApi
from kiln.runtime.serve.openai import OpenAiApi
from kiln.runtime.serve.status import http_status_of
from kiln.runtime.serve.tensors import element_count
from kiln.runtime.wire import DTYPES, datatype_of, from_raw, to_raw

HEADER_LENGTH = "Inference-Header-Content-Length"  # Triton's binary tensor data extension
OPEN_PATHS = ("/v2/health/",)  # probes need no token
OPENAI_PREFIX = "/v1"


def json_error(request: web.Request, status: int, message: str, exc: BaseException | None) -> web.Response:
    """An error in the shape of the API the route belongs to."""
    if request.path.startswith(OPENAI_PREFIX + "/"):
        return web.json_response(openai_codec.error_body(status, message, exc), status=status)
    return web.json_response({"error": message}, status=status)


class HttpApi:
    def __init__(
        self,
        plane: DataPlane,
        auth_token: str | None = None,
        max_body_bytes: int = 64 << 20,
        body_timeout: float = 30.0,
    ):
        self.plane = plane
        self.auth_token = auth_token
        self.max_body_bytes = max_body_bytes
        self.body_timeout = body_timeout

    def app(self) -> web.Application:
        app = web.Application(client_max_size=self.max_body_bytes, middlewares=[self._errors, self._auth])
        app[BODY_TIMEOUT] = self.body_timeout
        model = "/v2/models/{name}"
        versioned = "/v2/models/{name}/versions/{version}"
        app.router.add_get("/v2", self.server_metadata)
        app.router.add_get("/v2/health/live", self.live)
        app.router.add_get("/v2/health/ready", self.ready)
        app.router.add_get("/v2/models/stats", self.statistics)
        for base in (model, versioned):
            app.router.add_get(base, self.metadata)
            app.router.add_get(base + "/ready", self.model_ready)
            app.router.add_get(base + "/config", self.config)
            app.router.add_get(base + "/stats", self.statistics)
            app.router.add_post(base + "/infer", counted_route(self.plane, "kserve-http", self.infer))
            GenerateApi(self.plane).add_routes(app.router, base)
        app.router.add_post("/v2/repository/index", self.repository_index)
        app.router.add_post("/v2/repository/models/{name}/load", self.load)
        app.router.add_post("/v2/repository/models/{name}/unload", self.unload)
        OpenAiApi(self.plane).add_routes(app.router, OPENAI_PREFIX)
        return app

    @web.middleware
    async def _errors(self, request: web.Request, handler: Any) -> web.StreamResponse:
        """Errors in the shape of the route's API; an inference request's id echoed (X-Request-ID)."""
        try:
            response = await handler(request)
        except KilnError as exc:
            response = json_error(request, *http_status_of(exc), exc)
        except web.HTTPException as exc:  # aiohttp's own: unknown path (404), wrong method (405), too large (413)
            response = json_error(request, exc.status, exc.reason, None)
        call = request.get(CALL)
        if call is not None and not response.prepared:  # a stream has sent its head already
            response.headers[REQUEST_ID] = call.request_id
        return response

    @web.middleware
    async def _auth(self, request: web.Request, handler: Any) -> web.StreamResponse:
        if self.auth_token and not request.path.startswith(OPEN_PATHS):
            given = request.headers.getall("Authorization", [])
            if len(given) != 1 or not hmac.compare_digest(given[0].encode(), f"Bearer {self.auth_token}".encode()):
                raise Unauthenticated("missing or wrong bearer token in the Authorization header")
        return await handler(request)

    # ---- health and metadata -------------------------------------------------------------------

    async def server_metadata(self, request: web.Request) -> web.Response:
        return web.json_response(self.plane.server_metadata())

    async def live(self, request: web.Request) -> web.Response:
        return web.json_response({"live": True})

    async def ready(self, request: web.Request) -> web.Response:
        ready = self.plane.ready()
        return web.json_response({"ready": ready}, status=200 if ready else 503)

    async def model_ready(self, request: web.Request) -> web.Response:
        name, version = model_of(request)
        ready = self.plane.model_ready(name, version)
        return web.json_response({"name": name, "ready": ready}, status=200 if ready else 503)

    async def metadata(self, request: web.Request) -> web.Response:
        return web.json_response(self.plane.model_metadata(*model_of(request)))

    async def config(self, request: web.Request) -> web.Response:
        return web.json_response(self.plane.model_config(*model_of(request)))

    async def statistics(self, request: web.Request) -> web.Response:
        return web.json_response(await self.plane.statistics(*model_of(request)))

    # ---- repository ----------------------------------------------------------------------------

    async def repository_index(self, request: web.Request) -> web.Response:
        body = await json_body(request) if request.can_read_body else {}
        entries = self.plane.repository.index(ready_only=bool(body.get("ready", False)))
        return web.json_response([e.__dict__ for e in entries])

    async def load(self, request: web.Request) -> web.Response:
        await self.plane.repository.load(request.match_info["name"])
        return web.json_response({})

    async def unload(self, request: web.Request) -> web.Response:
        await self.plane.repository.unload(request.match_info["name"])
        return web.json_response({})

    # ---- inference -----------------------------------------------------------------------------

    async def infer(self, request: web.Request, call: Call) -> web.Response:
        name, version = model_of(request)
        header, binary = await _split_body(request)
        infer, binary_outputs = read_infer_request(name, version, header, binary)
        take_kserve_id(call, request, infer.id)
        timeout = infer.parameters.get("timeout")  # Triton: microseconds
        call.timeout = timeout / 1e6 if isinstance(timeout, int) and timeout > 0 else None
        result = await self.plane.infer(self.plane.model_for(name, version, call), infer, call)
        body = {"model_name": result.model, "model_version": result.version, "outputs": []}
        if result.id:
            body["id"] = result.id
        blobs = []
        for output_name, array in result.outputs.items():
            tensor = {"name": output_name, "datatype": datatype_of(array), "shape": list(array.shape)}
            if binary_outputs(output_name):
                blob = to_raw(array)
                tensor["parameters"] = {"binary_data_size": len(blob)}
                blobs.append(blob)
            else:
                tensor["data"] = _to_json(array)
            body["outputs"].append(tensor)
        if not blobs:
            return web.json_response(body)
        head = json.dumps(body).encode()
        return web.Response(
            body=head + b"".join(blobs),
            content_type="application/octet-stream",
            headers={HEADER_LENGTH: str(len(head))},
        )


async def _split_body(request: web.Request) -> tuple[dict[str, Any], bytes]:
    """The JSON header and, with Triton's binary extension, the binary tensor data after it."""
    raw = await read_body(request)
    length = request.headers.get(HEADER_LENGTH)
    if length is None:
        header_bytes, binary = raw, b""
    else:
        if not length.isdigit() or int(length) > len(raw):
            raise InvalidInput(f"{HEADER_LENGTH} {length!r} does not fit a body of {len(raw)} bytes")
        header_bytes, binary = raw[: int(length)], raw[int(length) :]
    header = parse_json(header_bytes, "request body")
    if not isinstance(header, dict):
        raise InvalidInput("request body must be a JSON object")
    return header, binary


def read_infer_request(name: str, version: str, body: dict[str, Any], binary: bytes) -> tuple[InferRequest, Any]:
    """KServe v2 JSON (+ binary data) -> InferRequest, and which outputs go back as binary."""
    inputs = body.get("inputs")
    if not isinstance(inputs, list) or not inputs:
        raise InvalidInput("'inputs' must be a non-empty list of tensors")
    params = body.get("parameters") or {}
    if not isinstance(params, dict):
        raise InvalidInput("'parameters' must be an object")
    tensors: dict[str, np.ndarray] = {}
    offset = 0
    for tensor in inputs:
        if not isinstance(tensor, dict) or not isinstance(tensor.get("name"), str):
            raise InvalidInput("every input needs a 'name'")
        if tensor["name"] in tensors:
            raise InvalidInput(f"input {tensor['name']!r} given twice")
        array, offset = _read_tensor(tensor, binary, offset)
        tensors[tensor["name"]] = array
    if offset != len(binary):
        raise InvalidInput(f"{len(binary) - offset} bytes of binary data belong to no input")
    outputs = body.get("outputs") or []
    named = isinstance(outputs, list) and all(isinstance(o, dict) and isinstance(o.get("name"), str) for o in outputs)
    if not named:
        raise InvalidInput("'outputs' must be a list of {\"name\": ...}")
    all_binary = bool(params.get("binary_data_output", False))
    asked = {o["name"]: json_object(o.get("parameters"), f"output {o['name']!r} parameters") for o in outputs}
    binary_named = {output: bool(p.get("binary_data", all_binary)) for output, p in asked.items()}
    request = InferRequest(
        model=name,
        version=version,
        inputs=tensors,
        parameters=params,
        outputs=list(asked),
        id=str(body.get("id", "")),
        classification={output: p["classification"] for output, p in asked.items() if "classification" in p},
    )
    return request, lambda output: binary_named.get(output, all_binary)


def _read_tensor(tensor: dict[str, Any], binary: bytes, offset: int) -> tuple[np.ndarray, int]:
    name, datatype = tensor["name"], tensor.get("datatype")
    shape = tensor.get("shape")
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) for d in shape):
        raise InvalidInput(f"input {name!r}: 'shape' must be a list of integers")
    count = element_count(name, tuple(shape))
    size = json_object(tensor.get("parameters"), f"input {name!r} parameters").get("binary_data_size")
    if size is not None:
        if not isinstance(size, int) or size < 0 or offset + size > len(binary):
            raise InvalidInput(f"input {name!r}: binary_data_size {size!r} runs past the binary data")
        return from_raw(name, datatype, tuple(shape), count, binary[offset : offset + size]), offset + size
    if "data" not in tensor:
        raise InvalidInput(f"input {name!r} has no 'data'")
    flat = _flatten(tensor["data"])
    if len(flat) != count:
        raise InvalidInput(f"input {name!r}: shape {shape} holds {count} elements, got {len(flat)}")
    if datatype == "BYTES":
        if not all(isinstance(v, str) for v in flat):
            raise InvalidInput(f"input {name!r}: BYTES data must be strings")
        array = np.empty(count, dtype=object)
        array[:] = [v.encode("utf-8", "surrogatepass") for v in flat]
        return array.reshape(shape), offset
    if datatype not in DTYPES:
        raise InvalidInput(f"input {name!r}: unsupported datatype {datatype!r}")
    if not all(isinstance(v, int | float) and not isinstance(v, bool) for v in flat) and datatype != "BOOL":
        raise InvalidInput(f"input {name!r}: {datatype} data must be numbers")
    try:
        return np.array(flat, dtype=DTYPES[datatype]).reshape(shape), offset
    except OverflowError as exc:
        raise InvalidInput(f"input {name!r}: a value does not fit in {datatype}") from exc


def _flatten(data: Any) -> list[Any]:
    if not isinstance(data, list):
        return [data]
    out: list[Any] = []
    for item in data:
        out.extend(_flatten(item))
    return out


def _to_json(array: np.ndarray) -> list[Any]:
    if array.dtype == object:
        return [v.decode("utf-8") if isinstance(v, bytes) else str(v) for v in array.ravel()]
    return array.ravel().tolist()
