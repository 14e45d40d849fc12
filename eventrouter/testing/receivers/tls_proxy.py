"""A TLS-terminating TCP proxy on loopback: puts TLS in front of a plaintext test server (Tansu has
no usable TLS listener), so clients' TLS options are exercised against the real protocol behind it."""

from __future__ import annotations

import asyncio
import contextlib
import ssl

__all__ = ["TLSProxy"]


class TLSProxy:
    def __init__(
        self, *, listen_port: int, target_port: int, ssl_context: ssl.SSLContext, host: str = "127.0.0.1"
    ):
        self.host = host
        self.listen_port = listen_port
        self.target_port = target_port
        self.ssl_context = ssl_context
        self.handshakes = 0
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def __aenter__(self) -> TLSProxy:
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
        self.handshakes += 1
        try:
            up_reader, up_writer = await asyncio.open_connection(self.host, self.target_port)
        except OSError:
            writer.close()
            return
        pumps = [
            asyncio.create_task(self._pump(reader, up_writer)),
            asyncio.create_task(self._pump(up_reader, writer)),
        ]
        self._tasks.update(pumps)
        try:
            await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in pumps:
                task.cancel()
                self._tasks.discard(task)
            for w in (writer, up_writer):
                w.close()
                with contextlib.suppress(OSError, ssl.SSLError, asyncio.CancelledError):
                    await w.wait_closed()

    @staticmethod
    async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError, ssl.SSLError, asyncio.IncompleteReadError):
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
