"""Broker faults on top of the broker checks relay (``kafka_checks.BrokerChecksProxy``): a topic whose
partitions answer a retriable error, and a slow network.

- ``refuse``: topic -> error code, e.g. ``{"k8s-bad": NOT_ENOUGH_REPLICAS}``: every produce batch for the
  topic is refused with that code (nothing written, no sequence number taken), the request's other
  partitions are written. A Kafka broker answers NOT_ENOUGH_REPLICAS (19) while a partition has fewer
  in-sync replicas than ``min.insync.replicas`` (a rolling restart); aiokafka retries such a batch, for
  ever with idempotence. Change the mapping (``refuse.clear()``) to end the fault.
- ``answer_delay``: seconds every answer reaches the client after the broker gave it (a round trip that
  long), in order; requests are not held back, so what a client pipelines stays pipelined.
"""

from __future__ import annotations

import asyncio
from typing import Any, cast

from eventrouter.testing.receivers.kafka_checks import BrokerChecksProxy, _Pending

__all__ = ["NOT_ENOUGH_REPLICAS", "FaultyBroker"]

NOT_ENOUGH_REPLICAS = 19


class _LateWriter:
    """The part of a StreamWriter the relay's answer loop uses, writing each answer ``delay`` later."""

    def __init__(self, writer: asyncio.StreamWriter, delay: float) -> None:
        self._writer = writer
        self._delay = delay

    def write(self, data: bytes) -> None:
        # Equal delays fire in the order they were set: answers keep their request order.
        asyncio.get_running_loop().call_later(self._delay, self._write, data)

    def _write(self, data: bytes) -> None:
        if not self._writer.is_closing():
            self._writer.write(data)

    async def drain(self) -> None:
        await self._writer.drain()


class FaultyBroker(BrokerChecksProxy):
    def __init__(
        self,
        *,
        refuse: dict[str, int] | None = None,
        answer_delay: float = 0.0,
        **checks: Any,
    ) -> None:
        super().__init__(**checks)
        self.refuse: dict[str, int] = dict(refuse or {})
        self.answer_delay = answer_delay

    def _invalid(
        self, topic: str, partition: int, records: Any, now_ms: int, size: int
    ) -> tuple[int, str, int] | None:
        code = self.refuse.get(topic)
        if code is not None:
            return 0, f"{topic}-{partition} refused with error {code} (a fault of the test relay)", code
        return super()._invalid(topic, partition, records, now_ms, size)

    async def _responses(
        self, up: asyncio.StreamReader, writer: asyncio.StreamWriter, pending: asyncio.Queue[_Pending]
    ) -> None:
        if self.answer_delay > 0:
            writer = cast(asyncio.StreamWriter, _LateWriter(writer, self.answer_delay))
        await super()._responses(up, writer, pending)
