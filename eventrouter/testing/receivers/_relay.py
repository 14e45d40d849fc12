"""A TCP server on loopback that relays each connection to a target port: the shared part of the
test proxies that add what a test server lacks (TLS, SASL) in front of it."""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import Callable, Coroutine
from typing import Any, Self

__all__ = ["Relay"]

Directions = Callable[
    [asyncio.StreamReader, asyncio.StreamWriter], tuple[Coroutine[Any, Any, None], Coroutine[Any, Any, None]]
]
"""Given the upstream connection, the two coroutines that relay a connection: (upward, downward)."""


class Relay:
    def __init__(
        self,
        *,
        listen_port: int,
        target_port: int,
        host: str = "127.0.0.1",
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self.host = host
        self.listen_port = listen_port
        self.target_port = target_port
        self.ssl_context = ssl_context
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def __aenter__(self) -> Self:
        self._server = await asyncio.start_server(
            self._serve, self.host, self.listen_port, ssl=self.ssl_context, reuse_address=True
        )
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        raise NotImplementedError

    async def splice(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        up_reader: asyncio.StreamReader,
        upstream: asyncio.StreamWriter,
    ) -> None:
        """Copy both ways until either side closes."""
        pumps = [
            asyncio.create_task(self.pump(reader, upstream)),
            asyncio.create_task(self.pump(up_reader, writer)),
        ]
        self._tasks.update(pumps)
        try:
            await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in pumps:
                task.cancel()
                self._tasks.discard(task)

    async def relay_with(self, writer: asyncio.StreamWriter, directions: Directions) -> None:
        """Connect upstream and run both ``directions`` of a client's connection until either ends
        (or the relay stops), then close both sides. For relays that read what they pass on."""
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
        try:
            try:
                up_reader, up_writer = await asyncio.open_connection(self.host, self.target_port)
            except OSError:
                writer.close()
                return
            running = [asyncio.ensure_future(c) for c in directions(up_reader, up_writer)]
            try:
                await asyncio.wait(running, return_when=asyncio.FIRST_COMPLETED)
            except asyncio.CancelledError:
                pass  # the relay is stopping: asyncio 3.11 logs a connection handler that ends cancelled
            finally:
                for direction in running:
                    direction.cancel()
                await asyncio.gather(*running, return_exceptions=True)
                await self.close(writer, up_writer)
        finally:
            if task is not None:
                self._tasks.discard(task)

    @staticmethod
    async def pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Copy bytes one way until either side closes (ssl.SSLError is an OSError)."""
        with contextlib.suppress(OSError, asyncio.IncompleteReadError):
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()

    @staticmethod
    async def close(*writers: asyncio.StreamWriter) -> None:
        for w in writers:
            w.close()
            with contextlib.suppress(OSError, asyncio.CancelledError):
                await w.wait_closed()
