"""Kafka tests' set-up through the project's broker checks relay (``receivers.kafka_faults``): Tansu
behind a relay that adds faults, a sink's pipeline as the engine runs it, and the records read back
with aiokafka. Shared by the Kafka sink's tests (test files may not import each other); the sink
itself is built by each test file (core never imports a concrete sink)."""

from __future__ import annotations

import asyncio
import collections
import contextlib
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any, Unpack

from aiokafka import AIOKafkaConsumer

from eventrouter.engine.pipeline import Pipeline
from eventrouter.metrics import Metrics
from eventrouter.record import Occurrence
from eventrouter.sink import Outcome, Sink
from eventrouter.testing.pipelines import Knobs, pipeline_for
from eventrouter.testing.receivers.kafka_faults import FaultyBroker
from eventrouter.testing.receivers.tansu import TansuBroker, free_port

__all__ = [
    "as_the_engine_does",
    "copies",
    "engine",
    "log_of",
    "occurrence_of",
    "relayed",
    "started",
    "stopped",
]


@contextlib.asynccontextmanager
async def relayed(*topics: str, **faults: Any) -> AsyncIterator[tuple[TansuBroker, FaultyBroker]]:
    """Tansu behind a relay with ``faults`` (FaultyBroker's arguments), the broker advertising the
    relay so that every connection goes through it; ``topics`` of one partition each."""
    port = free_port()
    async with (
        TansuBroker(advertised_port=port) as broker,
        FaultyBroker(listen_port=port, target_port=broker.port, **faults) as relay,
    ):
        await broker.create_topics(*topics, partitions=1)
        yield broker, relay


def engine(sink: Sink[Any], tmp_path: Path, **knobs: Unpack[Knobs]) -> tuple[Pipeline, Metrics]:
    """The engine's pipeline around ``sink``, with the send_timeout its context carries."""
    metrics = Metrics()
    knobs = {"send_timeout": sink.context.send_timeout, **knobs}
    return pipeline_for("kafka", sink, metrics, tmp_path / "dl", **knobs), metrics


def started(pipeline: Pipeline, batch: Sequence[Occurrence] = ()) -> asyncio.Task[None]:
    """``pipeline`` running, with ``batch`` offered."""
    task = asyncio.create_task(pipeline.run())
    for occurrence in batch:
        pipeline.offer(occurrence)
    return task


async def stopped(pipeline: Pipeline, task: asyncio.Task[None]) -> None:
    """Drained, stopped, its sink closed."""
    pipeline.close()
    await asyncio.wait_for(task, 10)
    await pipeline.close_sink()


async def log_of(bootstrap: str, *topics: str, at_least: int) -> list[Any]:
    """Every record of ``topics`` (at least ``at_least``), in log order per partition."""
    consumer = AIOKafkaConsumer(
        *topics, bootstrap_servers=bootstrap, auto_offset_reset="earliest", enable_auto_commit=False
    )
    await consumer.start()
    try:
        records: list[Any] = []
        async with asyncio.timeout(20):
            while len(records) < at_least:
                for got in (await consumer.getmany(timeout_ms=500)).values():
                    records.extend(got)
            # A fetch returns at once when data is there: an empty short one says there is no more.
            while any((more := await consumer.getmany(timeout_ms=300)).values()):
                for got in more.values():
                    records.extend(got)
        return sorted(records, key=lambda r: (r.topic, r.partition, r.offset))
    finally:
        await consumer.stop()


def occurrence_of(record: Any) -> str:
    """The occurrence a record carries (its ``occurrence`` header: uid/number)."""
    value: bytes = dict(record.headers)["occurrence"]
    return value.decode()


def copies(records: list[Any]) -> collections.Counter[tuple[str, str]]:
    """How many times each (topic, occurrence) was written."""
    return collections.Counter((r.topic, occurrence_of(r)) for r in records)


async def as_the_engine_does(sink: Sink[Any], batch: list[Occurrence]) -> list[Outcome]:
    """``Pipeline._send_once``: a send the engine's ``send_timeout`` ends is a retry of the whole batch,
    so it must end by itself with an outcome per record (TimeoutError here)."""
    async with asyncio.timeout(sink.context.send_timeout):
        outcomes = await sink.send(batch)
    assert outcomes is not None
    return list(outcomes)
