"""asyncio helpers the serving core shares."""

from __future__ import annotations

import asyncio
import collections
import logging
from collections.abc import Awaitable, Callable
from typing import Any

log = logging.getLogger("kiln.serve")


async def all_or_none(*work: Awaitable[Any]) -> list[Any]:
    """Every result, in order; if one raises or the caller is cancelled, the rest are cancelled and
    awaited, so nothing a request started goes on without it (and no exception is left unretrieved)."""
    tasks = [asyncio.ensure_future(item) for item in work]
    try:
        return list(await asyncio.gather(*tasks))
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


class Wakeup:
    """Calls handed to the event loop from other threads, one wake-up for as many as arrive before
    the loop runs them: a batch that settles 64 requests wakes the loop once, not 64 times (each
    `call_soon_threadsafe` writes to the loop's self-pipe)."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self._calls: collections.deque[Callable[[], None]] = collections.deque()
        self._scheduled = False

    def call(self, function: Callable[[], None]) -> None:
        """From any thread."""
        self._calls.append(function)
        if not self._scheduled:
            self._scheduled = True
            self.loop.call_soon_threadsafe(self._run)

    def _run(self) -> None:
        self._scheduled = False  # before draining: a call added from now on schedules another run
        while self._calls:
            try:
                self._calls.popleft()()
            except Exception:  # one failing call must not strand the others
                log.exception("a call handed to the event loop failed")
