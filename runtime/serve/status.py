"""The one place where kiln's errors become protocol status: gRPC codes and HTTP statuses."""

from __future__ import annotations

import grpc
from kiln.runtime.errors import KilnError

# gRPC code -> HTTP status, as KServe's REST protocol and the gRPC/HTTP mapping use them
HTTP_STATUS = {
    "OK": 200,
    "INVALID_ARGUMENT": 400,
    "FAILED_PRECONDITION": 400,
    "OUT_OF_RANGE": 400,
    "UNAUTHENTICATED": 401,
    "PERMISSION_DENIED": 403,
    "NOT_FOUND": 404,
    "ALREADY_EXISTS": 409,
    "RESOURCE_EXHAUSTED": 429,
    "CANCELLED": 499,
    "UNIMPLEMENTED": 501,
    "UNAVAILABLE": 503,
    "DEADLINE_EXCEEDED": 504,
    "INTERNAL": 500,
    "UNKNOWN": 500,
}


def status_of(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    if isinstance(exc, KilnError):
        return getattr(grpc.StatusCode, exc.grpc_status), str(exc)
    return grpc.StatusCode.INTERNAL, f"internal error: {type(exc).__name__}: {exc}"


def http_status_of(exc: BaseException) -> tuple[int, str]:
    code, message = status_of(exc)
    own = exc.http_status if isinstance(exc, KilnError) else None
    return own or HTTP_STATUS.get(code.name, 500), message
