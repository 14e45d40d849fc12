"""A reload's swap and what the engine gives up meanwhile (item 328).

The swap sets ``self.sink = new``, awaits the old instance's close, and only then calls
``new.take_over(old)`` (its contract: the previous instance is already closed). An occurrence given
up while the close awaits (a drop from the full queue, a dead letter) was told to the new instance
alone, which held nothing yet; ``take_over`` then carried the old instance's record of it, and that
record held its Loki stream back for nothing until it expired (review-g F1)."""

from __future__ import annotations

import asyncio
import logging
import time
from datetime import UTC, datetime
from typing import Any

from swap_helpers import ClosesSlowly

from eventrouter.engine.checkpoint import MemoryCheckpoint, SinkCheckpoint
from eventrouter.engine.deadletter import DeadLetter
from eventrouter.engine.filter import compile_filter
from eventrouter.engine.pipeline import Pipeline
from eventrouter.metrics import Metrics
from eventrouter.options import FilterOptions, PipelineOptions
from eventrouter.record import Occurrence
from eventrouter.sink import OutcomeKind, SinkContext
from eventrouter.testing import make_occurrence
from eventrouter.testing.memory import Listening, MemorySinkOptions
from eventrouter.testing.receivers.loki import LokiReceiver
from eventrouter.testing.waiting import until
from eventrouter_sinks.loki import LokiOptions, LokiSink

Key = tuple[str, int]


def _at(seconds_ago: float, **kwargs: Any) -> Occurrence:
    when = datetime.fromtimestamp(time.time() - seconds_ago, tz=UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    return make_occurrence(first_timestamp=when, **kwargs)


class _SlowClose(ClosesSlowly, LokiSink):
    """A close that takes a moment (a TLS shutdown, a flush): it waits until the test lets it end."""


def _sink(cls: type[LokiSink], url: str) -> LokiSink:
    context = SinkContext(
        name="loki",
        cluster="test",
        data_dir=None,
        logger=logging.getLogger("test.loki"),
        retry_wait_max=300.0,
    )
    return cls(LokiOptions.model_validate({"url": url}), context)


def _pipeline(sink: Any, metrics: Metrics, queue_max_events: int = 8) -> Pipeline:
    options = PipelineOptions.model_validate(
        {
            "batch_max_wait": 0.01,
            "retry_initial_backoff": 60,
            "retry_max_backoff": 60,
            "queue_max_events": queue_max_events,
        }
    )
    return Pipeline(
        name="loki",
        sink=sink,
        options=options,
        predicate=compile_filter(FilterOptions.model_validate({})),
        checkpoint=SinkCheckpoint(MemoryCheckpoint()),
        deadletter=DeadLetter(None, sink="loki"),
        metrics=metrics,
    )


def _aside(sink: LokiSink) -> set[Key]:
    return {key for waiting in sink._aside.values() for key in waiting}


async def test_given_up_during_the_swap_close_is_not_carried_over() -> None:
    async with LokiReceiver(max_streams=1) as loki:
        old = _sink(_SlowClose, loki.url)
        assert isinstance(old, _SlowClose)
        old.closing, old.release = asyncio.Event(), asyncio.Event()
        metrics = Metrics()
        pipeline = _pipeline(old, metrics)
        task = asyncio.create_task(pipeline.run())
        try:
            pipeline.offer(_at(30, namespace="a", object_name="a-0"))
            await until(lambda: loki.entries)  # stream a holds Loki's one stream
            olds = [_at(7205, namespace="b", object_name=f"b-old{i}") for i in range(6)]
            for occ in olds:
                pipeline.offer(occ)
            # Refused for the stream limit: set aside by the sink, and by the engine for a retry.
            await until(
                lambda: _aside(old) == {(o.uid, o.number) for o in olds} and len(pipeline._deferred) == 6
            )

            new = _sink(LokiSink, loki.url)
            pipeline.replace_sink(new)
            pipeline.offer(_at(5, namespace="a", object_name="kick"))  # a send is due: the swap runs
            await asyncio.wait_for(old.closing.wait(), 10)
            assert pipeline.sink is new and new._aside is not old._aside  # closing; not taken over yet

            for i in range(8):  # an overload: the queue is full, the items set aside are dropped
                pipeline.offer(_at(5, namespace="z", object_name=f"z{i}"))
            held = {(occ.uid, occ.number) for _, _, occ in pipeline._aside.heap}
            dropped = [occ for occ in olds if (occ.uid, occ.number) not in held]
            assert dropped, "the overload dropped no b-old entry"
            old.release.set()
            await until(lambda: new._aside is old._aside)  # taken over
            carried = _aside(new)
            assert not carried & {(occ.uid, occ.number) for occ in dropped}, "a given-up record was carried"

            # Only those the engine still holds keep stream b back: given up too, b's next entry is pushed.
            loki.max_streams = 10
            new.given_up([occ for occ in olds if (occ.uid, occ.number) in held])
            outcomes = await new.send([_at(5, namespace="b", object_name="b-new")])
            assert outcomes is not None and [o.kind for o in outcomes] == [OutcomeKind.OK], outcomes
        finally:
            old.release.set()
            pipeline.stop_now()
            await asyncio.wait_for(task, 10)
            await pipeline.close_sink()


class _ClosingListening(ClosesSlowly, Listening):
    """Notes what it is told it gave up; its close waits until the test lets it end."""


def _listening(cls: type[Listening] = Listening) -> Listening:
    context = SinkContext(name="mem", cluster="test", data_dir=None, logger=logging.getLogger("test.mem"))
    return cls(MemorySinkOptions.model_validate({}), context)


async def test_given_up_reaches_both_instances_only_while_the_old_one_closes() -> None:
    """Drops while the old instance closes are told once to each instance; after the take-over, to
    the new one alone (the old one is done with)."""
    old = _listening(_ClosingListening)
    assert isinstance(old, _ClosingListening)
    new = _listening()
    new.blocked = asyncio.Event()  # its sends wait: the queue fills behind them
    pipeline = _pipeline(old, Metrics(), queue_max_events=4)
    task = asyncio.create_task(pipeline.run())
    try:
        pipeline.offer(make_occurrence(namespace="a", object_name="first"))
        await old.wait_for(1)
        pipeline.replace_sink(new)
        pipeline.offer(make_occurrence(namespace="a", object_name="kick"))  # a send is due: the swap runs
        await asyncio.wait_for(old.closing.wait(), 10)
        for i in range(8):  # the queue (4) is full: the oldest are dropped while the old one closes
            pipeline.offer(make_occurrence(namespace="a", object_name=f"w{i}"))
        assert old.given, "nothing was dropped while the old instance closed"
        assert new.given == old.given and len(set(old.given)) == len(old.given)
        during = list(old.given)

        old.release.set()
        await until(lambda: old.closed == 1 and pipeline._handing_over is None)
        await until(lambda: pipeline._in_flight)  # the new instance's send waits
        for i in range(8):
            pipeline.offer(make_occurrence(namespace="a", object_name=f"n{i}"))
        assert len(new.given) > len(during)
        assert old.given == during, "told to the old instance after the take-over"
    finally:
        old.release.set()
        assert new.blocked is not None
        new.blocked.set()
        pipeline.stop_now()
        await asyncio.wait_for(task, 10)
        await pipeline.close_sink()
