"""A Kafka broker with ``auto.create.topics.enable=false``, made of Tansu and a relay.

Tansu 0.6 has no such setting (it creates a topic for the first Metadata request that names it), but it
honours the request's own ``allow_auto_topic_creation`` (Metadata v4+, KIP-361): asked with it false, it
answers UNKNOWN_TOPIC_OR_PARTITION for a missing topic and creates nothing, which is what Kafka answers
every client when the broker setting is off. The relay clears that flag in each Metadata request;
everything else, and every answer, is Tansu's own."""

from __future__ import annotations

import asyncio
import contextlib
import struct
from collections.abc import AsyncIterator

from ._relay import Relay
from .tansu import TansuBroker, free_port

__all__ = ["NoAutoCreate", "broker_without_auto_create", "metadata_topics"]


@contextlib.asynccontextmanager
async def broker_without_auto_create() -> AsyncIterator[tuple[TansuBroker, NoAutoCreate]]:
    """A Tansu broker behind the relay, advertising the relay: clients reach it at
    ``127.0.0.1:{relay.listen_port}``; ``broker`` itself (its own port) still creates topics."""
    port = free_port()
    async with (
        TansuBroker(advertised_port=port) as broker,
        NoAutoCreate(listen_port=port, target_port=broker.port) as relay,
    ):
        yield broker, relay


API_METADATA = 3


class NoAutoCreate(Relay):
    """In front of Tansu: clears ``allow_auto_topic_creation`` in each Metadata request (see the module).
    Start the broker with ``advertised_port`` set to this relay's port, so that clients keep talking
    through it."""

    def __init__(self, *, listen_port: int, target_port: int) -> None:
        super().__init__(listen_port=listen_port, target_port=target_port)
        self.asked: list[list[str]] = []
        """The topics of each Metadata request that named topics, in order."""

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await self.relay_with(
            writer,
            lambda up_reader, up_writer: (self._requests(reader, up_writer), self.pump(up_reader, writer)),
        )

    async def _requests(self, reader: asyncio.StreamReader, up: asyncio.StreamWriter) -> None:
        with_error = (asyncio.IncompleteReadError, OSError)
        while True:
            try:
                (size,) = struct.unpack(">i", await reader.readexactly(4))
                request = bytearray(await reader.readexactly(size))
            except with_error:
                return
            api_key, version = struct.unpack_from(">hh", request)
            if api_key == API_METADATA and version >= 4:
                # Request header v1, then (not flexible up to v8) topics ARRAY(STRING), then the flag.
                assert version <= 8, f"Metadata v{version} is flexible: not handled here"
                topics, at = metadata_topics(request)
                if topics:
                    self.asked.append(topics)
                request[at] = 0  # allow_auto_topic_creation = false
            up.write(struct.pack(">i", size) + bytes(request))
            await up.drain()


def metadata_topics(request: bytes | bytearray) -> tuple[list[str], int]:
    """A Metadata request of v4 to v8 (request header v1, then topics ARRAY(STRING), not flexible):
    the topics asked for, and the offset of its allow_auto_topic_creation flag."""
    (client_len,) = struct.unpack_from(">h", request, 8)
    at = 10 + max(client_len, 0)
    (count,) = struct.unpack_from(">i", request, at)
    at += 4
    topics = []
    for _ in range(max(count, 0)):
        (length,) = struct.unpack_from(">h", request, at)
        topics.append(bytes(request[at + 2 : at + 2 + length]).decode())
        at += 2 + length
    return topics, at
