"""Entries set aside for their Loki stream (``defer``: refused for the active stream limit, or as too
far behind) come back on their own backoff while later batches go on. A newer entry of the same
stream must not go in before them when it would put them over an hour behind the stream's newest:
Loki would refuse them, and the sink dead-letter them. Against the project's Loki-compatible
receiver, through the engine's Pipeline where it is about the engine's order."""

from __future__ import annotations

import asyncio
import logging
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson

from eventrouter import Occurrence, OutcomeKind, SinkContext
from eventrouter.engine.checkpoint import MemoryCheckpoint, SinkCheckpoint
from eventrouter.engine.deadletter import DeadLetter
from eventrouter.engine.filter import compile_filter
from eventrouter.engine.pipeline import Pipeline
from eventrouter.metrics import Metrics
from eventrouter.options import FilterOptions, PipelineOptions
from eventrouter.record import normalise
from eventrouter.testing import event_object, make_occurrence
from eventrouter.testing.receivers.loki import LokiReceiver
from eventrouter.testing.waiting import until
from eventrouter_sinks.loki import LokiOptions, LokiSink

CONTEXT = SinkContext(name="loki", cluster="test", data_dir=None, logger=logging.getLogger("test.loki"))


def _iso(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, tz=UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _at(epoch: float, **kwargs: Any) -> Occurrence:
    return make_occurrence(first_timestamp=_iso(epoch), **kwargs)


def _stored(loki: LokiReceiver) -> list[str]:
    return [orjson.loads(e.line)["involved_object"]["name"] for e in loki.entries]


async def test_an_entry_set_aside_for_its_stream_goes_in_before_a_much_newer_one_of_that_stream(
    tmp_path: Path,
) -> None:
    """The reviewer's reproduction, through the engine: b-old (received two hours ago, refused for
    the stream limit ever since) waits aside; the limit frees and b-new of the same stream arrives.
    Before, b-new went in first and b-old, now over an hour behind it, was refused by Loki and
    dead-lettered (retried in place, before items 82/84, it went in first). Now b-new waits aside,
    held (no attempt), until b-old is in."""
    now = time.time()
    async with LokiReceiver(max_streams=1) as loki:
        sink = LokiSink(LokiOptions.model_validate({"url": loki.url}), CONTEXT)
        pipeline = Pipeline(
            name="loki",
            sink=sink,
            options=PipelineOptions.model_validate(
                {"batch_max_wait": 0.01, "retry_initial_backoff": 1.0, "retry_max_backoff": 2.0}
            ),
            predicate=compile_filter(FilterOptions.model_validate({})),
            checkpoint=SinkCheckpoint(MemoryCheckpoint()),
            deadletter=DeadLetter(tmp_path / "dl", sink="loki"),
            metrics=Metrics(),
        )
        task = asyncio.create_task(pipeline.run())
        try:
            pipeline.offer(
                normalise(
                    event_object(namespace="a", object_name="a-0", first_timestamp=_iso(now - 30)),
                    cluster="test",
                )
            )
            await loki.wait_for_entries(1)
            old = event_object(namespace="b", object_name="b-old", first_timestamp=_iso(now - 7205))
            pipeline.offer(normalise(old, cluster="test", received_at=now - 7200))
            await until(lambda: loki.stream_limited == 1)  # refused: set aside
            loki.max_streams = 2  # the limit frees (a stream idle elsewhere was flushed)
            new = event_object(namespace="b", object_name="b-new", first_timestamp=_iso(now - 5))
            pipeline.offer(normalise(new, cluster="test"))
            await until(lambda: "b-new" in _stored(loki), timeout=15)
            await pipeline.wait_idle(10)  # b-old is in, or was given up
        finally:
            pipeline.close()
            await asyncio.wait_for(task, 5)
            await sink.aclose()
    assert _stored(loki) == ["a-0", "b-old", "b-new"]
    assert not (tmp_path / "dl").exists() or not (tmp_path / "dl").read_bytes()
    assert {p.status for p in loki.pushes} == {204, 429}  # nothing refused as too far behind


# The hold is the engine's longest wait before offering a retried item again.
SHORT_HOLD = SinkContext(
    name="loki", cluster="test", data_dir=None, logger=logging.getLogger("test.loki"), retry_wait_max=0.5
)


async def test_a_stream_is_held_back_only_for_much_newer_entries_and_only_until_the_hold_ends() -> None:
    """Sink level: an entry of the stream within half of max_behind of the one waiting aside is pushed
    (Loki judges it; here it is refused for the limit as well); one over it is held, not pushed,
    without counting as an attempt. If the entry set aside never comes back (the engine gave it up
    at retry_max_attempts), the stream is held back no longer than the hold lasts."""
    now = time.time()
    async with LokiReceiver(max_streams=1) as loki:
        sink = LokiSink(LokiOptions.model_validate({"url": loki.url}), SHORT_HOLD)
        try:
            await sink.send([_at(now - 30, namespace="a", object_name="a-0")])
            first = await sink.send([_at(now - 7205, namespace="b", object_name="b-old")])
            assert first is not None and first[0].defer
            pushes = len(loki.pushes)
            close = await sink.send([_at(now - 7205 + 600, namespace="b", object_name="b-close")])
            assert close is not None and close[0].defer and not close[0].held  # pushed: refused again
            assert len(loki.pushes) == pushes + 1
            loki.max_streams = 2
            held = await sink.send([_at(now - 5, namespace="b", object_name="b-new")])
            assert held is not None and held[0].kind is OutcomeKind.RETRY
            assert held[0].held and held[0].defer and "older entries of its stream" in held[0].reason
            assert len(loki.pushes) == pushes + 1  # not pushed
            # b-old and b-close are given up by the engine and never come back; once their hold ends
            # (0.5 s after their last answer here) b-new goes in.
            await asyncio.sleep(0.6)
            after = await sink.send([_at(now - 5, namespace="b", object_name="b-new")])
        finally:
            await sink.aclose()
    assert after is None or [o.kind for o in after] == [OutcomeKind.OK]
    assert _stored(loki) == ["a-0", "b-new"]
