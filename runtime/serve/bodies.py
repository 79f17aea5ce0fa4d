"""HTTP request bodies, shared by the KServe v2 and OpenAI routes: read within the server's body
timeout (a client trickling its body gets 408) and parsed with kiln's JSON limits."""

from __future__ import annotations

import asyncio
from typing import Any

from aiohttp import web
from kiln.runtime.errors import InvalidInput, RequestTimeout
from kiln.runtime.inputs import parse_json

BODY_TIMEOUT = web.AppKey("body_timeout", float)  # seconds a request body may take to arrive


async def read_body(request: web.Request) -> bytes:
    """The whole body, within the server's body timeout: a client trickling it is cut off (408)."""
    try:
        async with asyncio.timeout(_timeout(request)):
            return await request.read()
    except TimeoutError as exc:
        raise RequestTimeout(
            f"the request body did not arrive within {_timeout(request):g} s (--http-body-timeout)"
        ) from exc


async def json_body(request: web.Request) -> dict[str, Any]:
    body = parse_json(await read_body(request), "request body")
    if not isinstance(body, dict):
        raise InvalidInput("request body must be a JSON object")
    return body


def _timeout(request: web.Request) -> float:
    """The HTTP application's setting (`--http-body-timeout`)."""
    return request.config_dict[BODY_TIMEOUT]


def json_object(value: Any, what: str) -> dict[str, Any]:
    """An optional JSON object field (None: empty), refused by name when it is something else."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise InvalidInput(f"{what} must be an object")
    return value


def model_of(request: web.Request) -> tuple[str, str]:
    """The model name and version a KServe route names in its path."""
    return request.match_info.get("name", ""), request.match_info.get("version", "")
