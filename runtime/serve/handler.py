"""What every RPC that runs a model does: admission, deadline, worker thread, errors, metrics."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import grpc
from kiln.runtime.errors import KilnError, ModelNotServed
from kiln.runtime.serve.batcher import RequestState
from kiln.runtime.serve.metrics import Metrics
from kiln.runtime.serve.models import ServedModel
from kiln.runtime.serve.status import status_of

log = logging.getLogger("kiln.serve")


@dataclass
class ServerState:
    """Shared by the services of one server: the models and whether it is draining."""

    models: dict[str, ServedModel]
    executor: ThreadPoolExecutor
    metrics: Metrics
    default_deadline: float | None = None
    draining: bool = False

    def model(self, name: str, version: str = "") -> ServedModel:
        if name not in self.models:
            known = ", ".join(sorted(self.models)) or "none"
            raise ModelNotServed(f"unknown model {name!r}; served models: {known}")
        if version not in ("", "1"):
            raise ModelNotServed(f"model {name!r} has no version {version!r}; kiln serves version 1")
        return self.models[name]


async def run_model(
    state: ServerState,
    context: grpc.aio.ServicerContext,
    name: str,
    version: str,
    api: str,
    work: Callable[[ServedModel], Any],
    count: int = 1,
) -> Any:
    """Run `work(model)` (a pipeline call) on a worker thread, as one request of `name`.

    Errors are mapped to gRPC status codes here and nowhere else; a cancelled call marks its
    queued work so the batcher drops it.
    """
    if state.draining:
        await context.abort(grpc.StatusCode.UNAVAILABLE, "server is shutting down; retry on another replica")
    started = time.monotonic()
    try:
        model = state.model(name, version)
    except KilnError as exc:
        state.metrics.requests.labels(model=name, api=api, code="NOT_FOUND").inc()
        await context.abort(*status_of(exc))
    remaining = context.time_remaining()
    timeout = remaining if remaining is not None else state.default_deadline
    request = RequestState(deadline=started + timeout if timeout else None)
    try:
        result = await asyncio.wrap_future(state.executor.submit(model.call, lambda: work(model), request))
    except asyncio.CancelledError:
        request.cancelled = True
        state.metrics.requests.labels(model=name, api=api, code="CANCELLED").inc()
        raise
    except Exception as exc:
        code, message = status_of(exc)
        if code == grpc.StatusCode.INTERNAL:
            log.exception("model %s: %s failed", name, api)
        model.record_result(False, time.monotonic() - started, count)
        state.metrics.requests.labels(model=name, api=api, code=code.name).inc()
        await context.abort(code, message)
    elapsed = time.monotonic() - started
    model.record_result(True, elapsed, count)
    state.metrics.requests.labels(model=name, api=api, code="OK").inc()
    state.metrics.request_seconds.labels(model=name).observe(elapsed)
    return result
