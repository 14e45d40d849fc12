"""What the tests put in front of FakeHEC (a gateway, a route dropping a header, nginx): an HTTP server
on loopback, and the request passed on to HEC as such a front passes it."""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import aiohttp
from aiohttp import web

PASSED = frozenset({"Authorization", "X-Splunk-Request-Channel", "Content-Type"})
"""The request headers a front passes on to HEC."""


@asynccontextmanager
async def serve(answer: Callable[[web.Request], Awaitable[web.Response]]) -> AsyncIterator[str]:
    """An HTTP server on loopback answering every method and path with ``answer``. Yields its base URL."""
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", answer)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    await web.SockSite(runner, sock).start()
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        await runner.cleanup()


async def relay(
    http: aiohttp.ClientSession, url: str, request: web.Request, dropped: str = ""
) -> web.Response:
    """``request``'s body POSTed to ``url`` with the headers in ``PASSED`` (but ``dropped``); the answer
    that came back, its status and body as they came, labelled JSON."""
    passed = PASSED - {dropped}
    headers = {k: v for k, v in request.headers.items() if k in passed}
    async with http.post(url, data=await request.read(), headers=headers) as r:
        return web.Response(status=r.status, body=await r.read(), content_type="application/json")
