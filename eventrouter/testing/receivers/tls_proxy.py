"""A TLS-terminating TCP proxy on loopback: puts TLS in front of a plaintext test server (Tansu has
no usable TLS listener), so clients' TLS options are exercised against the real protocol behind it."""

from __future__ import annotations

import asyncio
import ssl

from eventrouter.testing.receivers._relay import Relay

__all__ = ["TLSProxy"]


class TLSProxy(Relay):
    def __init__(
        self, *, listen_port: int, target_port: int, ssl_context: ssl.SSLContext, host: str = "127.0.0.1"
    ):
        super().__init__(listen_port=listen_port, target_port=target_port, host=host, ssl_context=ssl_context)
        self.handshakes = 0

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.handshakes += 1
        try:
            up_reader, up_writer = await asyncio.open_connection(self.host, self.target_port)
        except OSError:
            writer.close()
            return
        try:
            await self.splice(reader, writer, up_reader, up_writer)
        finally:
            await self.close(writer, up_writer)
