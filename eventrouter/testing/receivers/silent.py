"""A node that accepts connections, reads what it is sent and never answers: a hung process, or a
machine gone behind a load balancer that still completes the TCP handshake. Only a client's own
request timeout ends such a request; what the client does then (marks the node dead, tries another)
is what tests of it check."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Self

__all__ = ["SilentServer"]


class SilentServer:
    """Async context manager on a free loopback port; ``connections`` counts what reached it, and
    ``requests`` holds each one's request line (``POST /_bulk?…``, ``HEAD /``) once it came: a
    request is never answered, so a connection carries one."""

    def __init__(self, host: str = "127.0.0.1") -> None:
        self.host = host
        self.port = 0
        self.connections = 0
        self.requests: list[str] = []
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    async def __aenter__(self) -> Self:
        self._server = await asyncio.start_server(self._serve, self.host, 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._server is not None:
            self._server.close()
        # Closing each connection ends its handler (its read returns): nothing left to cancel.
        for writer in list(self._writers):
            writer.close()
        if self._server is not None:
            await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self._writers.add(writer)
        head = b""
        try:
            with contextlib.suppress(OSError):
                while data := await reader.read(65536):  # until the client gives up and closes
                    if b"\n" not in head:
                        head += data
                        if b"\n" in head:  # "METHOD target HTTP/1.1"
                            self.requests.append(head.split(b"\n", 1)[0].decode("latin-1").rsplit(" ", 1)[0])
        finally:
            self._writers.discard(writer)
            writer.close()
