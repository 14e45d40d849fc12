"""Broker faults on top of the broker checks relay (``kafka_checks.BrokerChecksProxy``): a topic whose
partitions answer a retriable error, a batch written and then answered an error, and a slow network or
a slow broker.

- ``refuse``: topic -> error code, e.g. ``{"k8s-bad": NOT_ENOUGH_REPLICAS}``: every produce batch for the
  topic is refused with that code (nothing written, no sequence number taken), the request's other
  partitions are written. A Kafka broker answers NOT_ENOUGH_REPLICAS (19) while a partition has fewer
  in-sync replicas than ``min.insync.replicas`` (a rolling restart); aiokafka retries such a batch, for
  ever with idempotence. Change the mapping (``refuse.clear()``) to end the fault.
- ``after_append_once``: topic -> error code, e.g. ``{"k8s-bad": NOT_LEADER_OR_FOLLOWER}``: the topic's
  next batch is written (its sequence numbers taken, forwarded to the broker) and then answered with
  that code instead of the broker's answer; the entry is then removed. Kafka's ``DelayedProduce`` does
  so for an ``acks=all`` batch the leader appended before it moved (a rolling restart):
  NOT_LEADER_OR_FOLLOWER (6), or UNKNOWN_TOPIC_OR_PARTITION (3) from a broker no longer hosting the
  partition. The client's retry of that batch, with idempotence, is then answered NONE without being
  written again (the duplicate-batch check of ``kafka_checks``), as the new leader, which holds the
  batch, answers it.
- ``refuse_after_write``: topic -> error code: the topic's next batch is written and answered as usual,
  and from then on the topic is refused with that code (``refuse``): an ``acks=all`` batch appended
  while a follower falls out of the in-sync replicas, whose retry (its answer lost, or late past the
  client's ``request_timeout_ms`` with ``api_delays``) meets NOT_ENOUGH_REPLICAS: Kafka checks the
  in-sync replicas before its duplicate-batch check.
- ``answer_delay``: seconds every answer reaches the client after the broker gave it (a round trip that
  long); requests are not held back, so what a client pipelines stays pipelined.
- ``api_delays``: API key -> seconds more for the answers to that request type only, e.g.
  ``{API_PRODUCE: 2.0}`` (acknowledgements of ``acks=all`` waiting for a slow follower: the records are
  written at once, their acknowledgement comes late) or ``{API_INIT_PRODUCER_ID: 5.0}`` (a new idempotent
  producer waiting for its id). Change the mapping to change the fault.

Answers keep their request order on a connection whatever their delays, as a broker sends them: one
held back holds back those after it.
"""

from __future__ import annotations

import asyncio
import struct
from collections.abc import Callable
from typing import Any, cast

from eventrouter.testing.receivers.kafka_checks import (
    API_INIT_PRODUCER_ID,
    API_PRODUCE,
    BrokerChecksProxy,
    _Pending,
)

__all__ = [
    "API_INIT_PRODUCER_ID",
    "API_METADATA",
    "API_PRODUCE",
    "NOT_ENOUGH_REPLICAS",
    "NOT_LEADER_OR_FOLLOWER",
    "UNKNOWN_TOPIC_OR_PARTITION",
    "FaultyBroker",
]

NOT_ENOUGH_REPLICAS = 19
NOT_LEADER_OR_FOLLOWER = 6
UNKNOWN_TOPIC_OR_PARTITION = 3
API_METADATA = 3


class _Tap:
    """The part of a StreamReader the relay's request loop uses (``readexactly``: a frame's size, then
    the frame), noting each request's API key by its correlation id."""

    def __init__(self, reader: asyncio.StreamReader, apis: dict[int, int]) -> None:
        self._reader = reader
        self._apis = apis
        self._size_next = True

    async def readexactly(self, n: int) -> bytes:
        data = await self._reader.readexactly(n)
        if self._size_next:
            self._size_next = False
        else:
            self._size_next = True
            api_key, _, correlation_id = struct.unpack_from(">hhi", data)
            self._apis[correlation_id] = api_key
        return data


class _LateWriter:
    """The part of a StreamWriter the relay's answer loop uses, writing each answer after its delay
    and never before the answers written to it earlier."""

    def __init__(
        self, writer: asyncio.StreamWriter, delay: Callable[[int | None], float], apis: dict[int, int]
    ) -> None:
        self._writer = writer
        self._delay = delay  # API key (None: not known) -> seconds
        self._apis = apis
        self._due = 0.0  # when the answer written last goes out (the loop's clock)
        self._waiting = 0  # answers not written yet

    def write(self, data: bytes) -> None:
        # A frame: its size, then the answer, which starts with the request's correlation id.
        (correlation_id,) = struct.unpack_from(">i", data, 4)
        delay = self._delay(self._apis.pop(correlation_id, None))
        if delay <= 0 and not self._waiting:
            self._write(data, counted=False)
            return
        loop = asyncio.get_running_loop()
        self._due = max(self._due, loop.time() + delay)
        self._waiting += 1
        loop.call_at(self._due, self._write, data)

    def _write(self, data: bytes, counted: bool = True) -> None:
        self._waiting -= counted
        if not self._writer.is_closing():
            self._writer.write(data)

    async def drain(self) -> None:
        await self._writer.drain()


class FaultyBroker(BrokerChecksProxy):
    def __init__(
        self,
        *,
        refuse: dict[str, int] | None = None,
        after_append_once: dict[str, int] | None = None,
        refuse_after_write: dict[str, int] | None = None,
        answer_delay: float = 0.0,
        api_delays: dict[int, float] | None = None,
        **checks: Any,
    ) -> None:
        super().__init__(**checks)
        self.refuse: dict[str, int] = dict(refuse or {})
        self.after_append_once: dict[str, int] = dict(after_append_once or {})
        self.refuse_after_write: dict[str, int] = dict(refuse_after_write or {})
        self.answer_delay = answer_delay
        self.api_delays: dict[int, float] = dict(api_delays or {})
        # Per connection (its queue of answers owed): correlation id -> API key of the requests read.
        self._apis: dict[asyncio.Queue[_Pending], dict[int, int]] = {}

    def _invalid(
        self, topic: str, partition: int, records: Any, now_ms: int, size: int
    ) -> tuple[int, str, int] | None:
        code = self.refuse.get(topic)
        if code is not None:
            return 0, f"{topic}-{partition} refused with error {code} (a fault of the test relay)", code
        return super()._invalid(topic, partition, records, now_ms, size)

    def _answer_written(self, topic: str, partition: int) -> int | None:
        if (code := self.refuse_after_write.pop(topic, None)) is not None:
            self.refuse[topic] = code
        return self.after_append_once.pop(topic, None)

    def _delay(self, api_key: int | None) -> float:
        return self.answer_delay + (self.api_delays.get(api_key, 0.0) if api_key is not None else 0.0)

    async def _requests(
        self, reader: asyncio.StreamReader, up: asyncio.StreamWriter, pending: asyncio.Queue[_Pending]
    ) -> None:
        tap = _Tap(reader, self._apis.setdefault(pending, {}))
        try:
            await super()._requests(cast(asyncio.StreamReader, tap), up, pending)
        finally:
            # BrokerChecksProxy._serve closes both sides only after both directions ended: the relay's
            # exit, cancelling a connection that was closing, left its sockets open (a ResourceWarning).
            up.close()

    async def _responses(
        self, up: asyncio.StreamReader, writer: asyncio.StreamWriter, pending: asyncio.Queue[_Pending]
    ) -> None:
        apis = self._apis.setdefault(pending, {})
        try:
            late = _LateWriter(writer, self._delay, apis)
            await super()._responses(up, cast(asyncio.StreamWriter, late), pending)
        finally:
            self._apis.pop(pending, None)
            writer.close()  # as up in _requests
