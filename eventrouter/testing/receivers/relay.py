"""A front on loopback before another test server (an ingress, an auth proxy, a gateway): subclasses
answer what the front stands for in ``_handle`` and pass the rest on with ``relay``."""

from __future__ import annotations

from typing import Any, ClassVar, Self

import aiohttp
from aiohttp import web

from eventrouter.testing.receivers._server import LoopbackServer

__all__ = ["Relay"]


class Relay(LoopbackServer):
    """Relays a request to ``upstream`` with the same method, path, query, body and headers, less
    ``request_hop`` (per connection; a subclass keeps ``Host`` where the server reads it), and answers
    with the upstream's status, body and headers, less ``response_hop`` (the body arrives
    decompressed, so its ``Content-Encoding`` goes too)."""

    request_hop: ClassVar[frozenset[str]] = frozenset(
        {"host", "content-length", "transfer-encoding", "connection"}
    )
    response_hop: ClassVar[frozenset[str]] = request_hop | {"content-encoding"}
    client_max_size = 64 * 1024 * 1024

    def __init__(self, upstream: str) -> None:
        super().__init__()
        self.upstream = upstream
        self._session: aiohttp.ClientSession | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    async def __aenter__(self) -> Self:
        await super().__aenter__()
        self._session = aiohttp.ClientSession()
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._session is not None:
            session, self._session = self._session, None
            await session.close()
        await super().__aexit__(*exc)

    async def relay(
        self, request: web.Request, body: bytes, path_qs: str | None = None, **options: Any
    ) -> web.Response:
        """``request`` (its ``body`` read already) sent on to ``upstream`` at ``path_qs`` (default its
        own); ``options`` go to aiohttp's request (``skip_auto_headers``...)."""
        assert self._session is not None, "the relay is not started"
        headers = {k: v for k, v in request.headers.items() if k.lower() not in self.request_hop}
        url = self.upstream + (request.path_qs if path_qs is None else path_qs)
        async with self._session.request(
            request.method, url, data=body or None, headers=headers, **options
        ) as resp:
            back = {k: v for k, v in resp.headers.items() if k.lower() not in self.response_hop}
            return web.Response(status=resp.status, body=await resp.read(), headers=back)
