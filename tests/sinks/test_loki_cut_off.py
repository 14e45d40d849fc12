"""A Loki send whose outcome is partly unknown: cut off by the engine's ``send_timeout`` in the middle
of its parallel pushes, or a push that timed out although Loki stored it. Its retry must be the same
bytes (Loki de-duplicates identical entries), and an entry Loki then refuses as too far behind
(Loki refuses an identical entry behind its cutoff rather than de-duplicating it,
pkg/ingester/stream.go ``validateEntries``) must not be stored again with a new timestamp. Against
the project's Loki-compatible receiver."""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
import pytest

from eventrouter import Occurrence, OutcomeKind, RetryableError, SinkContext
from eventrouter.engine.checkpoint import MemoryCheckpoint, SinkCheckpoint
from eventrouter.engine.deadletter import DeadLetter
from eventrouter.engine.filter import compile_filter
from eventrouter.engine.pipeline import Pipeline
from eventrouter.metrics import Metrics
from eventrouter.options import FilterOptions, PipelineOptions
from eventrouter.record import normalise
from eventrouter.testing import event_object, make_occurrence
from eventrouter.testing.receivers.loki import LokiReceiver
from eventrouter_sinks.loki import LokiOptions, LokiSink

CONTEXT = SinkContext(name="loki", cluster="test", data_dir=None, logger=logging.getLogger("test.loki"))


def _iso(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, tz=UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _when(seconds_ago: float) -> str:
    return datetime.fromtimestamp(time.time() - seconds_ago, tz=UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _at(seconds_ago: float, **kwargs: Any) -> Occurrence:
    return make_occurrence(first_timestamp=_when(seconds_ago), **kwargs)


def _queried(loki: LokiReceiver, namespace: str) -> list[tuple[str, bool]]:
    """(object name, time_adjusted) of every entry a Loki query returns (identical ones once)."""
    return [
        (orjson.loads(line)["involved_object"]["name"], bool(orjson.loads(line).get("time_adjusted")))
        for stream in loki.query_range(f'{{namespace="{namespace}"}}')
        for _, line, _ in stream.values
    ]


def _slow_once(namespace: str, seconds: float) -> Any:
    """A push_delay: the first push carrying ``namespace`` is answered ``seconds`` late (and stored)."""
    slowed: list[bool] = []

    def delay(streams: list[dict[str, str]]) -> float:
        if not slowed and any(labels.get("namespace") == namespace for labels in streams):
            slowed.append(True)
            return seconds
        return 0.0

    return delay


async def test_a_send_cut_off_among_its_pushes_is_retried_identical_and_stored_once() -> None:
    """The reproduction (through the Router): one stream's batch spans three hours (a relist after
    downtime) and is stored by a push that finished; another new stream's push is slow and the
    engine's send_timeout cuts the send off. Before, the finished push had raised the sink's newest
    for the stream, so the retry stamped the three-hour-old entry at receipt and Loki stored it a
    second time. Now the retry is identical, and the old entry Loki refuses as behind its newest (the
    first copy's doing) is answered OK."""
    from eventrouter.app import Router, RouterSettings
    from eventrouter.config import build_specs

    async with LokiReceiver(push_delay=_slow_once("slow", 2.0)) as loki:
        router = Router(
            RouterSettings(cluster_name="test", metrics_addr=None),
            build_specs(
                [
                    f"loki:{loki.url}?send_timeout=1&batch_max_wait=0.2"
                    "&retry_initial_backoff=0.05&retry_max_backoff=0.2"
                ]
            ),
        )
        await router.start_pipelines()
        try:
            await router.replay(
                [
                    (
                        "ADDED",
                        event_object(namespace="s", object_name="old", first_timestamp=_when(3 * 3600)),
                    ),
                    ("ADDED", event_object(namespace="s", object_name="new", first_timestamp=_when(10))),
                    ("ADDED", event_object(namespace="slow", object_name="x", first_timestamp=_when(5))),
                ]
            )
            assert await router.drain(15)
        finally:
            await router.stop()
    assert sorted(_queried(loki, "s")) == [("new", False), ("old", False)]
    assert _queried(loki, "slow") == [("x", False)]
    assert any(p.status == 400 and "too far behind" in p.message for p in loki.pushes)  # the retry's


def _quick_deadline(url: str, send_timeout: float) -> LokiSink:
    """A sink whose pushes_deadline comes from the engine's send_timeout: five sixths of it less one
    push's timeout of 0.8 s (0.45 s of a send_timeout of 1.5 s)."""
    context = SinkContext(
        name="loki",
        cluster="test",
        data_dir=None,
        logger=logging.getLogger("test.loki"),
        send_timeout=send_timeout,
    )
    return LokiSink(LokiOptions.model_validate({"url": url, "timeout": 0.8}), context)


async def test_a_send_of_many_waves_starts_no_push_after_its_deadline_and_returns_normally() -> None:
    """Twenty-four new streams are twenty-four pushes, eight at a time; each takes 0.3 s at this Loki.
    The pushes not started by the deadline (beyond the first eight) are answered retry (held: not sent, no failed attempt, in place), so
    the send ends normally instead of being cut off by the engine's send_timeout with some pushes
    stored; the retry sends the rest. Before, every wave went out however long it took."""
    async with LokiReceiver(push_delay=lambda streams: 0.3) as loki:
        sink = _quick_deadline(loki.url, send_timeout=1.5)
        assert sink.pushes_deadline == pytest.approx(0.45)
        try:
            batch = [_at(60 - i, namespace=f"ns-{i}", object_name=f"o-{i}") for i in range(24)]
            outcomes = await sink.send(batch)
            assert outcomes is not None
            pushed = len(loki.pushes)
            assert pushed in (8, 16)  # the first eight, and eight more if they ended by the deadline
            left = [o for o in outcomes if o.kind is OutcomeKind.RETRY]
            assert len(left) == 24 - pushed and [o.kind for o in outcomes].count(OutcomeKind.OK) == pushed
            assert all(o.held and not o.defer and "not sent" in o.reason for o in left)
            rest = [occ for occ, o in zip(batch, outcomes, strict=True) if o.kind is OutcomeKind.RETRY]
            for _ in range(5):  # what the engine does: send what is left again, in place
                again = await sink.send(rest) or []
                rest = [occ for occ, o in zip(rest, again, strict=True) if o.kind is OutcomeKind.RETRY]
                if not rest:
                    break
        finally:
            await sink.aclose()
    assert not rest
    assert len(loki.pushes) == 24  # nothing sent twice
    names = Counter(orjson.loads(e.line)["involved_object"]["name"] for e in loki.entries)
    assert names == {f"o-{i}": 1 for i in range(24)}


async def test_an_entry_refused_as_behind_after_its_push_timed_out_is_not_stamped_anew() -> None:
    """A push times out at the sink, but Loki stores it (a slow ingester). Its retry is identical:
    Loki keeps the newer entry once and refuses the old one as over an hour behind it. The sink cannot
    tell whether that entry is stored (it is here): it rejects it to the dead-letter file with the
    reason rather than stamping it at receipt, which stored a second copy before."""
    async with LokiReceiver(push_delay=_slow_once("s", 0.8)) as loki:
        sink = LokiSink(LokiOptions.model_validate({"url": loki.url, "timeout": 0.3}), CONTEXT)
        try:
            batch = [
                _at(3 * 3600, namespace="s", object_name="old"),
                _at(10, namespace="s", object_name="new"),
            ]
            try:
                await sink.send(batch)
                raise AssertionError("the push did not time out")
            except RetryableError as exc:
                assert "timed out" in exc.reason
            await loki.wait_for_entries(2)  # the slow ingester stored both meanwhile
            outcomes = await sink.send(batch)  # the engine's retry
            assert outcomes is not None
            rest = [occ for occ, o in zip(batch, outcomes, strict=True) if o.kind is OutcomeKind.RETRY]
            if rest:
                await sink.send(rest)  # and its next, for what it was asked to send again
        finally:
            await sink.aclose()
    assert sorted(_queried(loki, "s")) == [("new", False), ("old", False)]
    assert [o.kind for o in outcomes] == [OutcomeKind.REJECT, OutcomeKind.OK]
    assert "outcome is unknown" in outcomes[0].reason and "too far behind" in outcomes[0].reason


async def test_a_timed_out_push_retried_when_loki_stored_nothing_is_delivered_as_usual() -> None:
    """The other side of the above: the retry of an unknown push that Loki did not store is stored
    (nothing refused), so remembering the push costs nothing when nothing was stored."""
    async with LokiReceiver() as loki:
        sink = LokiSink(LokiOptions.model_validate({"url": loki.url}), CONTEXT)
        try:
            loki.fail_next(503)
            batch = [
                _at(3 * 3600, namespace="s", object_name="old"),
                _at(10, namespace="s", object_name="new"),
            ]
            try:
                await sink.send(batch)
                raise AssertionError("503 was not retryable")
            except RetryableError:
                pass
            again = await sink.send(batch)
        finally:
            await sink.aclose()
    assert again is None or all(o.kind is OutcomeKind.OK for o in again)
    assert sorted(_queried(loki, "s")) == [("new", False), ("old", False)]


async def test_through_the_engine_a_long_send_ends_before_send_timeout_and_pushes_nothing_twice(
    tmp_path: Path,
) -> None:
    """Sixty new streams at a slow Loki (0.2 s a push): fifteen waves, 3 s, against a send_timeout of 2 s.
    Before, every send was cut off, retried whole, and each retry pushed the finished streams again
    (and could re-stamp their old entries, see above). Now each send stops starting waves at its
    deadline and returns; the engine sends the rest in place: sixty pushes, no timeout."""
    now = time.time()
    metrics = Metrics()
    async with LokiReceiver(push_delay=lambda streams: 0.2) as loki:
        sink = _quick_deadline(loki.url, send_timeout=2.0)
        pipeline = Pipeline(
            name="loki",
            sink=sink,
            options=PipelineOptions.model_validate(
                {
                    "batch_max_wait": 0.05,
                    "send_timeout": 2.0,
                    "retry_initial_backoff": 0.05,
                    "retry_max_backoff": 0.1,
                }
            ),
            predicate=compile_filter(FilterOptions.model_validate({})),
            checkpoint=SinkCheckpoint(MemoryCheckpoint()),
            deadletter=DeadLetter(tmp_path / "dl", sink="loki"),
            metrics=metrics,
        )
        task = asyncio.create_task(pipeline.run())
        try:
            for i in range(60):
                event = event_object(
                    namespace=f"ns-{i}", object_name=f"o-{i}", first_timestamp=_iso(now - 100 + i)
                )
                pipeline.offer(normalise(event, cluster="test"))
            await pipeline.wait_idle(30)
        finally:
            pipeline.close()
            await asyncio.wait_for(task, 5)
            await sink.aclose()
    assert len(loki.pushes) == 60
    assert metrics.send_errors.labels("loki", "timeout")._value.get() == 0
    assert Counter(orjson.loads(e.line)["involved_object"]["name"] for e in loki.entries) == {
        f"o-{i}": 1 for i in range(60)
    }
