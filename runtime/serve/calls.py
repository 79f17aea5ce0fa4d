"""A request's Call as each protocol makes it: its deadline, the model it names, and its request
id, taken from the caller (HTTP `X-Request-ID`, gRPC metadata `x-request-id`) or made by kiln,
and sent back (the HTTP header; gRPC trailing metadata), so a caller's id reaches kiln's access log,
its error messages and its trace spans. Every inference request is counted once with its outcome
(`DataPlane.counted`): HTTP routes through `counted_route`, gRPC servicers around their handlers."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web
from kiln.runtime.serve.dataplane import Call, DataPlane

REQUEST_ID = "X-Request-ID"
GRPC_REQUEST_ID = "x-request-id"
MAX_REQUEST_ID = 128  # a longer (or unprintable) id given by a caller is replaced by kiln's own
CALL = web.RequestKey("kiln_call", Call)  # an HTTP inference request's Call, for the error middleware

Handler = Callable[[web.Request, Call], Awaitable[web.StreamResponse]]


def take_kserve_id(call: Call, request: Any, body_id: Any) -> None:
    """An HTTP KServe request's body `id` as its request id, where no X-Request-ID header gave one."""
    if REQUEST_ID not in request.headers:
        call.request_id = _given(body_id) or call.request_id


def _given(value: Any) -> str | None:
    return value if isinstance(value, str) and 0 < len(value) <= MAX_REQUEST_ID and value.isprintable() else None


def counted_route(plane: DataPlane, api: str, handler: Handler) -> Callable[[web.Request], Awaitable[Any]]:
    """An inference route whose every request is counted once, refused ones included (a bad body,
    an unknown model): the handler gets the request's Call and names the model in it as soon as
    it knows it (the path, or an OpenAI body's `model`)."""

    async def route(request: web.Request) -> web.StreamResponse:
        call = Call(api, model=request.match_info.get("name", ""))
        call.request_id = _given(request.headers.get(REQUEST_ID)) or call.request_id
        request[CALL] = call
        async with plane.counted(call):
            return await handler(request, call)

    return route


def grpc_call(context: Any, api: str, model: str, kserve_id: str = "") -> Call:
    """A gRPC call's Call: its deadline, and its id (from `x-request-id` metadata, else the KServe
    request's `id`, else kiln's), which goes back to the caller in the trailing metadata, whatever
    the outcome."""
    call = Call(api, context.time_remaining(), model)
    given = next((v for k, v in context.invocation_metadata() or () if k == GRPC_REQUEST_ID), None)
    call.request_id = _given(given) or _given(kserve_id) or call.request_id
    context.set_trailing_metadata(((GRPC_REQUEST_ID, call.request_id),))
    return call
