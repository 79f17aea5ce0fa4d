"""What every gRPC call passes before its servicer: the bearer token, and lenient decoding.

grpc answers a request it cannot decode with UNKNOWN/INTERNAL ("Exception deserializing request")
and ends a whole stream on one bad message. kiln decodes leniently instead: an undecodable unary
request is INVALID_ARGUMENT (the client's fault), and an undecodable message on a stream reaches the
servicer as `Undecodable`, which answers that message with an error and keeps the stream open.
"""

from __future__ import annotations

import hmac
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import grpc

OPEN_METHODS = ("/grpc.health.v1.Health/", "/grpc.reflection.")  # probes need no token


@dataclass
class Undecodable:
    """A request message that did not parse; `reason` says why."""

    reason: str


def _lenient(deserializer: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    if deserializer is None:
        return None

    def decode(data: bytes) -> Any:
        try:
            return deserializer(data)
        except Exception as exc:  # protobuf's DecodeError, or anything a malformed message raises
            return Undecodable(f"the request is not a valid protobuf message ({type(exc).__name__}: {exc})")

    return decode


class LenientDecoding(grpc.aio.ServerInterceptor):
    """`refused(method)` hears of each unary call refused as undecodable, so it can be counted."""

    def __init__(self, refused: Callable[[str], None] = lambda method: None):
        self.refused = refused

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        if handler is None or not hasattr(handler, "_replace"):
            return handler
        refuse = _refusal(details.method, self.refused)
        replaced: dict[str, Any] = {"request_deserializer": _lenient(handler.request_deserializer)}
        if handler.unary_unary is not None:
            replaced["unary_unary"] = _refuse_undecodable(handler.unary_unary, refuse)
        if handler.unary_stream is not None:
            replaced["unary_stream"] = _refuse_undecodable_stream(handler.unary_stream, refuse)
        return handler._replace(**replaced)


Refuse = Callable[[Any, Undecodable], Any]


def _refusal(method: str, refused: Callable[[str], None]) -> Refuse:
    async def refuse(context: Any, request: Undecodable) -> None:
        refused(method)
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.reason)

    return refuse


def _refuse_undecodable(behaviour: Callable, refuse: Refuse) -> Callable:
    async def call(request: Any, context: Any) -> Any:
        if isinstance(request, Undecodable):
            await refuse(context, request)
        return await behaviour(request, context)

    return call


def _refuse_undecodable_stream(behaviour: Callable, refuse: Refuse) -> Callable:
    """The same for a unary-stream method, written either as an async generator or as a coroutine
    that writes to its context (grpc's own health Watch is the latter)."""
    if inspect.isasyncgenfunction(behaviour):

        async def stream(request: Any, context: Any) -> Any:
            if isinstance(request, Undecodable):
                await refuse(context, request)
            async for response in behaviour(request, context):
                yield response

        return stream
    return _refuse_undecodable(behaviour, refuse)


class BearerAuth(grpc.aio.ServerInterceptor):
    """One `authorization: Bearer TOKEN` entry, compared in constant time; two entries are refused."""

    def __init__(self, token: str):
        self._expected = f"Bearer {token}".encode()

    async def intercept_service(self, continuation, details):
        if details.method.startswith(OPEN_METHODS):
            return await continuation(details)
        given = [v for k, v in (details.invocation_metadata or ()) if k == "authorization"]
        if len(given) == 1 and hmac.compare_digest(str(given[0]).encode(), self._expected):
            return await continuation(details)
        return _deny_handler()


def _deny_handler() -> grpc.RpcMethodHandler:
    async def deny(request, context):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong bearer token in 'authorization'")

    return grpc.unary_unary_rpc_method_handler(deny)
