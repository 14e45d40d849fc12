"""What a Kafka 4 broker checks and Tansu 0.6 does not: record timestamps, keys on compacted topics,
the topic's largest batch, and the sequence numbers of idempotent producers.

A relay in front of a plaintext broker that validates each Produce request's record batches in the
order Kafka's ``UnifiedLog.append`` does, refusing a partition's batch with its error code while the
request's other partitions are written; a refused batch changes nothing (no sequence is taken):

1. ``max_message_bytes`` (the topic's ``max.message.bytes``; None: not checked): a larger batch is
   refused with MESSAGE_TOO_LARGE (10);
2. timestamps, as ``LogValidator`` does for a CreateTime topic: one more than ``after_max_ms`` ahead of
   the broker's clock (``log.message.timestamp.after.max.ms``, one hour by default since Kafka 4.0) or,
   if set, more than ``before_max_ms`` behind it (``log.message.timestamp.before.max.ms``) is refused
   with INVALID_TIMESTAMP (32); a record without a key for a topic in ``compacted_topics``
   (``cleanup.policy=compact``) is refused with INVALID_RECORD (87), a code aiokafka does not know;
3. with ``idempotence``: this relay answers InitProducerId (Tansu refuses it) with a new producer id,
   and a batch of a producer id must carry the partition's next sequence number (0 for a new producer
   id, then the previous batch's last + 1, ``ProducerAppendInfo.checkSequence``), or it is refused with
   OUT_OF_ORDER_SEQUENCE_NUMBER (45). Accepted batches reach the broker without their producer fields.
   Before that check, Kafka's duplicate-batch check (``ProducerStateEntry.findDuplicateBatch``): a batch
   whose producer epoch and (first, last) sequence equal one of the last five batches written for its
   producer id on that partition (``NUM_BATCHES_TO_RETAIN``) is answered NONE with that batch's base
   offset, and nothing is appended (``UnifiedLog.append``): a batch sent again after it was written,
   its answer lost or an error (``kafka_faults``' ``after_append_once``), is written once. Noted in
   ``duplicates``.

Everything else is relayed unchanged, and responses go back in request order, as a broker sends them.
Start the broker with ``advertised_port`` set to this relay's port, so that clients produce through it.
Leaving the relay's ``async with`` and entering it again is a broker outage: its port refuses
connections meanwhile, and it keeps its producer ids and sequence numbers, as the broker keeps its log.
"""

from __future__ import annotations

import asyncio
import io
import struct
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from eventrouter.testing.receivers._relay import Relay

__all__ = ["BrokerChecksProxy"]

API_PRODUCE = 0
API_INIT_PRODUCER_ID = 22
MESSAGE_TOO_LARGE = 10
INVALID_TIMESTAMP = 32
OUT_OF_ORDER_SEQUENCE_NUMBER = 45
INVALID_RECORD = 87
AFTER_MAX_MS = 3_600_000
"""Kafka 4.0's default log.message.timestamp.after.max.ms."""
BATCHES_KEPT = 5
"""Kafka's ProducerStateEntry.NUM_BATCHES_TO_RETAIN: the batches per producer id and partition a resent
batch is recognised among."""


@dataclass(slots=True)
class _Batch:
    """What Kafka keeps of a batch written (``BatchMetadata``): its producer epoch, sequence range, and
    base offset once the broker answered (-1 before)."""

    epoch: int
    first: int
    last: int
    offset: int = -1


@dataclass(slots=True)
class _Refused:
    """An answer of this relay's own for a partition: an error (the batch not forwarded, or forwarded
    and the broker's answer replaced), or NONE for a duplicate (``duplicate_of``, not forwarded)."""

    topic: str
    partition: int
    index: int  # of the first offending record in the batch
    message: str
    code: int = INVALID_TIMESTAMP
    duplicate_of: _Batch | None = None


@dataclass(slots=True)
class _Pending:
    """One response owed to the client, in request order: the broker's (patched with what this relay
    refused) or, when nothing of the request was left to forward, this relay's own."""

    correlation_id: int
    version: int
    refused: list[_Refused] = field(default_factory=list)
    forwarded: bool = True
    answer: bytes | None = None  # a response body of this relay's own (InitProducerId)
    written: list[tuple[str, int, _Batch]] = field(default_factory=list)  # offsets to note


def _frame(payload: bytes) -> bytes:
    return struct.pack(">i", len(payload)) + payload


async def _read_frame(reader: asyncio.StreamReader) -> bytes:
    (size,) = struct.unpack(">i", await reader.readexactly(4))
    return await reader.readexactly(size)


class BrokerChecksProxy(Relay):
    def __init__(
        self,
        *,
        listen_port: int,
        target_port: int,
        after_max_ms: int = AFTER_MAX_MS,
        before_max_ms: int | None = None,
        max_message_bytes: int | None = None,
        compacted_topics: tuple[str, ...] = (),
        idempotence: bool = False,
        now: Callable[[], float] = time.time,
        host: str = "127.0.0.1",
    ) -> None:
        super().__init__(listen_port=listen_port, target_port=target_port, host=host)
        self.after_max_ms = after_max_ms
        self.before_max_ms = before_max_ms
        self.max_message_bytes = max_message_bytes
        self.compacted_topics = set(compacted_topics)
        self.idempotence = idempotence
        self.now = now
        self.refused: list[tuple[str, int, str]] = []
        """(topic, partition, message) of every partition batch refused, in order."""
        self.producer_ids: list[int] = []
        """Every producer id handed out, in order (InitProducerId with ``idempotence``)."""
        self.duplicates: list[tuple[str, int, int, int]] = []
        """(topic, partition, producer id, first sequence) of every batch answered NONE as a duplicate
        of one written (not written again), in order (with ``idempotence``)."""
        self._next_sequence: dict[tuple[int, str, int], int] = {}
        self._batches: dict[tuple[int, str, int], deque[_Batch]] = {}

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        pending: asyncio.Queue[_Pending] = asyncio.Queue()
        await self.relay_with(
            writer,
            lambda up_reader, up_writer: (
                self._requests(reader, up_writer, pending),
                self._responses(up_reader, writer, pending),
            ),
        )

    async def _requests(
        self, reader: asyncio.StreamReader, up: asyncio.StreamWriter, pending: asyncio.Queue[_Pending]
    ) -> None:
        while True:
            request = await _read_frame(reader)
            api_key, version, correlation_id = struct.unpack_from(">hhi", request)
            if api_key == API_INIT_PRODUCER_ID and self.idempotence and version == 0:
                await pending.put(_Pending(correlation_id, version, forwarded=False, answer=self._new_id()))
                continue
            if api_key != API_PRODUCE or not 3 <= version <= 8:  # v3+: record batches (magic 2)
                await pending.put(_Pending(correlation_id, version))
                up.write(_frame(request))
                await up.drain()
                continue
            (client_len,) = struct.unpack_from(">h", request, 8)
            header_end = 10 + max(client_len, 0)
            acks, body, refused, written = self._check(version, request[header_end:])
            if body is None:  # nothing left to write: answer ourselves
                if acks != 0:
                    await pending.put(_Pending(correlation_id, version, refused, forwarded=False))
                continue
            if acks != 0:
                await pending.put(_Pending(correlation_id, version, refused, written=written))
            up.write(_frame(request[:header_end] + body))
            await up.drain()

    def _check(
        self, version: int, body: bytes
    ) -> tuple[int, bytes | None, list[_Refused], list[tuple[str, int, _Batch]]]:
        """The request's acks, its body without the partitions answered here (None when none is left),
        the answers of this relay's own, and the idempotent batches forwarded (to note their offsets)."""
        from aiokafka.protocol import produce
        from aiokafka.record.memory_records import MemoryRecords

        schema = getattr(produce, f"ProduceRequest_v{version}")
        transactional_id, acks, timeout, topics = schema.SCHEMA.decode(io.BytesIO(body))
        now_ms = int(self.now() * 1000)
        refused: list[_Refused] = []
        written: list[tuple[str, int, _Batch]] = []
        kept: list[tuple[str, list[tuple[int, bytes]]]] = []
        changed = False  # a partition left out or its batches' producer fields cleared
        for topic, partitions in topics:
            keep = []
            for partition, data in partitions:
                problem = (
                    self._invalid(topic, partition, MemoryRecords(data), now_ms, len(data)) if data else None
                )
                if problem is None and data and self.idempotence:
                    outcome, unowned = self._sequence(topic, partition, data)
                    if isinstance(outcome, _Batch):  # a duplicate: answered NONE, not written again
                        message = f"{topic}-{partition}: a duplicate of a batch written"
                        refused.append(_Refused(topic, partition, 0, message, 0, duplicate_of=outcome))
                        changed = True
                        continue
                    if isinstance(outcome, list):
                        written.extend((topic, partition, batch) for batch in outcome)
                    else:
                        problem = outcome
                    changed = changed or unowned != data
                    data = unowned
                if problem is None:
                    keep.append((partition, data))
                    code = self._answer_written(topic, partition) if data else None
                    if code is not None:
                        message = f"{topic}-{partition} written, then answered error {code} (a fault of the test relay)"
                        refused.append(_Refused(topic, partition, 0, message, code))
                else:
                    changed = True
                    refused.append(_Refused(topic, partition, *problem))
                    self.refused.append((topic, partition, problem[1]))
            if keep:
                kept.append((topic, keep))
        if not changed:
            return acks, body, refused, written
        if not kept:
            return acks, None, refused, written
        encoded: bytes = schema(transactional_id, acks, timeout, kept).encode()
        return acks, encoded, refused, written

    def _answer_written(self, topic: str, partition: int) -> int | None:
        """An error code to answer for a batch forwarded (written by the broker) instead of the broker's
        answer; None: the broker's. A hook for faults (``kafka_faults.FaultyBroker.after_append_once``)."""
        return None

    def _new_id(self) -> bytes:
        """An InitProducerIdResponse v0 body: no throttle, no error, a new id, epoch 0."""
        producer_id = 1000 + len(self.producer_ids)
        self.producer_ids.append(producer_id)
        return struct.pack(">ihqh", 0, 0, producer_id, 0)

    def _sequence(
        self, topic: str, partition: int, data: bytes
    ) -> tuple[tuple[int, str, int] | _Batch | list[_Batch], bytes]:
        """Check a partition's batches as ``UnifiedLog.append`` does: the batch written that one is a
        duplicate of (nothing appended), the refusal of one out of sequence, or the batches of producers
        noted as written (their sequence numbers taken); and the batches as the broker gets them
        (producer fields cleared, CRC computed again)."""
        from aiokafka.record._crc32c import crc

        out = bytearray(data)
        at = 0
        updates: dict[tuple[int, str, int], int] = {}
        written: list[tuple[tuple[int, str, int], _Batch]] = []
        while at + 61 <= len(out):
            (length,) = struct.unpack_from(">i", out, at + 8)
            producer_id, epoch, base_sequence, count = struct.unpack_from(">qhii", out, at + 43)
            if producer_id >= 0:
                key = (producer_id, topic, partition)
                last = base_sequence + count - 1
                # Kafka looks among the last batches kept before checking the sequence, and answers
                # the whole append with the first duplicate found (one batch per partition from v2).
                for batch in self._batches.get(key, ()):
                    if (batch.epoch, batch.first, batch.last) == (epoch, base_sequence, last):
                        self.duplicates.append((topic, partition, producer_id, base_sequence))
                        return batch, data
                expected = updates.get(key, self._next_sequence.get(key, 0))
                if base_sequence != expected:
                    message = (
                        f"Out of order sequence number for producer {producer_id} in partition "
                        f"{topic}-{partition}: {base_sequence} (incoming seq. number), {expected - 1} "
                        "(current end sequence number)"
                    )
                    return (0, message, OUT_OF_ORDER_SEQUENCE_NUMBER), data
                updates[key] = base_sequence + count
                written.append((key, _Batch(epoch, base_sequence, last)))
                struct.pack_into(">qhi", out, at + 43, -1, -1, -1)
                end = at + 12 + length
                struct.pack_into(">I", out, at + 17, crc(out[at + 21 : end]))
            at += 12 + length
        self._next_sequence.update(updates)
        for key, batch in written:
            kept = self._batches.setdefault(key, deque(maxlen=BATCHES_KEPT))
            if kept and kept[-1].epoch != batch.epoch:
                kept.clear()  # ProducerStateEntry.maybeUpdateProducerEpoch
            kept.append(batch)
        return [batch for _, batch in written], bytes(out)

    def _invalid(
        self, topic: str, partition: int, records: Any, now_ms: int, size: int
    ) -> tuple[int, str, int] | None:
        if self.max_message_bytes is not None and size > self.max_message_bytes:
            return (
                0,
                (
                    f"The request included a message larger than the max message size the server will "
                    f"accept: {size} bytes, max.message.bytes={self.max_message_bytes}"
                ),
                MESSAGE_TOO_LARGE,
            )
        index = 0
        while (batch := records.next_batch()) is not None:
            for record in batch:
                if record.key is None and topic in self.compacted_topics:
                    message = f"Compacted topic cannot accept message without key in topic partition {topic}-{partition}."
                    return index, message, INVALID_RECORD
                ts = record.timestamp
                ahead = ts - now_ms > self.after_max_ms
                behind = self.before_max_ms is not None and now_ms - ts > self.before_max_ms
                if ahead or behind:
                    low = now_ms - self.before_max_ms if self.before_max_ms is not None else "-inf"
                    return (
                        index,
                        (
                            f"Timestamp {ts} of message with offset {index} is out of range. The timestamp "
                            f"should be within [{low}, {now_ms + self.after_max_ms}]"
                        ),
                        INVALID_TIMESTAMP,
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
                if owed.written:
                    self._note_offsets(owed, response[4:])
                if owed.refused:
                    response = response[:4] + self._patch(owed, response[4:])
            elif owed.answer is not None:
                response = struct.pack(">i", owed.correlation_id) + owed.answer
            else:
                response = struct.pack(">i", owed.correlation_id) + self._patch(owed, None)
            writer.write(_frame(response))
            await writer.drain()

    @staticmethod
    def _note_offsets(owed: _Pending, body: bytes) -> None:
        """The base offset of each batch written, from the broker's answer: a duplicate's answer."""
        from aiokafka.protocol import produce

        response = getattr(produce, f"ProduceResponse_v{owed.version}")
        offsets = {
            (topic, entry[0]): entry[2]
            for topic, entries in response.SCHEMA.decode(io.BytesIO(body))[0]
            for entry in entries
            if entry[1] == 0
        }
        for topic, partition, batch in owed.written:
            base = offsets.get((topic, partition))
            if base is not None:
                batch.offset = base
                offsets[topic, partition] = base + batch.last - batch.first + 1  # its next batch's

    @staticmethod
    def _patch(owed: _Pending, body: bytes | None) -> bytes:
        """The broker's Produce response body with this relay's answer for each partition it answered
        (replacing the broker's for a batch forwarded)."""
        from aiokafka.protocol import produce

        response = getattr(produce, f"ProduceResponse_v{owed.version}")
        topics: list[tuple[str, list[tuple[Any, ...]]]] = []
        throttle = 0
        if body is not None:
            decoded = response.SCHEMA.decode(io.BytesIO(body))
            topics, throttle = [(t, list(p)) for t, p in decoded[0]], decoded[1]
        by_topic = {topic: partitions for topic, partitions in topics}
        for r in owed.refused:
            offset = r.duplicate_of.offset if r.duplicate_of is not None else -1
            entry: tuple[Any, ...] = (r.partition, r.code, offset, -1)
            if owed.version >= 5:
                entry += (-1,)  # log_start_offset
            if owed.version >= 8:
                entry += ([(r.index, r.message)], r.message) if r.code else ([], None)
            if r.topic not in by_topic:
                by_topic[r.topic] = []
                topics.append((r.topic, by_topic[r.topic]))
            entries = by_topic[r.topic]
            entries[:] = [e for e in entries if e[0] != r.partition]
            entries.append(entry)
        encoded: bytes = response(topics, throttle).encode()
        return encoded
