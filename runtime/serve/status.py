"""The one place where kiln's errors become gRPC status codes."""

from __future__ import annotations

import grpc
from kiln.runtime.errors import KilnError


def status_of(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    if isinstance(exc, KilnError):
        return getattr(grpc.StatusCode, exc.grpc_status), str(exc)
    if isinstance(exc, ValueError | TypeError | KeyError | UnicodeDecodeError):
        return grpc.StatusCode.INVALID_ARGUMENT, str(exc)
    return grpc.StatusCode.INTERNAL, f"internal error: {type(exc).__name__}: {exc}"
