"""asyncio helpers the serving core shares."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import Any


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
