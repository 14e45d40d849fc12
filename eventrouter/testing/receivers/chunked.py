"""Test receivers whose answers can arrive in pieces, as a gateway's chunked transfer or TCP/TLS
records split them: a client that judges an answer from one read misjudges it."""

from __future__ import annotations

import asyncio

from aiohttp import hdrs, web
from aiohttp.typedefs import Handler

from eventrouter.testing.receivers._server import LoopbackServer

__all__ = ["CHUNK_PAUSE", "ChunkedAnswers", "answer_in_chunks"]

CHUNK_PAUSE = 0.01
"""Real seconds between two pieces of an answer: each reaches the client in its own read."""


async def answer_in_chunks(
    request: web.Request, response: web.StreamResponse, size: int
) -> web.StreamResponse:
    """``response`` with its body written ``size`` bytes at a time (chunked transfer encoding), a
    moment apart; as it is when ``size`` is 0 or it has no body of bytes to split."""
    body = response.body if isinstance(response, web.Response) and not response.prepared else None
    if size <= 0 or not isinstance(body, bytes) or not body:
        return response
    out = web.StreamResponse(status=response.status, reason=response.reason)
    out.headers.update({k: v for k, v in response.headers.items() if k != hdrs.CONTENT_LENGTH})
    out.enable_chunked_encoding()
    await out.prepare(request)
    for start in range(0, len(body), size):
        if start:
            await asyncio.sleep(CHUNK_PAUSE)  # the piece before goes out on its own
        await out.write(body[start : start + size])
    await out.write_eof()
    return out


class ChunkedAnswers(LoopbackServer):
    """A receiver whose every answer is written ``chunk_bytes`` bytes at a time (0: whole)."""

    chunk_bytes: int = 0

    def _make_app(self) -> web.Application:
        app = super()._make_app()
        app.middlewares.append(self._in_chunks)
        return app

    @web.middleware
    async def _in_chunks(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        return await answer_in_chunks(request, await handler(request), self.chunk_bytes)
