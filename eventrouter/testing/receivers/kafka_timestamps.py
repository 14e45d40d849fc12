"""What a Kafka 4 broker checks and Tansu 0.6 does not: record timestamps.

A relay in front of a plaintext broker that validates each Produce request as Kafka's LogValidator does
for a CreateTime topic: a record batch holding a timestamp more than ``after_max_ms`` ahead of the
broker's clock (``log.message.timestamp.after.max.ms``, one hour by default since Kafka 4.0) or, if
set, more than ``before_max_ms`` behind it (``log.message.timestamp.before.max.ms``, unbounded by
default) is refused with INVALID_TIMESTAMP (32) for its partition, and the request's other partitions
are written. Everything else is relayed unchanged, and responses go back in request order, as a broker
sends them. Start the broker with ``advertised_port`` set to this relay's port, so that clients produce
through it.
"""

from __future__ import annotations

import asyncio
import io
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from eventrouter.testing.receivers._relay import Relay

__all__ = ["TimestampCheckProxy"]

API_PRODUCE = 0
INVALID_TIMESTAMP = 32
AFTER_MAX_MS = 3_600_000
"""Kafka 4.0's default log.message.timestamp.after.max.ms."""


@dataclass(slots=True)
class _Refused:
    topic: str
    partition: int
    index: int  # of the first offending record in the batch
    message: str


@dataclass(slots=True)
class _Pending:
    """One response owed to the client, in request order: the broker's (patched with what this relay
    refused) or, when nothing of the request was left to forward, this relay's own."""

    correlation_id: int
    version: int
    refused: list[_Refused] = field(default_factory=list)
    forwarded: bool = True


def _frame(payload: bytes) -> bytes:
    return struct.pack(">i", len(payload)) + payload


async def _read_frame(reader: asyncio.StreamReader) -> bytes:
    (size,) = struct.unpack(">i", await reader.readexactly(4))
    return await reader.readexactly(size)


class TimestampCheckProxy(Relay):
    def __init__(
        self,
        *,
        listen_port: int,
        target_port: int,
        after_max_ms: int = AFTER_MAX_MS,
        before_max_ms: int | None = None,
        now: Callable[[], float] = time.time,
        host: str = "127.0.0.1",
    ) -> None:
        super().__init__(listen_port=listen_port, target_port=target_port, host=host)
        self.after_max_ms = after_max_ms
        self.before_max_ms = before_max_ms
        self.now = now
        self.refused: list[tuple[str, int, str]] = []
        """(topic, partition, message) of every partition batch refused, in order."""

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
        up_reader, up_writer = await asyncio.open_connection(self.host, self.target_port)
        pending: asyncio.Queue[_Pending] = asyncio.Queue()
        # Either side closing (or the relay stopping) ends both directions.
        directions = [
            asyncio.ensure_future(self._requests(reader, up_writer, pending)),
            asyncio.ensure_future(self._responses(up_reader, writer, pending)),
        ]
        try:
            await asyncio.wait(directions, return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            pass  # the relay is stopping: asyncio 3.11 logs a connection handler that ends cancelled
        finally:
            for direction in directions:
                direction.cancel()
            await asyncio.gather(*directions, return_exceptions=True)
            for w in (writer, up_writer):
                w.close()
            if task is not None:
                self._tasks.discard(task)

    async def _requests(
        self, reader: asyncio.StreamReader, up: asyncio.StreamWriter, pending: asyncio.Queue[_Pending]
    ) -> None:
        while True:
            request = await _read_frame(reader)
            api_key, version, correlation_id = struct.unpack_from(">hhi", request)
            if api_key != API_PRODUCE or not 3 <= version <= 8:  # v3+: record batches (magic 2)
                await pending.put(_Pending(correlation_id, version))
                up.write(_frame(request))
                await up.drain()
                continue
            (client_len,) = struct.unpack_from(">h", request, 8)
            header_end = 10 + max(client_len, 0)
            acks, body, refused = self._check(version, request[header_end:])
            if body is None:  # nothing left to write: answer ourselves
                if acks != 0:
                    await pending.put(_Pending(correlation_id, version, refused, forwarded=False))
                continue
            if acks != 0:
                await pending.put(_Pending(correlation_id, version, refused))
            up.write(_frame(request[:header_end] + body))
            await up.drain()

    def _check(self, version: int, body: bytes) -> tuple[int, bytes | None, list[_Refused]]:
        """The request's acks, its body without the partitions refused here (None when none is left),
        and those."""
        from aiokafka.protocol import produce
        from aiokafka.record.memory_records import MemoryRecords

        schema = getattr(produce, f"ProduceRequest_v{version}")
        transactional_id, acks, timeout, topics = schema.SCHEMA.decode(io.BytesIO(body))
        now_ms = int(self.now() * 1000)
        refused: list[_Refused] = []
        kept: list[tuple[str, list[tuple[int, bytes]]]] = []
        for topic, partitions in topics:
            keep = []
            for partition, data in partitions:
                problem = self._invalid(MemoryRecords(data), now_ms) if data else None
                if problem is None:
                    keep.append((partition, data))
                else:
                    refused.append(_Refused(topic, partition, *problem))
                    self.refused.append((topic, partition, problem[1]))
            if keep:
                kept.append((topic, keep))
        if not refused:
            return acks, body, []
        if not kept:
            return acks, None, refused
        encoded: bytes = schema(transactional_id, acks, timeout, kept).encode()
        return acks, encoded, refused

    def _invalid(self, records: Any, now_ms: int) -> tuple[int, str] | None:
        index = 0
        while (batch := records.next_batch()) is not None:
            for record in batch:
                ts = record.timestamp
                ahead = ts - now_ms > self.after_max_ms
                behind = self.before_max_ms is not None and now_ms - ts > self.before_max_ms
                if ahead or behind:
                    low = now_ms - self.before_max_ms if self.before_max_ms is not None else "-inf"
                    return index, (
                        f"Timestamp {ts} of message with offset {index} is out of range. The timestamp "
                        f"should be within [{low}, {now_ms + self.after_max_ms}]"
                    )
                index += 1
        return None

    async def _responses(
        self, up: asyncio.StreamReader, writer: asyncio.StreamWriter, pending: asyncio.Queue[_Pending]
    ) -> None:
        while True:
            owed = await pending.get()
            if owed.forwarded:
                response = await _read_frame(up)
                if owed.refused:
                    response = response[:4] + self._patch(owed, response[4:])
            else:
                response = struct.pack(">i", owed.correlation_id) + self._patch(owed, None)
            writer.write(_frame(response))
            await writer.drain()

    @staticmethod
    def _patch(owed: _Pending, body: bytes | None) -> bytes:
        """The broker's Produce response body with an INVALID_TIMESTAMP entry per refused partition."""
        from aiokafka.protocol import produce

        response = getattr(produce, f"ProduceResponse_v{owed.version}")
        topics: list[tuple[str, list[tuple[Any, ...]]]] = []
        throttle = 0
        if body is not None:
            decoded = response.SCHEMA.decode(io.BytesIO(body))
            topics, throttle = [(t, list(p)) for t, p in decoded[0]], decoded[1]
        by_topic = {topic: partitions for topic, partitions in topics}
        for r in owed.refused:
            entry: tuple[Any, ...] = (r.partition, INVALID_TIMESTAMP, -1, -1)
            if owed.version >= 5:
                entry += (-1,)  # log_start_offset
            if owed.version >= 8:
                entry += ([(r.index, r.message)], r.message)
            if r.topic not in by_topic:
                by_topic[r.topic] = []
                topics.append((r.topic, by_topic[r.topic]))
            by_topic[r.topic].append(entry)
        encoded: bytes = response(topics, throttle).encode()
        return encoded
