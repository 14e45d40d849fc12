"""Start and stop an aiohttp application on a free loopback port (shared by the test receivers)."""

from __future__ import annotations

import socket
from typing import Any, Self

from aiohttp import web

__all__ = ["LoopbackServer"]


class LoopbackServer:
    """Async context manager; subclasses route everything to ``_handle`` (or override ``_make_app``)."""

    host: str = "127.0.0.1"
    client_max_size: int = 4 * 1024 * 1024

    def __init__(self) -> None:
        self.port = 0
        self._runner: web.AppRunner | None = None

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        raise NotImplementedError

    def _make_app(self) -> web.Application:
        app = web.Application(client_max_size=self.client_max_size)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        return app

    def _runner_options(self) -> dict[str, Any]:
        return {"access_log": None, "shutdown_timeout": 1.0}

    async def __aenter__(self) -> Self:
        self._runner = web.AppRunner(self._make_app(), **self._runner_options())
        await self._runner.setup()
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.host, 0))
        self.port = sock.getsockname()[1]
        await web.SockSite(self._runner, sock).start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._runner is not None:
            runner, self._runner = self._runner, None
            await runner.cleanup()
