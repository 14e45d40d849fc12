"""A sink that keeps what it receives in memory, with switchable failure modes for engine tests."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence

from pydantic import Field

from eventrouter.options import SinkOptions
from eventrouter.record import Occurrence
from eventrouter.sink import OK, Outcome, RetryableError, Sink

__all__ = ["Gate", "Listening", "MemorySink", "MemorySinkOptions", "gated"]


class MemorySinkOptions(SinkOptions):
    fail: bool = Field(False, description="Raise RetryableError on every send (a sink that is down).")


class MemorySink(Sink[MemorySinkOptions]):
    """Records every accepted occurrence in ``received``; ``decide`` picks per-item outcomes."""

    options_model = MemorySinkOptions
    description = "keeps occurrences in memory (tests)"

    def __init__(self, options: MemorySinkOptions, context: object) -> None:
        super().__init__(options, context)  # type: ignore[arg-type]
        self.received: list[Occurrence] = []
        self.batches: list[int] = []
        self.down = options.fail
        self.delay = 0.0  # seconds each send takes (a slow destination)
        self.blocked: asyncio.Event | None = None
        self.decide: Callable[[Occurrence], Outcome] | None = None
        self.arrived = asyncio.Condition()
        self.started = False
        self.closed = 0

    async def start(self) -> None:
        self.started = True

    async def send(self, batch: Sequence[Occurrence]) -> Sequence[Outcome] | None:
        if self.blocked is not None:
            await self.blocked.wait()
        if self.delay:
            await asyncio.sleep(self.delay)
        if self.down:
            raise RetryableError("memory sink is down")
        outcomes = [self.decide(occ) if self.decide else OK for occ in batch]
        self.received.extend(occ for occ, out in zip(batch, outcomes, strict=True) if out is OK)
        self.batches.append(len(batch))
        async with self.arrived:
            self.arrived.notify_all()
        return outcomes

    async def wait_for(self, count: int, timeout: float = 10.0) -> None:
        """Wait until at least ``count`` occurrences were accepted."""
        async with asyncio.timeout(timeout), self.arrived:
            await self.arrived.wait_for(lambda: len(self.received) >= count)

    @property
    def keys(self) -> list[tuple[str, int]]:
        return [(o.uid, o.number) for o in self.received]

    async def aclose(self) -> None:
        self.closed += 1


class Listening(MemorySink):
    """A memory sink that notes the (uid, number) of what the engine says it gave up, in order."""

    def __init__(self, options: MemorySinkOptions, context: object) -> None:
        super().__init__(options, context)
        self.given: list[tuple[str, int]] = []

    def given_up(self, occurrences: Sequence[Occurrence]) -> None:
        self.given.extend((occ.uid, occ.number) for occ in occurrences)


class Gate:
    """Lets a sink take a batch only when the test allows one (``gated``)."""

    def __init__(self) -> None:
        self.allowed = 0
        self._changed = asyncio.Condition()

    async def allow(self, batches: int) -> None:
        async with self._changed:
            self.allowed += batches
            self._changed.notify_all()

    async def take(self) -> None:
        async with self._changed:
            await self._changed.wait_for(lambda: self.allowed > 0)
            self.allowed -= 1


def gated(gate: Gate) -> type[MemorySink]:
    """A MemorySink class whose sends each wait for ``gate`` to allow one batch."""

    class Gated(MemorySink):
        async def send(self, batch: Sequence[Occurrence]) -> Sequence[Outcome] | None:
            await gate.take()
            return await super().send(batch)

    return Gated
