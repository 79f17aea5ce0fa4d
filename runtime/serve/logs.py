"""The server's log lines, through structlog over the standard library's logging: kiln's modules
log with `logging` and put their fields in `extra={"fields": {...}}`; this renders each record as
one line of text (`2026-11-30T03:02:34 kiln serving grpc=...`) or as one JSON object, tracebacks
included in both (a JSON record carries it as text in `exception`)."""

from __future__ import annotations

import logging
import sys
from typing import Any

import structlog

LOGGER = "kiln"


def _fields(logger: Any, method: str, event: dict[str, Any]) -> dict[str, Any]:
    """A record's `fields` (kiln's structured extras), as top-level keys."""
    record = event.get("_record")
    fields = getattr(record, "fields", None)
    if fields:
        event.update(fields)
    return event


def configure_logging(structured: bool, verbose: int = 0) -> None:
    """Log kiln's records to stderr: JSON lines when `structured`, else text; DEBUG when
    `verbose` (Triton's --log-verbose level) is above 0, else INFO."""
    if structured:  # {"ts": unix seconds, "level", "msg", fields..., "exception": the traceback}
        stamp = structlog.processors.TimeStamper(fmt=None, key="ts")
        renderer: list[Any] = [
            structlog.processors.EventRenamer("msg"),
            structlog.processors.format_exc_info,  # the traceback as text: no local variables (request text) leak
            structlog.processors.JSONRenderer(ensure_ascii=False),
        ]
    else:
        stamp = structlog.processors.TimeStamper(fmt="%Y-%m-%dT%H:%M:%S", utc=True)
        renderer = [_text]
    shared = [structlog.stdlib.add_log_level, stamp, _fields]
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=shared,
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, *renderer],
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(formatter)
    logger = logging.getLogger(LOGGER)
    logger.handlers[:] = [handler]
    logger.setLevel(logging.DEBUG if verbose > 0 else logging.INFO)
    logger.propagate = False


def _text(logger: Any, method: str, event: dict[str, Any]) -> str:
    """`TIME kiln MESSAGE key=value ...`, then the traceback, if any, on the lines below."""
    stamp, message = event.pop("timestamp"), event.pop("event")
    level = event.pop("level")
    trace = event.pop("exc_info", None)
    head = [stamp, "kiln"] + ([level.upper()] if level not in ("info", "debug") else []) + [str(message)]
    line = " ".join(head + [f"{key}={value}" for key, value in event.items()])
    if trace:
        line += "\n" + structlog.processors.format_exc_info(logger, method, {"exc_info": trace})["exception"]
    return line
