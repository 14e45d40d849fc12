"""Await a condition with a deadline, for states that have no event to wait on (metrics, files)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

__all__ = ["until"]


async def until(condition: Callable[[], object], *, timeout: float = 10.0, interval: float = 0.01) -> None:
    """Return as soon as ``condition()`` is true; TimeoutError after ``timeout`` seconds."""
    async with asyncio.timeout(timeout):
        while not condition():  # noqa: ASYNC110 - polling is the point: the state has no event
            await asyncio.sleep(interval)
