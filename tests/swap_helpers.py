"""A sink instance whose close waits for the test: a reload's swap held while the old instance closes
(items 328 and after; tests/test_engine_s36.py, tests/test_engine_s37.py)."""

from __future__ import annotations

import asyncio
from typing import Any

from eventrouter.sink import Sink


class ClosesSlowly(Sink[Any]):
    """Put before a sink class (``class _Slow(ClosesSlowly, LokiSink)``): its ``aclose`` sets
    ``closing`` and waits for ``release`` before it closes for real, as a close that takes a moment
    does (a TLS shutdown, a flush)."""

    closing: asyncio.Event
    release: asyncio.Event

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.closing, self.release = asyncio.Event(), asyncio.Event()

    async def aclose(self) -> None:
        self.closing.set()
        await self.release.wait()
        await super().aclose()
